"""Annotate throughput against its floor, and peak memory on a large corpus.

    python benchmarks/bench_annotate.py ratio    [--n 2400] [--shard-size 500] [--detectors yunet] [--photos-12mp 4]
    python benchmarks/bench_annotate.py memory   [--n 20000] [--detectors yunet]
    python benchmarks/bench_annotate.py batching [--n 1000] [--shard-size 500] [--detectors yunet]
    python benchmarks/bench_annotate.py dask     [--n 1000] [--shard-size 250]
    python benchmarks/bench_annotate.py memory16 [--n 4] [--code-root ../other-checkout]
    python benchmarks/bench_annotate.py versus   [--n 1200] --code-root ../other-checkout [--rounds 2]
    python benchmarks/bench_annotate.py startup  [--code-root ../other-checkout] [--rounds 2]

`ratio` times, in one process and one run, a bare loop of read + decode + Haar (the floor of this design:
every image must be decoded and searched for faces) and the full annotate flow on the same images; it reports
both rates and flow/loop; with ``--detectors`` also the flow with each of those detectors and its rate over the
default flow's, and with ``--photos-12mp N`` every path's rate on N copies of the three photos scaled to 12 MP.
`memory` runs the flow over N images (the training set repeated under new names)
in a child process and reports that process's peak RSS. `batching` times one shard's work (fkd_core, no
Prefect) with the model on a thread of its own at one ONNX Runtime thread (what annotate does) against the model on
every core, alternating A/B/A/B in one run, for the default detector and each of ``--detectors``.
`dask` starts a local scheduler and two one-thread workers (as separate processes, on 127.0.0.1) and times the
flow on them cold (fresh workers: the model is loaded when the run registers it) and warm (a second run), against
the local runner on the same images, and counts the workers' "Event loop was unresponsive" warnings.
`versus` times the flow of this checkout and of another (each with its own shipped model, in its own process,
alternating A/B/A/B on the same images) and reports each one's images/s and this/other. `startup` times
`fkd annotate` on one photo from process start to its first row on disk and to its exit, for this checkout and
another, and says whether inference imports torch.
Images come from ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "facial-keypoints" / "training"


def make_corpus(src: Path, n: int, dst: Path) -> Path:
    """`n` images under `dst` as symlinks to `src` (repeated under new names when n exceeds the source)."""
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    dst.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        f = files[i % len(files)]
        (dst / f"{i // len(files):02d}_{f.name}").symlink_to(f)
    return dst


def bare_loop(uris: list[str], detector) -> float:
    """Images per second of read + decode + Haar, nothing else."""
    from fkd_core.detect import detect_faces

    t0 = time.perf_counter()
    for u in uris:
        with open(u, "rb") as f:
            data = f.read()
        gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        detect_faces(gray, detector)
    return len(uris) / (time.perf_counter() - t0)


def run_flow(source: str, out: str, shard_size: int, model: str, detector: str | None = None) -> float:
    return run_flow_doc(source, out, shard_size, model, detector)[0]


def run_flow_doc(source: str, out: str, shard_size: int, model: str, detector: str | None = None) -> tuple[float, dict]:
    from fkd_flows.annotate import annotate

    t0 = time.perf_counter()
    doc = annotate(source=source, out=out, shard_size=shard_size, model=model, run_id="bench", detector=detector)
    seconds = time.perf_counter() - t0
    return doc["counts_this_attempt"]["images"] / seconds, doc


def photos_12mp(dst: Path, copies: int) -> Path:
    """The three demo photos scaled up to 12 megapixels (``copies`` of each, under new names)."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted((ROOT.parent / "shared" / "data" / "photos").glob("*.jpg")):
        if p.name.startswith("landmarks"):
            continue
        img = cv2.imread(str(p))
        h, w = img.shape[:2]
        s = (12e6 / (h * w)) ** 0.5
        big = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_CUBIC)
        ok, data = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 92])
        for i in range(copies):
            (dst / f"{i:02d}_{p.name}").write_bytes(data.tobytes())
    return dst


def ratio(args) -> dict:
    from fkd_core.checkpoint import load_checkpoint
    from fkd_core.image_io import list_images
    from fkd_flows.annotate import annotate

    detector = load_checkpoint(args.model).detector
    with tempfile.TemporaryDirectory() as tmp:
        corpus = make_corpus(Path(args.images), args.n, Path(tmp) / "in")
        uris = list_images(str(corpus))
        # warm up: the Prefect API, the model export, the page cache
        annotate(source=uris[0], out=f"{tmp}/warm", model=args.model)
        bare_loop(uris[:200], detector)
        loop1 = bare_loop(uris, detector)
        results = {}
        for shard in args.shard_size:
            results[shard] = run_flow(str(corpus), f"{tmp}/out{shard}", shard, args.model)
        others = {}  # another detector's flow on the same images, and both on 12 MP photos
        for det in args.detectors:
            annotate(source=uris[0], out=f"{tmp}/warm-{det}", model=args.model, detector=det)
            others[det] = run_flow(str(corpus), f"{tmp}/det-{det}", args.shard_size[0], args.model, det)
        big = {}
        if args.photos_12mp:
            photos = photos_12mp(Path(tmp) / "12mp", args.photos_12mp)
            for det in [None, *args.detectors]:
                rate, doc = run_flow_doc(str(photos), f"{tmp}/12mp-{det}", args.shard_size[0], args.model, det)
                big[det or "default"] = {"images_per_s": round(rate, 2), "faces": doc["counts"]["faces"],
                                         "images": doc["counts"]["images"]}  # fmt: skip
        other = {}
        if args.compare_model:  # e.g. a one-stage checkpoint against the shipped two-stage one, same run
            annotate(source=uris[0], out=f"{tmp}/warm2", model=args.compare_model)
            for shard in args.shard_size:
                other[shard] = run_flow(str(corpus), f"{tmp}/cmp{shard}", shard, args.compare_model)
        loop2 = bare_loop(uris, detector)
    loop = (loop1 + loop2) / 2
    return (
        {
            "images": args.n,
            "cpu_cores": os.cpu_count(),
            "bare_loop_images_per_s": round(loop, 1),
            "bare_loop_runs": [round(loop1, 1), round(loop2, 1)],
            "flow_images_per_s": {str(k): round(v, 1) for k, v in results.items()},
            "flow_over_loop": {str(k): round(v / loop, 3) for k, v in results.items()},
        }
        | (
            {
                "detectors_flow_images_per_s": {k: round(v, 1) for k, v in others.items()},
                "detectors_over_default_flow": {
                    k: round(v / results[args.shard_size[0]], 3) for k, v in others.items()
                },
            }
            if others
            else {}
        )
        | ({"photos_12mp": big} if big else {})
        | (
            {
                "compare_model": args.compare_model,
                "compare_flow_images_per_s": {str(k): round(v, 1) for k, v in other.items()},
                "compare_flow_over_loop": {str(k): round(v / loop, 3) for k, v in other.items()},
            }
            if other
            else {}
        )
    )


def batching(args) -> dict:
    """One shard's work (fkd_core, no Prefect) with the model on a thread of its own at one ONNX Runtime thread (what
    annotate runs) against the model on all cores, alternating A/B/A/B on the same images, for each detector."""
    from fkd_core.annotate import MODEL_THREADS, ShardConfig, annotate_images, read_window
    from fkd_core.image_io import list_images
    from fkd_core.predict import Predictor
    from fkd_core.storage import iter_read

    shard = args.shard_size[0]
    settings = ShardConfig()
    out: dict = {"images": args.n, "shard_size": shard, "cpu_cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        uris = list_images(str(make_corpus(Path(args.images), args.n, Path(tmp) / "in")))
        shards = [uris[i : i + shard] for i in range(0, len(uris), shard)]
        for det in [None, *args.detectors]:
            variants = {
                f"model on {MODEL_THREADS} thread": Predictor.from_checkpoint(args.model, detector=det,
                                                                             threads=MODEL_THREADS),
                "model on every core": Predictor.from_checkpoint(args.model, detector=det),
            }  # fmt: skip
            seconds = {k: 0.0 for k in variants}
            for pred in variants.values():
                annotate_images(iter_read(uris[:64]), pred, settings)  # warm up: sessions, page cache
            for _ in range(2):
                for name, pred in variants.items():
                    t0 = time.perf_counter()
                    for s in shards:
                        annotate_images(iter_read(s, window=read_window(settings)), pred, settings)
                    seconds[name] += time.perf_counter() - t0
            rate = {k: 2 * len(uris) / v for k, v in seconds.items()}
            one, every = rate.values()
            out[det or "default"] = {"images_per_s": {k: round(v, 1) for k, v in rate.items()},
                                     "one_over_every": round(one / every, 3)}  # fmt: skip
    return out


def _wait_http(url: str, timeout: float = 120.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dask_cluster_vs_local(args) -> dict:
    import signal

    from distributed import Client

    from fkd_core.image_io import list_images

    shard = args.shard_size[0] if args.shard_size != [500] else 250
    bindir = Path(sys.executable).parent
    procs: list[subprocess.Popen] = []
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            # one Prefect server for the flow and the workers, as in production (a worker without
            # PREFECT_API_URL would start a temporary server of its own)
            api_port = _free_port()
            env = os.environ | {"PREFECT_HOME": f"{tmp}/prefect", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
            cmd = [str(bindir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(api_port)]
            procs.append(subprocess.Popen(cmd, env=env, **quiet))
            os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{api_port}/api"
            _wait_http(f"http://127.0.0.1:{api_port}/api/health")
            from fkd_flows.annotate import annotate  # Prefect reads PREFECT_API_URL when it is first imported

            corpus = make_corpus(Path(args.images), args.n, Path(tmp) / "in")
            n = len(list_images(str(corpus)))
            # warm this process and the page cache the same way for both runners
            annotate(source=str(next(corpus.iterdir())), out=f"{tmp}/warm", model=args.model)
            t0 = time.perf_counter()
            local = annotate(source=str(corpus), out=f"{tmp}/local", shard_size=shard, model=args.model, run_id="l")
            local_s = time.perf_counter() - t0
            port = _free_port()
            address = f"tcp://127.0.0.1:{port}"
            logs = [Path(tmp) / f"w{i}.log" for i in range(2)]
            procs.append(subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                           str(port), "--no-dashboard"], **quiet))  # fmt: skip
            for log in logs:
                cmd = [str(bindir / "dask"), "worker", address, "--nthreads", "1", "--host", "127.0.0.1"]
                procs.append(subprocess.Popen([*cmd, "--no-dashboard"], stdout=subprocess.DEVNULL,
                                              stderr=open(log, "w")))  # fmt: skip
            with Client(address, timeout=60) as c:
                c.wait_for_workers(2, timeout=120)
            runs = {}
            for name in ("cold", "warm"):
                t0 = time.perf_counter()
                doc = annotate(source=str(corpus), out=f"{tmp}/{name}", shard_size=shard, model=args.model,
                               run_id=name, dask_address=address)  # fmt: skip
                runs[name] = (time.perf_counter() - t0, doc)
            unresponsive = sum(log.read_text().count("Event loop was unresponsive") for log in logs)
            temporary = sum(log.read_text().count("Starting temporary server") for log in logs)
        finally:
            os.environ.pop("PREFECT_API_URL", None)
            for p in reversed(procs):
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(timeout=60)
    rate = {"local": n / local_s} | {k: n / v[0] for k, v in runs.items()}
    return {
        "images": n,
        "shard_size": shard,
        "cpu_cores": os.cpu_count(),
        "faces": {"local": local["counts"]["faces"]} | {k: v[1]["counts"]["faces"] for k, v in runs.items()},
        "seconds": {"local": round(local_s, 1)} | {k: round(v[0], 1) for k, v in runs.items()},
        "images_per_s": {k: round(v, 1) for k, v in rate.items()},
        "dask_warm_over_local": round(rate["warm"] / rate["local"], 3),
        "dask_cold_over_warm": round(rate["cold"] / rate["warm"], 3),
        "worker_event_loop_unresponsive_warnings": unresponsive,
        "workers_that_started_a_temporary_prefect_server": temporary,
    }


def deep_png_corpus(dst: Path, n: int = 4, side: int = 7000) -> Path:
    """``n`` 16-bit RGBA PNGs of ``side`` x ``side`` (49 MP, under the 50 MP cap): a few hundred KB each on disk,
    392 MB each once decoded at full depth. A face is pasted in so the model runs too."""
    dst.mkdir(parents=True, exist_ok=True)
    face = cv2.imread(str(ROOT / "data" / "sample" / "photos" / "obamas.jpg"))
    frame = np.full((side, side, 4), 30000, np.uint16)
    h, w = face.shape[:2]
    frame[:h, :w, :3] = face.astype(np.uint16) * 257
    frame[:, :, 3] = 65535
    ok, png = cv2.imencode(".png", frame)
    assert ok
    for i in range(n):
        (dst / f"deep_{i}.png").write_bytes(png.tobytes())
    return dst


def memory16(args) -> dict:
    """Peak RSS of annotating four 16-bit RGBA 7000 x 7000 PNGs: this checkout, and (with --code-root) another."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = deep_png_corpus(Path(tmp) / "in", args.n)
        file_kb = round(sum(p.stat().st_size for p in corpus.iterdir()) / len(list(corpus.iterdir())) / 1024, 1)
        roots = {"this checkout": ROOT} | ({"other checkout": Path(args.code_root)} if args.code_root else {})
        out = {"images": args.n, "png_kb_each": file_kb, "cpu_cores": os.cpu_count()}
        for name, root in roots.items():
            code = (
                "import json, resource, time\n"
                "from flows.annotate import annotate\n"  # the checkout's own folder (PYTHONPATH), not the install
                "t0 = time.perf_counter()\n"
                f"doc = annotate(source={str(corpus)!r}, out={tmp + '/out-' + name.split()[0]!r}, "
                f"model={str(root / 'saved_models' / 'naimishnet.safetensors')!r})\n"
                "print(json.dumps({'counts': doc['counts'], 'seconds': time.perf_counter() - t0, "
                "'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
            )
            env = os.environ | {"PYTHONPATH": str(root)}
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            doc = json.loads(proc.stdout.strip().splitlines()[-1])
            out[name] = {"peak_rss_mb": round(doc["peak_rss_mb"], 1), "seconds": round(doc["seconds"], 1),
                         "counts": doc["counts"]}  # fmt: skip
    return out


def versus(args) -> dict:
    """Annotate throughput of this checkout against another, alternating runs in child processes."""
    if not args.code_root:
        raise SystemExit("versus needs --code-root (another checkout of fkd)")
    roots = {"this": ROOT, "other": Path(args.code_root).resolve()}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = make_corpus(Path(args.images), args.n, Path(tmp) / "in")
        rates: dict[str, list[float]] = {k: [] for k in roots}
        models: dict[str, str] = {}
        for r in range(args.rounds):
            for name, root in roots.items():
                code = (
                    "import json, time\n"
                    "import fkd_core\n"
                    "from flows.annotate import annotate\n"  # the checkout's own folder (PYTHONPATH)
                    f"annotate(source={str(corpus)!r} + '/' + sorted(__import__('os').listdir({str(corpus)!r}))[0], "
                    f"out={tmp + f'/warm-{name}-{r}'!r})\n"
                    "t0 = time.perf_counter()\n"
                    f"doc = annotate(source={str(corpus)!r}, out={tmp + f'/out-{name}-{r}'!r}, "
                    f"shard_size={args.shard_size[0]})\n"
                    "print(json.dumps({'images': doc['counts_this_attempt']['images'], "
                    "'seconds': time.perf_counter() - t0, 'code': fkd_core.__file__, 'model': doc['model_id']}))\n"
                )
                env = {k: v for k, v in os.environ.items() if k != "FKD_MODEL"} | {"PYTHONPATH": str(root)}
                proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
                if proc.returncode:
                    raise SystemExit(proc.stderr[-3000:])
                doc = json.loads(proc.stdout.strip().splitlines()[-1])
                if not doc["code"].startswith(str(root)):
                    raise SystemExit(f"{name} ran {doc['code']}, not the code under {root}")
                models[name] = doc["model"]
                rates[name].append(doc["images"] / doc["seconds"])
    mean = {k: sum(v) / len(v) for k, v in rates.items()}
    return {
        "images": args.n,
        "cpu_cores": os.cpu_count(),
        "other": str(roots["other"]),
        "models": models,
        "images_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "this_over_other": round(mean["this"] / mean["other"], 3),
    }


def startup(args) -> dict:
    """Seconds from ``fkd annotate`` process start to its first row on disk (the first ``images`` part) and to its
    exit, for one photo: this checkout against another (``--code-root``), alternating, with one Prefect home that an
    untimed run has set up (the temporary server's database already made)."""
    roots = {"this": ROOT} | ({"other": Path(args.code_root).resolve()} if args.code_root else {})
    photo = str(ROOT / "data" / "sample" / "photos" / "obamas.jpg")
    out: dict = {"cpu_cores": os.cpu_count(), "image": photo}
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("FKD_MODEL", "PREFECT_API_URL")}
        env |= {"PREFECT_HOME": f"{tmp}/prefect", "PREFECT_LOGGING_LEVEL": "WARNING"}
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in roots}
        for r in range(args.rounds + 1):
            for name, root in roots.items():
                dest = Path(tmp) / f"out-{name}-{r}"
                cmd = [sys.executable, "-m", "flows.cli", "annotate", photo, str(dest)]  # the checkout's own folder
                t0 = time.perf_counter()
                proc = subprocess.Popen(cmd, cwd=root, env=env | {"PYTHONPATH": str(root)}, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)  # fmt: skip
                first = None
                while proc.poll() is None:
                    if first is None and any((dest / "images").glob("run_id=*/part-*.parquet")):
                        first = time.perf_counter() - t0
                    time.sleep(0.01)
                total = time.perf_counter() - t0
                if proc.returncode:
                    raise SystemExit(proc.stderr.read().decode()[-3000:])
                if r:  # round 0 sets the Prefect home up
                    times[name].append((first or total, total))
        for name, t in times.items():
            out[name] = {
                "first_row_s": [round(a, 2) for a, _ in t],
                "exit_s": [round(b, 2) for _, b in t],
                "imports_torch": "torch" in subprocess.run(
                    [sys.executable, "-c", "import sys, flows.annotate, fkd_core.predict as p; "
                     "p.Predictor.from_checkpoint(); print(' '.join(sys.modules))"],
                    cwd=roots[name], env=env | {"PYTHONPATH": str(roots[name])}, capture_output=True, text=True,
                ).stdout.split(),
            }  # fmt: skip
    return out


def memory(args) -> dict:
    detector = args.detectors[0] if args.detectors else None
    with tempfile.TemporaryDirectory() as tmp:
        corpus = make_corpus(Path(args.images), args.n, Path(tmp) / "in")
        code = (
            "import json, resource, time\n"
            "from fkd_flows.annotate import annotate\n"
            "t0 = time.perf_counter()\n"
            f"doc = annotate(source={str(corpus)!r}, out={tmp + '/out'!r}, "
            f"shard_size={args.shard_size[0]}, model={args.model!r}, detector={detector!r})\n"
            "print(json.dumps({'images': doc['counts_this_attempt']['images'], "
            "'faces': doc['counts_this_attempt']['faces'], 'seconds': time.perf_counter() - t0, "
            "'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    doc["images_per_s"] = round(doc["images"] / doc["seconds"], 1)
    doc["peak_rss_mb"] = round(doc["peak_rss_mb"], 1)
    doc["largest_child_peak_rss_mb"] = round(children, 1)
    doc["shard_size"] = args.shard_size[0]
    doc["detector"] = detector or "the model's own"
    return doc


def main() -> None:
    from fkd_core.checkpoint import DEFAULT_MODEL

    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["ratio", "memory", "memory16", "batching", "dask", "versus", "startup"])
    ap.add_argument("--rounds", type=int, default=2, help="versus: A/B rounds")
    ap.add_argument("--code-root", default=None, help="memory16: also measure this other checkout of fkd")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--shard-size", type=int, nargs="+", default=[500])
    ap.add_argument("--images", default=str(DEFAULT_IMAGES))
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--compare-model", default=None, help="also time the flow with this checkpoint")
    ap.add_argument("--detectors", nargs="*", default=[], help="ratio: also time the flow with these detectors")
    ap.add_argument("--photos-12mp", type=int, default=0, help="ratio: also time N copies of each photo at 12 MP")
    args = ap.parse_args()
    args.n = (
        args.n
        or {
            "ratio": 2400,
            "memory": 20000,
            "memory16": 4,
            "batching": 1000,
            "dask": 1000,
            "versus": 1200,
            "startup": 1,
        }[args.mode]
    )
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    modes = {"ratio": ratio, "memory": memory, "memory16": memory16, "batching": batching, "versus": versus}
    modes["startup"] = startup
    modes["dask"] = dask_cluster_vs_local
    print(json.dumps(modes[args.mode](args), indent=2))


if __name__ == "__main__":
    main()
