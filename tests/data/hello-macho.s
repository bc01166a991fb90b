# Source of hello-macho.o, a real Mach-O object for the Mach-O tests (this machine has no Mach-O file):
#   llvm-mc -triple=x86_64-apple-macosx11.0 -filetype=obj tests/data/hello-macho.s -o tests/data/hello-macho.o
	.section	__TEXT,__text,regular,pure_instructions
	.globl	_main
_main:
	pushq	%rbp
	movq	%rsp, %rbp
	leaq	L_.str(%rip), %rax
	xorl	%eax, %eax
	popq	%rbp
	retq
	.section	__TEXT,__cstring,cstring_literals
L_.str:
	.asciz	"hello from a Mach-O object"
