"""Typed errors shared by every layer of lookalike.

Each error carries a stable ``code`` (used verbatim in REST error bodies and ``--json`` output) and an
``http_status`` so the service maps errors in one place instead of re-classifying messages.
"""

from __future__ import annotations


class LookalikeError(Exception):
    """Base of every error lookalike raises on purpose."""

    code = "error"
    http_status = 500


class InputError(LookalikeError):
    """The input cannot be turned into a model input; nothing was changed anywhere."""

    code = "unusable_input"
    http_status = 422


class EmptyInput(InputError):
    code = "empty_input"


class InputTooLarge(InputError):
    code = "too_large"
    http_status = 413


class NotAnExecutable(InputError):
    """Not a PE, ELF or Mach-O file, or one whose headers are truncated or corrupt."""

    code = "not_an_executable"


class CorruptImage(InputError):
    """Not a decodable image in a supported format (PNG, JPEG, GIF, BMP, WebP)."""

    code = "corrupt_image"


class DecompressionBomb(InputError):
    """An image whose declared pixel count exceeds the limit; refused before decoding."""

    code = "decompression_bomb"


class BundleError(LookalikeError):
    """A model bundle that is missing, truncated, corrupt or inconsistent."""

    code = "bad_bundle"
    http_status = 500


class ParserFailed(InputError):
    """The isolated parser ran out of time or memory, or died, on this input."""

    code = "parser_failed"
