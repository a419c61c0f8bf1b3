"""What resumable training costs: a run that saves its whole state after every epoch (fkd train's default)
against the same run saving nothing, on the shipped network and recipe; and the state's size.

    python benchmarks/bench_train_state.py [--examples 512] [--epochs 3]

Prints one JSON document. The overhead ratio is what to compare across machines (2 cores here); a full-data
epoch (2,770 examples: `--examples 2770`) is about 5x the one measured with the default 512, so the share of
the save is smaller there: 1.05x at 2 epochs on 2 cores (0.43 s per save of a 152 MB state, an epoch of 11 s).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fkd_core.recipe import FitConfig
from fkd_core.resume import save_state
from fkd_core.train import fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, size=(args.examples, 144, 144), dtype=np.uint8)
    kp = rng.uniform(40, 104, size=(args.examples, 68, 2)).astype(np.float32)
    val = (crops[:64], kp[:64])
    params = FitConfig(epochs=args.epochs, patience=args.epochs + 1)
    with tempfile.TemporaryDirectory() as tmp:
        uri = str(Path(tmp) / "state.pt")
        saves: list[float] = []

        def save(state: dict) -> None:
            t0 = time.perf_counter()
            save_state(uri, state)
            saves.append(time.perf_counter() - t0)

        def timed(**kw) -> float:
            t0 = time.perf_counter()
            fit((crops, kp), val, params=params, inner=1 / 1.5, **kw)
            return time.perf_counter() - t0

        # interleaved, best of two each: the machine's drift is not taken for the state's cost
        plain = min(timed(), timed())
        saving = min(timed(on_state=save), timed(on_state=save))
        plain = min(plain, timed())
        size = Path(uri).stat().st_size
    print(json.dumps({
        "examples": args.examples,
        "epochs": args.epochs,
        "threads": torch.get_num_threads(),
        "seconds_without_state": round(plain, 2),
        "seconds_saving_state_each_epoch": round(saving, 2),
        "overhead_ratio": round(saving / plain, 3),
        "save_seconds_per_epoch": round(float(np.mean(saves)), 3),
        "state_mb": round(size / 1e6, 1),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
