"""Benchmark: Bonsai's static-int8 search (`quantize.static` with `search:`) against Microsoft
Olive's own search, on the same ONNX files and the same calibration images.

    python bench/quantize_search.py                       # the digits student, then CIFAR-10
    python bench/quantize_search.py --models digits       # only the digits student
    python bench/quantize_search.py --rounds 9 --cifar-train 10000 --cifar-epochs 3   # the defaults

Models: the default pipeline's student architecture (cnn_small: 2 stages of 2 convs, 32-64
channels) trained on sklearn's digits, and a CIFAR-10 ResNet-20 (the teacher of
experiment=cifar10_resnet) trained briefly on a subset of the CIFAR-10 JPEGs (`--data`, default
$BONSAI_CIFAR10_ROOT or ../shared/data/cifar10 beside the checkout): both through
`bonsai.build.run_stage` (cached in .cache/bench-quantize-search/), exported by export.onnx.
Their accuracy matters little here; the table says what it was.

Olive's side runs in its own environment, `.venv-olive` in the checkout (created on first use,
layered on .venv by a .pth file as the Makefile does for .venv-litert, `pip install
olive-ai==0.13.0`; `--olive-python` names another interpreter), in a subprocess
(bench/_olive_search.py): `OnnxStaticQuantization` with its default search space and the joint
sequential strategy, deciding with Olive's evaluator (accuracy goal: at most `--tolerance`
points below fp32 on the decision images; objective: its batch-1 latency, one thread). Both
sides calibrate on the same 512 training images (`calibration_images`, as the stage samples
them) and decide on the same images: the data's validation split (`data.val_size`, 10% of the
training images, never trained on).

Then, in this process: the fp32 parent, Bonsai at its preset's fixed settings, Bonsai's searched
pick and Olive's pick are timed in `--rounds` rounds of `measure_latency_paired` (each 10
alternating sub-rounds of 50 batch-1 runs per model, one onnxruntime thread); the table gives
each one's speedup over fp32 as median (min-max) over the rounds, bytes, and test accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's bonsai, not another installed copy
sys.path.insert(0, str(ROOT / "bench"))
from _common import CIFAR10_CACHE, CIFAR10_ROOT  # noqa: E402

OLIVE_ENV = ROOT / ".venv-olive"
OLIVE_VERSION = "0.13.0"
STORE = ROOT / ".cache" / "bench-quantize-search"
SEED = 0
CNN_SMALL = {"name": "cnn", "width": 32, "depth": 2, "convs_per_stage": 2}  # conf/student
RESNET20 = {"name": "resnet_cifar", "depth": 20, "width": 1.0}  # conf/teacher/resnet20.yaml


def olive_python(arg: str | None) -> str:
    """The interpreter of Olive's environment: `arg`, else .venv-olive, created if missing."""
    if arg:
        return arg
    py = OLIVE_ENV / "bin" / "python"
    ok = (
        py.exists()
        and subprocess.run([py, "-c", "import olive"], capture_output=True).returncode == 0
    )
    if not ok:
        print(f"creating .venv-olive (olive-ai=={OLIVE_VERSION}, layered on this environment)")
        subprocess.run([sys.executable, "-m", "venv", str(OLIVE_ENV)],
                       check=True)  # fmt: skip
        site = subprocess.run([py, "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        import site as _site

        Path(site, "bonsai-main.pth").write_text(_site.getsitepackages()[0] + "\n")
        subprocess.run([py, "-m", "pip", "install", "--quiet", f"olive-ai=={OLIVE_VERSION}"],
                       check=True)  # fmt: skip
    return str(py)


def digits_model(args):
    from bonsai.build import run_stage
    from bonsai.data import load_data

    data = load_data({"name": "digits"})
    spec = {"model": CNN_SMALL, "epochs": args.digits_epochs, "lr": 0.002}
    net = run_stage(STORE, "student", "train", spec, data, seed=SEED, evaluate=False, log=_quiet)
    onnx = run_stage(STORE, "onnx", "export.onnx", {}, data, input=net, seed=SEED,
                     evaluate=False, log=_quiet)  # fmt: skip
    return data, onnx.artifact, f"cnn_small, {args.digits_epochs} epochs on digits"


def cifar_model(args):
    from bonsai.build import run_stage
    from bonsai.data import load_data

    data = load_data(
        {
            "name": "imagefolder",
            "root": str(args.data),
            "image_size": 32,
            "channels": 3,
            "test_size": 0.2,
            "max_imbalance": 10.0,
            "cache_dir": str(args.cache),
            "split_seed": 0,
            "max_train": args.cifar_train,
            "max_test": args.cifar_test,
            "max_val": args.cifar_val,
            "heads": [],
        }
    )
    spec = {
        "model": RESNET20,
        "epochs": args.cifar_epochs,
        "lr": 0.15,
        "batch_size": 128,
        "weight_decay": 5.0e-4,
        "optimizer": "sgd",
        "augment": "shift_flip",
        "amp": True,
        "channels_last": True,
        "schedule": "onecycle",
        "warmup_epochs": 1.0,
    }
    net = run_stage(STORE, "resnet20", "train", spec, data, seed=SEED, evaluate=False, log=_quiet)
    onnx = run_stage(STORE, "resnet20_onnx", "export.onnx", {}, data, input=net, seed=SEED,
                     evaluate=False, log=_quiet)  # fmt: skip
    what = (
        f"ResNet-20, {args.cifar_epochs} epochs on {len(data.train_x):,} CIFAR-10 training images"
    )
    return data, onnx.artifact, what


def _quiet(msg: str) -> None:
    pass


class _Ctx:  # what calibration_images reads of a StageContext
    def __init__(self, data, seed):
        self.data, self.seed = data, seed


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def bench_model(name: str, data, onnx_art, what: str, args, py: str) -> dict:
    import numpy as np

    from bonsai.build import run_stage
    from bonsai.measure.latency import measure_latency_paired
    from bonsai.onnx_utils import run_logits, session
    from bonsai.stages.quantize_common import calibration_images

    work = Path(tempfile.mkdtemp(prefix=f"qsearch-{name}-"))
    calib = calibration_images(_Ctx(data, SEED), 512, 64)
    decide = (data.val_x.numpy(), data.val_y.numpy())  # what the stage decides on
    np.savez(work / "calib.npz", x=calib, y=np.zeros(len(calib), dtype=np.int64))
    np.savez(work / "decide.npz", x=decide[0], y=decide[1])
    fp32 = onnx_art.file
    print(f"\n## {name}: {what}; fp32 {fp32.stat().st_size:,} bytes", flush=True)

    # Olive: its own search, in its own environment.
    t0 = time.perf_counter()
    proc = subprocess.run(
        [py, str(ROOT / "bench" / "_olive_search.py"), str(fp32), str(work / "calib.npz"),
         str(work / "decide.npz"), str(work / "olive"), "--tolerance", str(args.tolerance)],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n")
        raise SystemExit(f"Olive's search failed (exit {proc.returncode})")
    olive = json.loads((work / "olive" / "result.json").read_text())
    olive["process_seconds"] = time.perf_counter() - t0
    print(f"olive: {olive['candidates']} candidates in {olive['search_seconds']:.1f} s", flush=True)

    # Bonsai: the preset's fixed settings, then the search (built every time: evaluate=False).
    t0 = time.perf_counter()
    fixed = run_stage(STORE, f"{name}_int8", "quantize.static", {"tolerance": args.tolerance},
                      data, input=onnx_art, seed=SEED, evaluate=False, log=_quiet)  # fmt: skip
    fixed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    params = {"tolerance": args.tolerance, "search": {"objective": args.objective}}
    searched = run_stage(STORE, f"{name}_int8_search", "quantize.static", params, data,
                         input=onnx_art, seed=SEED, evaluate=False, log=print)  # fmt: skip
    search_s = time.perf_counter() - t0
    files = {
        "fp32": fp32,
        "bonsai fixed": fixed.artifact.file,
        "bonsai search": searched.artifact.file,
        "olive search": Path(olive["pick"]),
    }
    # Side by side, in this process: --rounds rounds of alternating batch-1 timing.
    x1 = data.test_x[:1].numpy()
    sessions = {k: session(p, threads=1) for k, p in files.items()}
    p50: dict[str, list[float]] = {k: [] for k in files}
    for r in range(args.rounds):
        lat = measure_latency_paired(sessions, x1, rounds=10, per_round=50)
        for k in files:
            p50[k].append(lat[k]["latency_p50_ms"])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.4f} ms" for k, v in p50.items()),
              flush=True)  # fmt: skip
    y = data.test_y.numpy()
    dx, dy = decide
    acc, dacc = {}, {}
    for k, p in files.items():
        s = session(p, threads=2)
        acc[k] = 100 * float((run_logits(s, data.test_x).argmax(1) == y).mean())
        dacc[k] = 100 * float((run_logits(s, dx).argmax(1) == dy).mean())
    meta = searched.artifact.meta
    return {
        "name": name,
        "what": what,
        "files": {k: str(p) for k, p in files.items()},
        "bytes": {k: Path(p).stat().st_size for k, p in files.items()},
        "sha": {k: sha(p) for k, p in files.items()},
        "p50": p50,
        "acc": acc,
        "decision_acc": dacc,
        "olive": olive,
        "bonsai_candidates": meta["search_candidates"],
        "bonsai_settings": meta["search_settings"],
        "bonsai_search_s": search_s,
        "bonsai_fixed_s": fixed_s,
        "test_images": len(y),
        "decision_images": len(dy),
    }


def summarize(res: dict, tolerance: float) -> str:
    import numpy as np

    p50 = {k: np.array(v) for k, v in res["p50"].items()}
    speed = {k: p50["fp32"] / v for k, v in p50.items()}
    # Bonsai's pick against Olive's, round by round (same round, same load)
    vs = p50["olive search"] / p50["bonsai search"]
    olive = res["olive"]
    s = res["bonsai_settings"]
    ops = "all" if s["op_types"] is None else "+".join(s["op_types"])
    bonsai_set = (
        f"{'per-channel' if s['per_channel'] else 'per-tensor'}, "
        f"{'sym' if s['activation_symmetric'] else 'asym'} act, {s['calibrate_method']}, "
        f"ops {ops}, {s.get('quant_format', 'QDQ')}"
        + (f", {len(s['float_nodes'])} float" if s["float_nodes"] else "")
    )
    o = olive.get("pick_settings") or {}
    olive_set = ", ".join(f"{k}={v}" for k, v in o.items())
    rows = [
        ("fp32", "export.onnx", "-", "-"),
        ("bonsai fixed", "preset: per-channel, asym act, minmax, ops all, QDQ", "1",
         f"{res['bonsai_fixed_s']:.1f}"),
        ("bonsai search", bonsai_set, str(res["bonsai_candidates"]), f"{res['bonsai_search_s']:.1f}"),
        ("olive search", olive_set, str(olive["candidates"]), f"{olive['search_seconds']:.1f}"),
    ]  # fmt: skip
    out = [
        f"### {res['name']}: {res['what']}",
        "",
        f"Test accuracy on {res['test_images']:,} images; Δ against fp32 on the "
        f"{res['decision_images']} decision images both searches chose on (tolerance "
        f"{tolerance:g} points); p50 and speedup over fp32: median (min-max) of "
        f"{len(p50['fp32'])} rounds, batch 1, 1 thread, all four timed side by side.",
        "",
        "| variant | settings | bytes | test acc % | Δ decision pts | p50 ms | speedup vs fp32 "
        "| candidates | search s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, settings, n, secs in rows:
        sp = speed[k]
        out.append(
            f"| {k} | {settings} | {res['bytes'][k]:,} | {res['acc'][k]:.2f} | "
            f"{res['decision_acc'][k] - res['decision_acc']['fp32']:+.2f} | "
            f"{np.median(p50[k]):.4f} | {np.median(sp):.2f}x ({sp.min():.2f}-{sp.max():.2f}) | "
            f"{n} | {secs} |"
        )
    om = olive["pick_metrics"]
    oin = (olive.get("input_metrics") or {}).get("latency-avg", {}).get("value")
    own = f"{om.get('latency-avg', float('nan')):.4f} ms"
    if oin:
        own += f" against fp32 {oin:.4f} ms ({oin / om['latency-avg']:.2f}x), each timed once"
    same = res["sha"]["bonsai search"] == res["sha"]["olive search"]
    smaller = res["bytes"]["bonsai search"] <= res["bytes"]["olive search"]
    faster = float(np.median(vs)) >= 1.0
    within = res["decision_acc"]["fp32"] - res["decision_acc"]["bonsai search"] <= tolerance + 1e-9
    out += [
        "",
        f"Olive's own latency for its pick: {own}.",
        f"Bonsai's pick vs Olive's, per round (Olive p50 / Bonsai p50): median "
        f"{np.median(vs):.3f} (min {vs.min():.3f}, max {vs.max():.3f})"
        + ("; the two files are identical (sha256)" if same else "")
        + ".",
        f"Verdict: Bonsai's searched int8 at least as small as Olive's pick: "
        f"{'yes' if smaller else 'NO'} ({res['bytes']['bonsai search']:,} vs "
        f"{res['bytes']['olive search']:,} bytes); at least as fast (median of the rounds): "
        f"{'yes' if faster or same else 'NO'}; within the tolerance: {'yes' if within else 'NO'}.",
    ]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="digits,cifar", help="digits, cifar or both")
    ap.add_argument("--rounds", type=int, default=9, help="timing rounds (at least 3)")
    ap.add_argument("--tolerance", type=float, default=1.0, help="accuracy points, both sides")
    ap.add_argument("--objective", default="latency", choices=["latency", "bytes"])
    ap.add_argument("--digits-epochs", type=int, default=10)
    ap.add_argument("--cifar-epochs", type=int, default=3)
    ap.add_argument("--cifar-train", type=int, default=10000, help="CIFAR-10 training images")
    ap.add_argument("--cifar-test", type=int, default=2000, help="CIFAR-10 test images")
    ap.add_argument(
        "--cifar-val", type=int, default=1000, help="CIFAR-10 validation images (decided on)"
    )
    ap.add_argument("--data", type=Path, default=CIFAR10_ROOT, help="CIFAR-10 JPEG root")
    ap.add_argument("--cache", type=Path, default=CIFAR10_CACHE, help="decoded CIFAR-10 cache")
    ap.add_argument("--olive-python", help="an interpreter with olive-ai installed")
    args = ap.parse_args()
    if args.rounds < 3:
        raise SystemExit("--rounds must be at least 3: ratios are reported with their spread")
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    py = olive_python(args.olive_python)
    t0 = time.perf_counter()
    results = []
    for m in args.models.split(","):
        build = {"digits": digits_model, "cifar": cifar_model}[m.strip()]
        data, art, what = build(args)
        results.append(bench_model(m.strip(), data, art, what, args, py))
    print()
    for r in results:
        print(summarize(r, args.tolerance) + "\n")
    print(f"bench wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
