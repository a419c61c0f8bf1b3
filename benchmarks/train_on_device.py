"""Train both stages of NaimishNet on a GPU, several recipes side by side, and keep the best per split.

The GPU is lent here only rarely, for minutes, on a machine without Prefect and without the training images,
so this runs ``fkd_core.train.fit`` (the train flow's own loop, with ``device="cuda"``) on a packed copy of
the ingested examples, and writes float16 stage weights plus every run's history. The checkpoints are then
assembled, and scored end to end on the real images, on a CPU machine (README, "Shipped checkpoint").

    python benchmarks/train_on_device.py pack EXAMPLES_PERSON EXAMPLES_FRAME .gpu/data.npz        # here
    python benchmarks/train_on_device.py main .gpu/data.npz OUT --only person-ft frame-scratch    # there
    python benchmarks/train_on_device.py assemble OUT/runs.json person-ft EXAMPLES_PERSON \
        saved_models/naimishnet.safetensors --stage2 OUT/person_0_person-ft_stage2.safetensors  # here

Runs of 2026-11-27 on an H200 (README): with v5 shipped, ``person-v5s1``, ``-seed1``, ``-noise``,
``person-v5-finetune`` (became v6) and ``frame-scratch``; with v6 shipped, ``person-ft`` (became v7),
``person-ft-pose``, ``person-s1-pose`` and ``frame-scratch-pose``.

``pack`` stores the canonical crops as JPEG (quality 90, mean absolute change 1.0 grey level, well under the
training intensity jitter) so the data fits the few tens of MiB that travel to the GPU machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import numpy as np

# Recipes: split, where stage 1 comes from ("scratch" or the shipped checkpoint's), stage 2's start ("stage1"'s
# weights or the shipped refining stage's), its alignment noise, learning rate, epochs and seed.
RUNS = {
    "person-scratch": {"split": "person", "stage1": "scratch", "stage2_init": "stage1"},
    "person-v5s1": {"split": "person", "stage1": "shipped", "stage2_init": "stage1"},
    "person-v5s1-seed1": {"split": "person", "stage1": "shipped", "stage2_init": "stage1", "seed": 1},
    "person-v5s1-noise": {
        "split": "person",
        "stage1": "shipped",
        "stage2_init": "stage1",
        "noise": {"shift_std": 0.12, "scale_std": 0.08, "rotate_std_deg": 6.0},
    },
    "person-v5-finetune": {"split": "person", "stage1": "shipped", "stage2_init": "shipped", "lr": 2e-4},
    "frame-scratch": {"split": "frame", "stage1": "scratch", "stage2_init": "stage1"},
    # profiles (|yaw| >= 0.5, a sixth of the faces) hold most validation failures: show them 3 times per epoch
    "person-ft-pose": {
        "split": "person",
        "stage1": "shipped",
        "stage2_init": "shipped",
        "lr": 2e-4,
        "epochs2": 105,  # the steps of 140 epochs without the repeats
        "profiles_x": 3,
    },
    "person-ft": {"split": "person", "stage1": "shipped", "stage2_init": "shipped", "lr": 2e-4, "epochs2": 140},
    "person-s1-pose": {
        "split": "person",
        "stage1": "shipped",
        "stage2_init": "stage1",
        "epochs2": 105,
        "profiles_x": 3,
    },
    "frame-scratch-pose": {
        "split": "frame",
        "stage1": "scratch",
        "stage2_init": "stage1",
        "epochs1": 60,
        "epochs2": 60,
        "profiles_x": 3,
    },
}


def pack(person: str, frame: str, out: str) -> None:
    from fkd_core.parquet_io import read_examples

    crops, kp, ids = read_examples(person)
    val_person = set(read_examples(person, "val")[2])
    fc, _, fids = read_examples(frame)
    val_frame = set(read_examples(frame, "val")[2])
    order = {i: j for j, i in enumerate(fids)}
    assert set(ids) == set(fids) and all((fc[order[i]] == crops[j]).all() for j, i in enumerate(ids))
    blobs = [cv2.imencode(".jpg", c, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for c in crops]
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    np.savez(
        out,
        jpeg=np.frombuffer(b"".join(blobs), np.uint8),
        offsets=offsets,
        keypoints=kp.astype(np.float32),
        val_person=np.array([i in val_person for i in ids]),
        val_frame=np.array([i in val_frame for i in ids]),
    )
    print(f"{out}: {len(ids)} examples, {os.path.getsize(out) / 2**20:.1f} MiB")


def load(data: str, split: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    d = np.load(data)
    buf, off = d["jpeg"], d["offsets"]
    crops = np.stack([cv2.imdecode(buf[off[i] : off[i + 1]], cv2.IMREAD_GRAYSCALE) for i in range(len(off) - 1)])
    val = d[f"val_{split}"]
    kp = d["keypoints"]
    return (crops[~val], kp[~val]), (crops[val], kp[val])


def run(data: str, name: str, out: str, device: str = "cuda") -> None:
    import torch
    from safetensors.torch import save_file

    from fkd_core.align import AlignPolicy
    from fkd_core.checkpoint import load_checkpoint
    from fkd_core.geometry import inner_fraction
    from fkd_core.metrics import PROFILE_YAW, yaw
    from fkd_core.train import FitConfig, fit, predict_canonical

    torch.set_num_threads(2)
    cv2.setNumThreads(1)
    spec = RUNS[name]
    t_start = time.perf_counter()
    work = Path(out) / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    train, val = load(data, spec["split"])
    if spec.get("profiles_x", 1) > 1:
        profiles = np.flatnonzero(np.abs(yaw(train[1])) >= PROFILE_YAW)
        idx = np.concatenate([np.arange(len(train[0])), np.tile(profiles, spec["profiles_x"] - 1)])
        train = (train[0][idx], train[1][idx])
    inner = inner_fraction()
    shipped = load_checkpoint() if "shipped" in (spec["stage1"], spec["stage2_init"]) else None
    log: dict = {"name": name, "spec": spec, "n_train": len(train[0]), "n_val": len(val[0])}

    def params(epochs: int, lr: float) -> FitConfig:
        # the shipped recipe (the library's defaults), run to the end: no early stopping
        return FitConfig(epochs=epochs, lr=lr, patience=10**6, seed=spec.get("seed", 0))

    if spec["stage1"] == "scratch":
        e1 = spec.get("epochs1", 100)
        first, h1 = fit(train, val, params=params(e1, 1e-3), inner=inner, device=device)
        log["stage1"] = h1.to_dict()
        save_file({k: v.half().contiguous() for k, v in first.state_dict().items()}, str(work / "stage1.safetensors"))
    else:
        first = shipped.model
    align = AlignPolicy(**spec.get("noise", {}))
    start = shipped.refine if spec["stage2_init"] == "shipped" else first
    start = copy.deepcopy(start)
    first_val = predict_canonical(first.to(device), val[0], inner)
    first = first.to("cpu")
    e2 = spec.get("epochs2", 120 if spec["stage1"] == "scratch" else 200)
    refine, h2 = fit(
        train,
        val,
        params=params(e2, spec.get("lr", 1e-3)),
        inner=inner,
        model=start,
        align=align,
        val_first=first_val,
        device=device,
    )
    log["stage2"] = h2.to_dict()
    log["align"] = align.to_dict()
    log["val_nme"] = h2.best.val_nme
    log["seconds"] = time.perf_counter() - t_start
    save_file({k: v.half().contiguous() for k, v in refine.state_dict().items()}, str(work / "stage2.safetensors"))
    (work / "log.json").write_text(json.dumps(log))
    print(f"{name}: val NME {h2.best.val_nme:.4f} (stage 2 best epoch {h2.best_epoch}/{e2}) in {log['seconds']:.0f} s")


def seconds_per_epoch(data: str, device: str) -> dict:
    """One full first-stage epoch and one refining-stage epoch, alone on the device, after a warm-up."""
    import torch

    from fkd_core.align import AlignPolicy
    from fkd_core.geometry import inner_fraction
    from fkd_core.train import FitConfig, fit

    train, val = load(data, "person")
    inner = inner_fraction()
    p = FitConfig(epochs=1)
    fit((train[0][:320], train[1][:320]), (val[0][:32], val[1][:32]), params=p, inner=inner, device=device)
    out = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "torch": torch.__version__}
    for stage, kw in (("stage1", {}), ("stage2", {"align": AlignPolicy()})):
        kw = kw | ({"val_first": val[1].astype(np.float64)} if kw else {})
        _, h = fit(train, val, params=p, inner=inner, device=device, **kw)
        out[f"{stage}_train_seconds"] = h.epochs[0].seconds
    print("seconds per epoch (training + validation), alone:", out)
    return out


def ensemble_nme(data: str, out: str, names: list[str], device: str) -> float:
    """Validation NME of the refining stages ``names`` (all for the shipped first stage), predictions averaged."""
    import torch
    from safetensors.torch import load_file

    from fkd_core.align import AlignPolicy, refine_passes
    from fkd_core.checkpoint import load_checkpoint
    from fkd_core.geometry import denormalise, inner_fraction
    from fkd_core.metrics import nme_per_face
    from fkd_core.model import NaimishNet
    from fkd_core.train import predict_canonical

    _, (crops, kp) = load(data, "person")
    shipped = load_checkpoint()
    nets = []
    for n in names:
        net = NaimishNet(shipped.refine.cfg)
        net.load_state_dict({k: v.float() for k, v in load_file(f"{out}/work/{n}/stage2.safetensors").items()})
        nets.append(net.to(device).eval())
    size = nets[0].cfg.input_size

    @torch.inference_mode()
    def predict(x: np.ndarray) -> np.ndarray:
        xb = torch.from_numpy(x[:, None].astype(np.float32) / 255.0).to(device)
        y = torch.stack([net(xb) for net in nets]).mean(0).cpu().numpy()
        return denormalise(y.reshape(len(x), -1, 2).astype(np.float64), size)

    first = predict_canonical(shipped.model.to(device), crops, inner_fraction())
    pred, _ = refine_passes(predict, crops, first, AlignPolicy(), size)
    return float(nme_per_face(pred, kp).mean())


def main(
    data: str, out: str, budget: float, device: str = "cuda", only: list[str] | None = None, timed: bool = True
) -> None:
    t0 = time.perf_counter()
    Path(out).mkdir(parents=True, exist_ok=True)
    timing = seconds_per_epoch(data, device) if timed else {}
    budget -= time.perf_counter() - t0
    names = only or list(RUNS)
    procs = {
        name: subprocess.Popen([sys.executable, __file__, "run", data, name, out, "--device", device]) for name in names
    }
    for name, p in procs.items():
        try:
            p.wait(timeout=max(1.0, budget + 60 - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            print(f"{name}: killed at the deadline")
    logs = {}
    for name in names:
        f = Path(out) / "work" / name / "log.json"
        if f.exists():
            logs[name] = json.loads(f.read_text())
    summary: dict = {"timing": timing, "runs": logs, "ensembles": {}}
    for n, log in sorted(logs.items(), key=lambda kv: kv[1]["val_nme"]):
        print(f"{n}: val NME {log['val_nme']:.4f}")
    # refining stages for the shipped first stage, best first: their ensembles, and the best two come back
    on_shipped = sorted(
        (n for n in logs if RUNS[n]["split"] == "person" and RUNS[n]["stage1"] == "shipped"),
        key=lambda n: logs[n]["val_nme"],
    )
    for k in range(2, len(on_shipped) + 1):
        try:
            summary["ensembles"][",".join(on_shipped[:k])] = e = ensemble_nme(data, out, on_shipped[:k], device)
            print(f"ensemble of the best {k}: val NME {e:.4f}")
        except Exception as exc:  # a measurement only: never lose the weights over it
            print("ensemble failed:", exc)
    for split in ("person", "frame"):
        keep_best(out, logs, split, on_shipped)
    (Path(out) / "runs.json").write_text(json.dumps(summary))
    shutil.rmtree(Path(out) / "work")


def keep_best(out: str, logs: dict, split: str, on_shipped: list[str]) -> None:
    """Copy the best run's stage weights of ``split`` out of the work directory (for the shipped first stage: the
    best two refining stages)."""
    done = [n for n in logs if RUNS[n]["split"] == split]
    if not done:
        return
    best = min(done, key=lambda n: logs[n]["val_nme"])
    print(f"best {split}: {best} {logs[best]['val_nme']:.4f}")
    keep = [(best, "stage1"), (best, "stage2")]
    if split == "person" and RUNS[best]["stage1"] == "shipped" and len(on_shipped) > 1:
        keep = [(on_shipped[0], "stage2"), (on_shipped[1], "stage2")]
    for i, (n, stage) in enumerate(keep):
        f = Path(out) / "work" / n / f"{stage}.safetensors"
        if f.exists():
            shutil.copy(f, Path(out) / f"{split}_{i}_{n}_{stage}.safetensors")


def assemble(
    runs_json: str,
    name: str,
    examples: str,
    base: str,
    stage2: str,
    stage1: str | None,
    out: str,
    gpu: str | None = None,
) -> str:
    """A checkpoint, as the train flow writes it, from a run's float16 stage weights: the first stage is
    ``stage1`` or ``base``'s, the refining stage ``stage2``; metrics are measured here on ``examples``' original
    validation crops. Prints and returns the model id."""
    import torch
    from safetensors.torch import load_file

    from fkd_core.align import AlignPolicy
    from fkd_core.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
    from fkd_core.geometry import CANONICAL_MARGIN, inner_fraction
    from fkd_core.model import NaimishNet
    from fkd_core.parquet_io import read_examples
    from fkd_core.train import History
    from fkd_core.train import checkpoint_val_nme as val_nme
    from fkd_flows.train import TrainConfig, checkpoint_record, data_fingerprint

    doc = json.loads(Path(runs_json).read_text())
    log = doc["runs"][name]
    spec = log["spec"]
    shipped = load_checkpoint(base)

    def net(f: str) -> NaimishNet:
        n = NaimishNet(shipped.model.cfg)
        n.load_state_dict({k: v.float() for k, v in load_file(f).items()})
        return n.eval()

    if (stage1 is None) != (spec["stage1"] == "shipped"):
        raise SystemExit(f"{name}: its first stage is {spec['stage1']!r}: give --stage1 exactly when it is 'scratch'")
    first = net(stage1) if stage1 else shipped.model
    refine = net(stage2)
    if stage1:
        h1 = log["stage1"]
        b1 = next(e for e in h1["epochs"] if e["epoch"] == h1["best_epoch"])
        first_meta = {
            "model_id": f"{name} first stage (trained in the same run, not saved alone)",
            "metrics": {k: b1[k] for k in ("train_mse", "val_mse", "val_nme")},
            "history": h1,
        }
        refine_of, init = f"{name}: its own first stage", None
    else:
        first_meta = shipped.meta.get("refine_of") or {"model_id": shipped.model_id, "metrics": shipped.meta["metrics"]}
        refine_of = f"first stage of {shipped.model_id}"
        init = f"{shipped.model_id} (its refining stage)" if spec["stage2_init"] == "shipped" else None
    fingerprint = data_fingerprint.fn(examples)
    val = read_examples(examples, "val")[:2]
    align = AlignPolicy(
        **spec.get("noise", {}),
        context_margin=fingerprint.get("canonical_margin") or CANONICAL_MARGIN,
        context_size=val[0].shape[-1],
    )
    nme = val_nme(LoadedModel(first, shipped.policy, shipped.detector, "", {}, refine, align), val, inner_fraction())
    cfg = TrainConfig(
        examples=examples,
        name=Path(out).name,
        out_dir=str(Path(out).parent),
        epochs=len(log["stage2"]["epochs"]),
        lr=spec.get("lr", 1e-3),
        patience=10**6,
        seed=spec.get("seed", 0),
        init=init,
        refine_of=refine_of,
        device="cuda",
    )
    history = History.from_dict(log["stage2"])
    meta = checkpoint_record(cfg, fingerprint, inner_fraction(), history, log["seconds"])
    meta["train"]["trained_on"] = (
        f"{gpu or (doc.get('timing') or {}).get('device', 'a GPU')} (benchmarks/train_on_device.py run {name}: "
        "fkd_core.train.fit, device='cuda'); history measured on the packed JPEG-q90 crops"
    )
    # validation NME re-measured here on the original crops (the history's is on the packed ones)
    meta["metrics"] |= {"val_nme": nme, "val_nme_packed_crops": history.best.val_nme}
    meta |= {"refine_of": first_meta, "float16_val_nme": nme}
    model_id = save_checkpoint(
        first,
        f"{out}.safetensors",
        policy=shipped.policy,
        detector=shipped.detector,
        meta=meta,
        dtype=torch.float16,
        refine=refine,
        align=align,
    )
    print(model_id, f"val NME {nme:.5f}")
    return model_id


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("person")
    p.add_argument("frame")
    p.add_argument("out")
    for cmd in ("main", "run"):
        p = sub.add_parser(cmd)
        p.add_argument("data")
        if cmd == "run":
            p.add_argument("name", choices=sorted(RUNS))
        p.add_argument("out")
        p.add_argument("--budget", type=float, default=330.0, help="runs still going after this + 60 s are killed")
        p.add_argument("--device", default="cuda")
        if cmd == "main":
            p.add_argument("--only", nargs="*")
            p.add_argument("--no-timing", action="store_true")
    p = sub.add_parser("assemble")
    p.add_argument("runs_json")
    p.add_argument("name", choices=sorted(RUNS))
    p.add_argument("examples", help="the ingested examples of the run's split (original crops)")
    p.add_argument("base", help="the checkpoint that was shipped when the run ran (its first stage, if not trained)")
    p.add_argument("--stage2", required=True)
    p.add_argument("--stage1")
    p.add_argument("--out", required=True, help="checkpoint path without .safetensors")
    p.add_argument("--gpu", help="the GPU it ran on, where runs.json has no timing to say")
    a = ap.parse_args()
    if a.cmd == "assemble":
        assemble(a.runs_json, a.name, a.examples, a.base, a.stage2, a.stage1, a.out, a.gpu)
    elif a.cmd == "pack":
        pack(a.person, a.frame, a.out)
    elif a.cmd == "main":
        main(a.data, a.out, a.budget, a.device, a.only, not a.no_timing)
    else:
        run(a.data, a.name, a.out, a.device)
