"""Speed-up of BN folding: the default model unfolded vs folded, measured in one run.

    .venv/bin/python -m bench.fold [--size 64] [--seconds 4] [--rounds 5] [--threads N] [--json]

The model gets trained-looking BN statistics and affine parameters (random, far from 0/1) so folding has
real work to bake in.  For batch 1 and 64 (eval mode, torch.inference_mode) the two models are timed in
alternating rounds and the median items/s of each is reported with the ratio folded / unfolded:
alternating keeps a busy machine's load drifts from favouring one side.  The largest difference of the
embeddings is printed as well (it must stay below 1e-4).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench.common import timed_rate
from embedder.fold import fold_batchnorm
from embedder.model import ModelConfig, build_model
from embedder.norm import NormConfig, bn_layers


def trained_looking(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for _, bn in bn_layers(model):
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c) * 0.5)
            bn.running_var.copy_(torch.empty(c).uniform_(0.1, 3.0))
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.copy_(torch.randn(c) * 0.2)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--norm", default="moving", choices=["moving", "cumulative"])
    ap.add_argument("--seconds", type=float, default=4.0, help="timing per model and batch size")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ModelConfig(in_channels=args.channels, input_size=args.size, norm=NormConfig(kind=args.norm))
    model = trained_looking(cfg)
    folded = fold_batchnorm(model)
    probe = torch.randint(0, 256, (16, args.channels, args.size, args.size), dtype=torch.uint8)
    with torch.inference_mode():
        max_diff = float((model(probe) - folded(probe)).abs().max())

    result: dict[str, object] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": {"widths": cfg.widths, "blocks": cfg.blocks, "size": args.size, "norm": args.norm},
        "max_abs_diff": max_diff,
    }
    per_round = args.seconds / args.rounds
    for batch in (1, 64):
        x = torch.randint(0, 256, (batch, args.channels, args.size, args.size), dtype=torch.uint8)
        rates: dict[str, list[float]] = {"unfolded": [], "folded": []}
        with torch.inference_mode():
            for _ in range(args.rounds):
                for name, m in (("unfolded", model), ("folded", folded)):
                    rates[name].append(timed_rate(lambda m=m, x=x: m(x), per_round) * batch)
        unf, fol = statistics.median(rates["unfolded"]), statistics.median(rates["folded"])
        result[f"batch{batch}"] = {
            "unfolded_items_per_s": round(unf, 1),
            "folded_items_per_s": round(fol, 1),
            "speedup": round(fol / unf, 3),
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"torch {result['torch']}, {result['threads']} threads, model {result['model']}")
    print(f"max |embedding difference| folded vs unfolded: {max_diff:.2e}")
    for batch in (1, 64):
        r = result[f"batch{batch}"]
        assert isinstance(r, dict)
        print(
            f"batch {batch:>2}: unfolded {r['unfolded_items_per_s']:>8} items/s, "
            f"folded {r['folded_items_per_s']:>8} items/s, speed-up x{r['speedup']:.3f}"
        )


if __name__ == "__main__":
    main()
