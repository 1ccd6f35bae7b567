"""``python -m keystep.tools.bench.gpu_check``: the one command a GPU user runs to validate the TensorRT path.

For a tiny DiT and a tiny UNet (the shipped digits-dit and digits-sd, so nothing is downloaded) it builds the bundle
and its engines, checks every engine against ONNX Runtime CPU at its profile's min/opt/max batch, runs the default
plan and the baseline through the TensorRT backend with and without CUDA graphs (and on ONNX Runtime CPU for
reference), and prints one table. Exit code 0 if every engine is within tolerance, 1 if not, 2 if this machine has
no TensorRT or GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import Bundle, StageSpec
from keystep.runtime.engine_plan import EngineIndex
from keystep.runtime.sampler import SamplingOptions
from keystep.runtime.samplers import sampler_for

MODELS = ("digits-dit", "digits-sd")
# relative L2 error of an engine vs ONNX Runtime CPU: float32 graphs (TF32 off) vs fp16/bf16 graphs
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}


def stage_inputs(bundle: Bundle, spec: StageSpec, axes: dict, batch: int, rng) -> dict[str, np.ndarray]:
    """Valid random inputs: class labels and token ids in range, timesteps in the training range."""
    cfg = bundle.model_config
    feeds = {}
    for io in spec.inputs:
        shape = io.concrete({**axes, "batch": batch})
        if io.name == "class_label":
            feeds[io.name] = rng.integers(0, cfg["num_classes"] + 1, shape).astype(np.int64)
        elif io.name == "input_ids":
            feeds[io.name] = rng.integers(0, cfg.get("vocab_size", 1000), shape).astype(np.int64)
        elif io.name == "timestep":
            feeds[io.name] = rng.uniform(0, 999, shape).astype(np.float32)
        elif io.name == "controlnet_cond":
            feeds[io.name] = rng.uniform(0, 1, shape).astype(np.float32)
        else:
            feeds[io.name] = rng.standard_normal(shape).astype(io.dtype)
    return feeds


def check_engines(bundle: Bundle, trt_backend, seed: int = 0) -> list[dict]:
    """Every engine at its profile's min/opt/max batch vs ONNX Runtime CPU on the same inputs."""
    cpu = get_backend("onnxruntime")
    index = EngineIndex.load(bundle.root)
    rng = np.random.default_rng(seed)
    rows = []
    for stage, entry in index.engines.items():
        spec = bundle.stage(stage)
        precision = bundle.manifest["stages"][stage].get("precision", {}).get("type", "fp32")
        trt_runner, cpu_runner = trt_backend.load(spec), cpu.load(spec)
        for batch in sorted({entry.profile["min"], entry.profile["opt"], entry.profile["max"]}):
            feeds = stage_inputs(bundle, spec, index.axes, batch, rng)
            got, want = trt_runner.run(feeds), cpu_runner.run(feeds)
            worst = max(rel_l2(got[k], want[k]) for k in want if want[k].dtype.kind == "f")
            rows.append({"stage": stage, "batch": batch, "precision": precision, "rel_l2": worst,
                         "ok": worst <= TOLERANCE[precision]})
    return rows


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / max(np.linalg.norm(want), 1e-12))


def time_plans(bundle: Bundle, backends: dict, plans: tuple[str, ...], repeats: int) -> list[dict]:
    """Median seconds per generate call of each plan on each backend (one warm-up run first: it captures the
    CUDA graphs), and the final latents' error vs ONNX Runtime CPU."""
    rows = []
    reference = {}
    for name, backend in backends.items():
        sampler = sampler_for(bundle, backend)
        for spec in plans:
            options = SamplingOptions.from_bundle(bundle)
            options = options if spec == "default" else options.with_plan(spec)

            def run():
                if bundle.family == "unet":
                    return sampler.sample(["a handwritten digit 3"], options, seed=0).latents
                return sampler.sample([3], options, seed=0).latents

            latents = run()
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                latents = run()
                seconds.append(time.perf_counter() - start)
            reference.setdefault(spec, latents)
            stats = getattr(backend, "stats", lambda: {})()
            rows.append({"plan": options.plan_spec, "backend": name, "seconds": statistics.median(seconds),
                         "latent_rel_l2": rel_l2(latents, reference[spec]), "cuda_graphs": stats.get("cuda_graphs")})
    return rows


def format_report(model: str, engines: list[dict], timings: list[dict]) -> str:
    lines = [f"== {model}", f"  {'engine':<14} {'batch':>5} {'precision':<9} {'rel L2 vs ORT CPU':>18}  ok"]
    for r in engines:
        lines.append(f"  {r['stage']:<14} {r['batch']:>5} {r['precision']:<9} {r['rel_l2']:>18.2e}  "
                     f"{'yes' if r['ok'] else 'NO'}")
    lines.append(f"  {'plan':<16} {'backend':<22} {'ms/image':>9} {'vs ORT CPU':>10} {'graphs':>6} {'latent rel L2':>13}")
    cpu = {r["plan"]: r["seconds"] for r in timings if r["backend"] == "onnxruntime CPU"}
    for r in timings:
        graphs = "-" if r["cuda_graphs"] is None else str(r["cuda_graphs"])
        lines.append(f"  {r['plan']:<16} {r['backend']:<22} {r['seconds'] * 1e3:>9.1f} "
                     f"{cpu[r['plan']] / r['seconds']:>9.2f}x {graphs:>6} {r['latent_rel_l2']:>13.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keystep.tools.bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="keystep-gpu-check", help="where bundles and engines go (reused)")
    parser.add_argument("--model", action="append", help=f"models to check (default: {', '.join(MODELS)})")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    from keystep.export.build import build_bundle
    from keystep.graphs.trt_build import EngineBuildError, build_engines, tensorrt_environment
    from keystep.runtime.engine_plan import EngineTargets

    try:
        environment = tensorrt_environment(args.device)
    except EngineBuildError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    print(f"TensorRT {environment[0]} on {environment[1]}")
    results, ok = {}, True
    for model in args.model or MODELS:
        out = Path(args.dir) / model
        if not (out / "manifest.json").is_file():
            build_bundle(model, str(out), progress=lambda m: print(m, file=sys.stderr))
        build_engines(out, EngineTargets(), environment=environment)
        bundle = Bundle.load(out)
        backends = {"onnxruntime CPU": get_backend("onnxruntime"),
                    "tensorrt": get_backend("tensorrt", device_id=args.device, cuda_graphs=False),
                    "tensorrt + CUDA graphs": get_backend("tensorrt", device_id=args.device, cuda_graphs=True)}
        try:
            engines = check_engines(bundle, backends["tensorrt"])
            timings = time_plans(bundle, backends, ("default", "all"), args.repeats)
        finally:
            for name in ("tensorrt", "tensorrt + CUDA graphs"):
                backends[name].close()  # graphs, contexts, buffers, stream: the next model starts clean
        print(format_report(model, engines, timings))
        results[model] = {"engines": engines, "timings": timings}
        ok = ok and all(r["ok"] for r in engines)
    if args.json:
        Path(args.json).write_text(json.dumps({"tensorrt": environment[0], "gpu": environment[1], **results}, indent=2))
    print("all engines match ONNX Runtime CPU" if ok else "SOME ENGINES DIFFER from ONNX Runtime CPU (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
