"""Embedding throughput of the model `lookalike train` makes by default, as a fraction of this machine's
matmul rate, in one run.

    .venv/bin/python -m bench.embed [--modality executable|image] [--size S] [--seconds 3] [--json]

Prints items/s at batch 1 and 64 (eval mode, torch.inference_mode), the model's FLOPs per item (counted
by torch.utils.flop_counter: 2 FLOPs per multiply-add of convs and linears), the achieved GFLOP/s, and
the ratio to a 2048x2048 float32 matmul measured in the same process a moment before.  Absolute rates
move with the machine; the ratio is the number to compare.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import matmul_gflops, shipped_config, timed_rate
from embedder.model import build_model


def flops_per_item(model: torch.nn.Module, size: int, channels: int) -> float:
    x = torch.zeros(8, channels, size, size, dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modality", choices=("executable", "image"), default="executable")
    ap.add_argument("--size", type=int, default=None, help="input size (default: the modality's)")
    ap.add_argument("--norm", default="moving")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    cfg, _ = shipped_config(args.modality, args.size, args.norm)
    size, channels = cfg.input_size, cfg.in_channels
    model = build_model(cfg).eval()
    flops = flops_per_item(model, size, channels)
    peak = matmul_gflops(seconds=args.seconds)
    result: dict[str, object] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": {
            "modality": args.modality,
            "size": size,
            "stem_stride": cfg.stem_stride,
            "head": cfg.head,
            "dim": cfg.out_dim,
            "widths": cfg.widths,
            "norm": args.norm,
        },
        "mflops_per_item": round(flops / 1e6, 2),
        "matmul_gflops": round(peak, 1),
    }
    for batch in (1, 64):
        x = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8)
        with torch.inference_mode():
            items = timed_rate(lambda x=x: model(x), args.seconds) * batch
        gflops = items * flops / 1e9
        result[f"batch{batch}"] = {
            "items_per_s": round(items, 1),
            "gflops": round(gflops, 2),
            "fraction_of_matmul": round(gflops / peak, 3),
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"torch {result['torch']}, {result['threads']} threads, model {result['model']}")
    print(f"FLOPs per item: {result['mflops_per_item']} MFLOP; matmul 2048x2048: {peak:.1f} GFLOP/s")
    for batch in (1, 64):
        r = result[f"batch{batch}"]
        print(
            f"batch {batch:>2}: {r['items_per_s']:>8} items/s  {r['gflops']:>6} GFLOP/s  "
            f"= {r['fraction_of_matmul']:.1%} of matmul"
        )


if __name__ == "__main__":
    main()
