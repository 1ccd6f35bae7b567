"""Training-side comparison of timestep samplers: the same digits DiT, seed and iteration budget trained with uniform,
SpeeDiT and SpeeD sampling; quality (class accuracy, digits-FD) measured at several checkpoints.

    python -m keystep.tools.train.speedit_compare [--iters 1500] [--every 500] [--samples 500] [--work DIR] [--markdown F]

Checkpoints are sampled with a plain PyTorch DDIM loop (50 steps, CFG 2, the full model): this measures the trained
weights, not the runtime.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..bench.common import emit
from .timestep_sampling import SAMPLERS


def sample_checkpoint(path: Path, samples: int, seed: int = 0, steps: int = 50, guidance: float = 2.0) -> np.ndarray:
    import torch

    from keystep.export.dit_loaders import load_dit
    from keystep.models import DDPM_LINEAR
    from keystep.runtime.schedulers import make_scheduler

    model = load_dit(path).model
    cfg = model.config
    scheduler = make_scheduler({"_class_name": "DDIMScheduler", **DDPM_LINEAR})
    scheduler.set_timesteps(steps)
    labels = np.arange(samples) % 10
    z = np.random.default_rng(seed).standard_normal((samples, 1, cfg.input_size, cfg.input_size), dtype=np.float32)
    y = torch.from_numpy(np.concatenate([labels, np.full(samples, cfg.num_classes)]))
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = torch.from_numpy(np.concatenate([z, z]))
            out = model(x, torch.full((2 * samples,), float(t)), y).numpy()
            eps = out[samples:] + guidance * (out[:samples] - out[samples:])
            z = scheduler.step(eps, t, z).astype(np.float32)
    return z


def run(iters: int, every: int, samples: int, work: Path, progress=print) -> dict:
    from ..cli.quality import DigitMetrics
    from .dit import train

    metrics = DigitMetrics()
    labels = np.arange(samples) % 10
    checkpoints = tuple(range(every, iters, every))
    results = {}
    for sampler in SAMPLERS:
        out = work / f"dit-{sampler}.safetensors"
        if not out.is_file():
            train(out, iters, sampler, checkpoints=checkpoints, progress=lambda m: progress(f"{sampler}: {m}"))
        curve = []
        for it in (*checkpoints, iters):
            path = out if it == iters else out.with_name(f"{out.stem}-{it}{out.suffix}")
            images = sample_checkpoint(path, samples)
            curve.append({"iters": it, "accuracy": metrics.accuracy(images, labels), "digits_fd": metrics.fd(images)})
            progress(f"{sampler} @ {it}: {curve[-1]}")
        results[sampler] = curve
    return results


def to_markdown(results: dict, command: str, samples: int) -> str:
    iters = [p["iters"] for p in next(iter(results.values()))]
    lines = [f"`{command}` — same DiT, seed and batch (128); {samples} samples per checkpoint, DDIM 50, CFG 2", "",
             "| sampler | " + " | ".join(f"acc @ {i}" for i in iters) + " | " + " | ".join(f"FD @ {i}" for i in iters) + " |",
             "|---|" + "---|" * (2 * len(iters))]
    for sampler, curve in results.items():
        lines.append(f"| {sampler} | " + " | ".join(f"{100 * p['accuracy']:.1f} %" for p in curve) + " | "
                     + " | ".join(f"{p['digits_fd']:.1f}" for p in curve) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=1500)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--work", default="keystep-speedit")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = run(args.iters, args.every, args.samples, work)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    command = (f"python -m keystep.tools.train.speedit_compare --iters {args.iters} --every {args.every} "
               f"--samples {args.samples}")
    text = to_markdown(results, command, args.samples)
    emit(text, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
