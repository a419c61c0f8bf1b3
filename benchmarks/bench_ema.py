"""Short training runs with and without the weight average: validation NME after a few epochs, in one run.

    .venv/bin/python benchmarks/bench_ema.py OUT/examples [--epochs 3]

OUT/examples is an ingest output (``fkd ingest``) of the full training split. Prints JSON: the best validation
NME of the shipped recipe (cosine, EMA 0.998) with the decay warmed up (the default), without the warm-up, and
without any averaging, all from the same seed and data.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fkd_core.geometry import CANONICAL_MARGIN, inner_fraction
from fkd_core.parquet_io import read_examples
from fkd_core.train import FitConfig, fit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("examples")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train, val = read_examples(args.examples, "train")[:2], read_examples(args.examples, "val")[:2]
    inner = inner_fraction(CANONICAL_MARGIN)
    base = dict(epochs=args.epochs, schedule="cosine", min_lr=1e-6, patience=args.epochs, seed=0)
    variants = {
        "ema_0.998_warmup": FitConfig(**base, ema_decay=0.998),
        "ema_0.998_no_warmup": FitConfig(**base, ema_decay=0.998, ema_warmup=False),
        "no_averaging": FitConfig(**base, ema_decay=0.0),
    }
    out: dict = {"epochs": args.epochs, "train": len(train[0]), "val": len(val[0])}
    for name, params in variants.items():
        t0 = time.perf_counter()
        _, history = fit(train, val, params=params, inner=inner)
        out[name] = {
            "best_val_nme": round(history.best.val_nme, 4),  # of the weights kept (averaged or raw, the better)
            "kept_weights": history.best.weights,
            "val_nme_per_epoch": [round(e.val_nme, 4) for e in history.epochs],
            "averaged_val_nme_per_epoch": [e.averaged_val_nme and round(e.averaged_val_nme, 4) for e in history.epochs],
            "seconds": round(time.perf_counter() - t0, 1),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
