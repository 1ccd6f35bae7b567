"""CPU backends and precisions on one workload: ONNX Runtime fp32 vs OpenVINO f32 vs OpenVINO bf16 (static or
dynamic shapes) vs eager diffusers (and, for the UNet, optimum-intel's OpenVINO pipeline), each engine in its own
process.

    python -m keystep.tools.bench.cpu [--workload dit|unet] [--steps 50] [--repeats 3] [--work DIR]
                                      [--engines eager ort-fp32 ov-f32 ov-bf16 ...] [--peer-python PY] [--markdown F]

``dit``: two bundles of one DyDiT-format model (``--model``, default ``random:dydit-s2`` = DiT-S/2 with designed
routers; ``--width none``: the dense DiT, and its width profiles with gathered token selection) and four plans per
engine: dense ``all`` (baseline), dense ``default`` (key steps), widths ``all``, widths ``default``. The eager row is
diffusers' ``DiTTransformer2DModel`` of the same architecture with random weights. ``unet``: the reduced SD UNet of
``bench.unet`` (built with DeepCache's branch 0) at ``--size`` px, CFG 7.5; plans ``all``, ``default`` and
``deep0:uniform:3``; the eager row is diffusers' ``StableDiffusionPipeline`` and the peer rows optimum-intel's
``OVStableDiffusionPipeline`` reshaped to static shapes (f32 and bf16), run by ``--peer-python`` (a separate venv
with ``optimum-intel[openvino]``: its pins must not enter keystep's), see ``bench/optimum_peer.py``.

Each engine runs in a fresh Python process (``--one ENGINE``), its rows interleaved over rounds (the first a
warm-up that also compiles), so no library's thread pool disturbs another's rows. Reports medians, ratios to eager,
speedups against their FLOP bounds, per-stage time, and the final latents' error against ONNX Runtime fp32 (same
z_T).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import cpu_name, emit

# workload -> column -> (bundle, plan in SamplingOptions.with_plan's notation)
COLUMNS = {
    "dit": {
        "baseline `all`": ("dense", "all"),
        "key-step `default`": ("dense", "default"),
        "widths `all`": ("gather", "all"),
        "widths + `default`": ("gather", "default"),
    },
    "unet": {
        "baseline `all`": ("unet", "all"),
        "key-step `default`": ("unet", "default"),
        "DeepCache `deep0:uniform:3`": ("unet", "deep0:uniform:3"),
    },
}
BASELINE = "baseline `all`"
PROMPT = "a handwritten 7"
# engine -> (backend, options, label)
ENGINES = {
    "ort-fp32": ("onnxruntime", {}, "ONNX Runtime fp32"),
    "ov-f32": ("openvino", {"precision": "f32", "static_shapes": True}, "OpenVINO f32 (static shapes)"),
    "ov-f32-dynamic": ("openvino", {"precision": "f32", "static_shapes": False}, "OpenVINO f32 (dynamic shapes)"),
    "ov-bf16": ("openvino", {"precision": "bf16", "static_shapes": True}, "OpenVINO bf16 (static shapes)"),
    "ov-bf16-dynamic": ("openvino", {"precision": "bf16", "static_shapes": False}, "OpenVINO bf16 (dynamic shapes)"),
    "auto": ("auto", {}, "auto"),
}
EAGER = "eager"
PEERS = ("optimum-f32", "optimum-bf16")  # optimum-intel OVStableDiffusionPipeline (unet workload)
DEFAULT_ENGINES = {"dit": (EAGER, "ort-fp32", "ov-f32", "ov-f32-dynamic", "ov-bf16", "ov-bf16-dynamic"),
                   "unet": (EAGER, *PEERS, "ort-fp32", "ov-f32", "ov-f32-dynamic", "ov-bf16", "ov-bf16-dynamic")}


def build_bundles(workload: str, model: str, work: Path, steps: int) -> dict[str, Path]:
    from keystep.export.build import build_dit_bundle, build_unet_bundle

    paths = {}
    if workload == "unet":
        from .unet import make_sd_dir

        if not (work / "sd" / "model_index.json").is_file():
            make_sd_dir(work / "sd")
        paths["unet"] = work / "unet"
        if not (paths["unet"] / "manifest.json").is_file():
            build_unet_bundle(str(work / "sd"), str(paths["unet"]), steps=steps, cache="deep:0", progress=lambda m: None)
        return paths
    for name, options in {"dense": {"width": "none"}, "gather": {"token_skip": "gather"}}.items():
        paths[name] = work / name
        if not (paths[name] / "manifest.json").is_file():
            build_dit_bundle(model, str(paths[name]), steps=steps, progress=lambda m: None, **options)
    return paths


def run_engine(workload: str, engine: str, work: Path, steps: int, repeats: int, size: int) -> dict:
    """One engine's rows (in this process): medians, per-stage seconds, FLOPs and final latents per column."""
    from keystep.runtime.backends.base import describe_backend, get_backend
    from keystep.runtime.bundle import Bundle
    from keystep.runtime.sampler import SamplingOptions
    from keystep.runtime.samplers import sampler_for

    name, options, _ = ENGINES[engine]
    backend = get_backend(name, **options)
    columns = COLUMNS[workload]
    samplers = {b: sampler_for(Bundle.load(work / b), backend) for b, _ in columns.values()}
    if workload == "unet":
        guidance = 7.5
        z_T = samplers["unet"].initial_noise(1, size, size, seed=0)
        sample = lambda sampler, opts: sampler.sample([PROMPT], opts, height=size, width=size, init_noise=z_T)  # noqa: E731
    else:
        guidance = 4.0
        z_T = samplers["dense"].initial_noise(1, seed=0)
        sample = lambda sampler, opts: sampler.sample([1], opts, init_noise=z_T)  # noqa: E731
    times = {c: [] for c in columns}
    stages: dict[str, dict[str, list[float]]] = {c: {} for c in columns}
    flops, latents = {}, {}
    for i in range(repeats + 1):  # round 0 compiles and warms every engine
        for column, (bundle, spec) in columns.items():
            sampler = samplers[bundle]
            opts = SamplingOptions.from_bundle(sampler.bundle, num_steps=steps, guidance=guidance,
                                               parallel=False).with_plan(spec)
            t0 = time.perf_counter()
            result = sample(sampler, opts)  # the whole call: text encoding too, as the eager and peer rows time it
            seconds = time.perf_counter() - t0
            if not i:
                continue
            times[column].append(seconds)
            per_stage: dict[str, float] = {}
            for call, seconds in zip(result.prepared.calls, result.call_seconds):
                per_stage[call.runner] = per_stage.get(call.runner, 0.0) + seconds
            for stage, seconds in per_stage.items():
                stages[column].setdefault(stage, []).append(seconds)
            flops[column] = sum(result.call_flops)
            latents[column] = result.latents.tolist()
    return {"engine": engine, "backend": describe_backend(backend),
            "median": {c: statistics.median(v) for c, v in times.items()},
            "spread": {c: (min(v), max(v)) for c, v in times.items()},
            "stages": {c: {s: statistics.median(v) for s, v in st.items()} for c, st in stages.items()},
            "flops": flops, "latents": latents}


def timed(fn, repeats: int) -> list[float]:
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - t0)
    return times


def eager_row(label: str, times: list[float]) -> dict:
    return {"engine": EAGER, "backend": label, "median": {BASELINE: statistics.median(times)},
            "spread": {BASELINE: (min(times), max(times))}}


def run_eager(workload: str, preset: str, work: Path, steps: int, repeats: int, size: int) -> dict:
    """diffusers' own loop, fp32 eager PyTorch, alone in this process."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if workload == "unet":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(work / "sd", safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        z_T = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8), dtype=np.float32))

        def run():
            with torch.inference_mode():
                pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5, latents=z_T,
                     output_type="latent")

        return eager_row(f"eager PyTorch {torch.__version__} fp32 (diffusers StableDiffusionPipeline)",
                         timed(run, repeats))
    from diffusers import DDIMScheduler

    from .dit import diffusers_ddim_config, eager_diffusers_loop, make_diffusers_dit

    transformer = make_diffusers_dit(preset, seed=0)
    scheduler = DDIMScheduler.from_config(diffusers_ddim_config(clip_sample=True))
    channels, side = transformer.config.in_channels, transformer.config.sample_size
    z_T = np.random.default_rng(0).standard_normal((1, channels, side, side), dtype=np.float32)
    return eager_row(f"eager PyTorch {torch.__version__} fp32 (diffusers DiTTransformer2DModel)",
                     timed(lambda: eager_diffusers_loop(transformer, scheduler, z_T, [1], 4.0, steps), repeats))


def one_process(engine: str, args, out: Path) -> dict:
    """Run one engine in a fresh interpreter and read its result."""
    print(f"[bench.cpu] {engine} ...", file=sys.stderr, flush=True)
    if engine in PEERS:
        script = Path(__file__).with_name("optimum_peer.py")
        command = [args.peer_python, str(script), "--sd-dir", str(args.work / "sd"), "--precision",
                   engine.split("-")[1], "--size", str(args.size), "--steps", str(args.steps),
                   "--repeats", str(args.repeats), "--prompt", PROMPT, "--result", str(out)]
    else:
        command = [sys.executable, "-m", "keystep.tools.bench.cpu", "--one", engine, "--workload", args.workload,
                   "--work", str(args.work), "--steps", str(args.steps), "--repeats", str(args.repeats),
                   "--preset", args.preset, "--size", str(args.size), "--result", str(out)]
    done = subprocess.run(command)
    if done.returncode and engine in PEERS:  # the peer's own failure is a finding, not a reason to lose the table
        return {"engine": engine, "backend": f"optimum-intel {engine.split('-')[1]}: FAILED (exit {done.returncode}, "
                "its error is printed above)", "median": {}}
    if done.returncode:
        raise SystemExit(f"bench.cpu: the {engine} process failed (exit {done.returncode})")
    return json.loads(out.read_text())


def to_markdown(results: list[dict], command: str, what: str, repeats: int) -> str:
    columns = list(next((r["median"] for r in results if len(r["median"]) > 1), [BASELINE]))
    eager = next((r["median"][BASELINE] for r in results if r["engine"] == EAGER), None)
    reference = next((r for r in results if r["engine"] == "ort-fp32"), None)
    flops = next((r["flops"] for r in results if "flops" in r), None)
    best = columns[-1]
    from keystep.runtime.backends.auto import NATIVE_BF16_FLAGS, cpu_flags

    flags = cpu_flags()
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    bf16 = (f"native bf16: {', '.join(native)}" if native else "no native bf16") + ("" if "amx_tile" in flags
                                                                                   else ", no AMX")
    lines = [f"`{command}` — {cpu_name()} ({bf16}), {os.cpu_count()} cores; {what}, batch 1; each engine in its own process, "
             f"its rows interleaved, median of {repeats} (s/image; ratio to eager diffusers fp32)", "",
             "| engine | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for r in results:
        cells = []
        for column in columns:
            t = r["median"].get(column)
            cells.append("" if t is None else f"{t:.3f}" + (f" ({eager / t:.2f}×)" if eager else ""))
        lines.append(f"| {r['backend']} | " + " | ".join(cells) + " |")
    if flops is None:  # only eager/peer rows: no plans to compare
        return "\n".join(lines)
    dense = flops[BASELINE]
    bounds = {c: dense / f for c, f in flops.items()}
    others = columns[1:]
    lines += ["", "GFLOP per image: " + ", ".join(f"{c} {f / 1e9:.0f}" for c, f in flops.items()) + "; FLOP bound "
              "vs the baseline: " + ", ".join(f"{c} {b:.2f}×" for c, b in bounds.items()) + ".", "",
              "| engine | " + " | ".join(f"{c}: speedup / bound" for c in others) + " | latents vs ORT fp32 "
              f"(max abs, rel L2; {best}) |", "|---|" + "---|" * (len(others) + 1)]
    for r in results:
        if "flops" not in r:
            continue
        m = r["median"]
        cells = []
        for column in others:
            speedup = m[BASELINE] / m[column]
            cells.append(f"{speedup:.2f}× / {bounds[column]:.2f}× = {speedup / bounds[column]:.2f}")
        error = "—"
        if reference is not None and r is not reference:
            a = np.asarray(r["latents"][best])
            b = np.asarray(reference["latents"][best])
            error = f"{np.abs(a - b).max():.2e}, {np.linalg.norm(a - b) / np.linalg.norm(b):.2e}"
        lines.append(f"| {r['backend']} | " + " | ".join(cells) + f" | {error} |")
    lines += ["", "Per-stage seconds per image (median), stage calls summed:", "",
              "| engine | column | " + "stage: s |", "|---|---|---|"]
    for r in results:
        for column, stages in r.get("stages", {}).items():
            lines.append(f"| {r['backend']} | {column} | " + ", ".join(f"{s} {v:.3f}" for s, v in sorted(stages.items()))
                         + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="dit", choices=list(COLUMNS))
    parser.add_argument("--model", default="random:dydit-s2", help="dit: the DyDiT-format model")
    parser.add_argument("--preset", default="dit-s2", help="dit: the eager row's diffusers DiT size")
    parser.add_argument("--size", type=int, default=128, help="unet: image height = width in pixels")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default="keystep-bench-cpu", help="bundles are built here once and reused")
    parser.add_argument("--engines", nargs="+", choices=[EAGER, *PEERS, *ENGINES],
                        help="default: every engine of the workload")
    parser.add_argument("--peer-python", help="unet: the Python of a venv with optimum-intel[openvino] (peer rows)")
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--one", choices=[EAGER, *ENGINES], help=argparse.SUPPRESS)  # a child process: one engine
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work = Path(args.work).resolve()
    if args.one:
        result = (run_eager(args.workload, args.preset, args.work, args.steps, args.repeats, args.size)
                  if args.one == EAGER else run_engine(args.workload, args.one, args.work, args.steps, args.repeats,
                                                       args.size))
        Path(args.result).write_text(json.dumps(result))
        return 0
    engines = list(args.engines or DEFAULT_ENGINES[args.workload])
    if args.workload != "unet" or not args.peer_python:
        if any(e in PEERS for e in engines) and args.engines:
            parser.error("the optimum-intel rows run on the unet workload with --peer-python")
        engines = [e for e in engines if e not in PEERS]
    build_bundles(args.workload, args.model, args.work, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        results = [one_process(e, args, Path(tmp) / f"{e}.json") for e in engines]
    command = (f"python -m keystep.tools.bench.cpu --workload {args.workload} --steps {args.steps} "
               f"--repeats {args.repeats} --engines {' '.join(engines)}")
    if args.workload == "unet":
        command += f" --size {args.size}" + (" --peer-python PY" if args.peer_python else "")
        what = f"reduced SD UNet 160/320/640 ({args.size}×{args.size} px), DDIM {args.steps} steps, CFG 7.5"
    else:
        command += f" --model {args.model}"
        what = f"{args.model}, DDIM {args.steps} steps, CFG 4"
    emit(to_markdown(results, command, what, args.repeats), args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
