"""Olive's side of bench/quantize_search.py, run in the bench's own Olive environment
(.venv-olive, layered on .venv): Olive's own search over `OnnxStaticQuantization`'s search space
(its `search_defaults`: precision, per_channel, reduce_range, quant_preprocess, calibrate_method,
quant_format/activation_type) with the joint sequential strategy, deciding with Olive's own
evaluator: accuracy on the decision images (goal: at most `--tolerance` points below the fp32
model), latency (avg of Olive's default 10 warm-up + 20 timed batch-1 runs, one thread) as the
objective. Writes the picked model and what Olive measured into --out (result.json).

    .venv-olive/bin/python bench/_olive_search.py MODEL.onnx CALIB.npz DECIDE.npz OUT_DIR
"""

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import onnx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("decide")
    ap.add_argument("out")
    ap.add_argument("--tolerance", type=float, default=1.0, help="accuracy points")
    ap.add_argument("--calibration-batch", type=int, default=64)
    ap.add_argument("--dump-config", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    m = onnx.load(a.model, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    name = next(i.name for i in m.graph.input if i.name not in inits)
    script = str(Path(__file__).with_name("_olive_data.py"))

    def data(cfg_name: str, path: str, batch: int, post: bool = False) -> dict:
        d = {
            "name": cfg_name,
            "user_script": script,
            # Every component named: Olive 0.13 reads an untyped one as a resource path and fails.
            "load_dataset_config": {
                "type": "bonsai_arrays",
                "params": {"path": path, "input_name": name},
            },
            "pre_process_data_config": {"type": "skip_pre_process"},
            "post_process_data_config": {"type": "bonsai_argmax" if post else "skip_post_process"},
            "dataloader_config": {"type": "default_dataloader", "params": {"batch_size": batch}},
        }
        return d

    one_thread = {"session_options": {"intra_op_num_threads": 1, "inter_op_num_threads": 1}}
    config = {
        "input_model": {"type": "ONNXModel", "model_path": str(Path(a.model).resolve())},
        "systems": {
            "local": {
                "type": "LocalSystem",
                "accelerators": [
                    {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}
                ],
            }
        },
        "data_configs": [
            data("calib", a.calib, a.calibration_batch),
            data("decide", a.decide, 256, post=True),
            data("latency", a.decide, 1),
        ],
        "evaluators": {
            "bench": {
                "type": "OnnxEvaluator",
                "metrics": [
                    {
                        "name": "latency",
                        "type": "latency",
                        "data_config": "latency",
                        "sub_types": [{"name": "avg", "priority": 1}],
                        "user_config": {"inference_settings": {"onnx": one_thread}},
                    },
                    {
                        "name": "accuracy",
                        "type": "accuracy",
                        "data_config": "decide",
                        "sub_types": [
                            {
                                "name": "accuracy_score",
                                "priority": 2,
                                "goal": {"type": "max-degradation", "value": a.tolerance / 100},
                                "metric_config": {"task": "multiclass", "num_classes": 10},
                            }
                        ],
                        "user_config": {"inference_settings": {"onnx": one_thread}},
                    },
                ],
            }
        },
        "passes": {"quantization": {"type": "OnnxStaticQuantization", "data_config": "calib"}},
        "search_strategy": {"execution_order": "joint", "sampler": "sequential"},
        "evaluator": "bench",
        "host": "local",
        "target": "local",
        "cache_dir": str(out / "cache"),
        "output_dir": str(out / "olive"),
        "log_severity_level": 3,
        "evaluate_input_model": True,
    }
    if a.dump_config:
        print(json.dumps(config))
        return
    from olive.workflows import run as olive_run

    logging.getLogger("olive").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    wf = olive_run(config)
    wall = time.perf_counter() - t0
    best = wf.get_best_candidate()
    if best is None:
        raise SystemExit("Olive found no candidate meeting its accuracy goal")
    src = Path(best.model_path)
    src = src if src.is_file() else next(src.glob("*.onnx"))
    shutil.copy(src, out / "olive_pick.onnx")
    nodes = wf.footprint.nodes
    tried = [
        k for k, v in nodes.items() if v.parent_model_id is not None and v.from_pass is not None
    ]
    run_config = nodes[best.model_id].pass_run_config or {}
    keys = ("precision", "activation_type", "per_channel", "reduce_range", "quant_preprocess",
            "calibrate_method", "quant_format", "activation_symmetric", "weight_symmetric")  # fmt: skip
    settings = {k: run_config.get(k) for k in keys if k in run_config}
    result = {
        "search_seconds": wall,
        "candidates": len(tried),
        "evaluated": sum(1 for k in tried if nodes[k].metrics is not None),
        "pick": str(out / "olive_pick.onnx"),
        "pick_metrics": {k: v["value"] for k, v in best.metrics["value"].items()},
        "pick_settings": settings,
        "input_metrics": wf.get_input_model_metrics(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: result[k] for k in ("search_seconds", "candidates", "evaluated")}))


if __name__ == "__main__":
    main()
