"""Training-side comparison of timestep samplers: the same digits DiT, seed and iteration budget trained with uniform,
SpeeDiT and SpeeD sampling; quality (class accuracy, digits-FD) measured at several checkpoints.

    python -m keystep.tools.train.speedit_compare [--iters 1500] [--every 500] [--samples 500] [--seeds 0,1,2]
        [--max-minutes 14] [--work DIR] [--markdown F]

Each (sampler, seed) trains resumably in ``--work``: with ``--max-minutes`` the command stops when the budget is
spent and the same command continues where it stopped; finished curves are kept in ``results.json``.

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


def run(iters: int, every: int, samples: int, work: Path, seeds: tuple[int, ...] = (0,),
        max_minutes: float | None = None, progress=print) -> dict | None:
    """Train and measure every (sampler, seed); -> {sampler: {seed: curve}}, or None when the time budget ran out
    first (each training run's state and each finished curve are kept in ``work``: run again to continue)."""
    from ..cli.quality import DigitMetrics
    from .dit import train
    from .resumable import Budget, default_state_path

    budget = Budget(max_minutes)
    results_path = work / "results.json"
    done = json.loads(results_path.read_text()) if results_path.is_file() else {}
    metrics = DigitMetrics()
    labels = np.arange(samples) % 10
    checkpoints = tuple(range(every, iters, every))
    # seed-major: a run stopped part-way leaves every sampler measured on the same seeds, a comparable subset
    for seed in seeds:
        for sampler in SAMPLERS:
            key = f"{sampler}/{seed}"
            if key in done:
                continue
            out = work / f"dit-{sampler}-seed{seed}.safetensors"
            if not out.is_file():
                left = None if budget.limit is None else max(0.0, budget.limit - budget.elapsed()) / 60
                r = train(out, iters, sampler, seed=seed, checkpoints=checkpoints, resume=default_state_path(out).is_file(),
                          max_minutes=left, progress=lambda m: progress(f"{sampler} seed {seed}: {m}"))
                if not r["done"]:
                    return None
            curve = []
            for it in (*checkpoints, iters):
                path = out if it == iters else out.with_name(f"{out.stem}-{it}{out.suffix}")
                images = sample_checkpoint(path, samples)
                curve.append({"iters": it, "accuracy": metrics.accuracy(images, labels), "digits_fd": metrics.fd(images)})
                progress(f"{sampler} seed {seed} @ {it}: {curve[-1]}")
            done[key] = curve
            results_path.write_text(json.dumps(done, indent=2))
            if budget.expired():
                return None
    results: dict = {}
    for key, curve in done.items():
        sampler, seed = key.split("/")
        if int(seed) in seeds:
            results.setdefault(sampler, {})[int(seed)] = curve
    return results


def _spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    v = scale * np.asarray(values)
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f} ({v.min():.{digits}f}–{v.max():.{digits}f})"


def to_markdown(results: dict, command: str, samples: int) -> str:
    """One row per sampler: mean ± sample standard deviation (min–max) over the seeds at each checkpoint."""
    seeds = sorted(next(iter(results.values())))
    iters = [p["iters"] for p in next(iter(results.values()))[seeds[0]]]
    lines = [f"`{command}` — same DiT and batch (128), seeds {', '.join(map(str, seeds))} (each seed: weight "
             f"initialisation and data order); {samples} samples per checkpoint, DDIM 50, CFG 2; "
             + ("mean ± sd (min–max) over the seeds" if len(seeds) > 1 else "one seed"), "",
             "| sampler | " + " | ".join(f"acc % @ {i}" for i in iters) + " | " + " | ".join(f"FD @ {i}" for i in iters)
             + " |", "|---|" + "---|" * (2 * len(iters))]
    for sampler, by_seed in results.items():
        curves = [by_seed[s] for s in seeds]
        acc = [_spread([c[k]["accuracy"] for c in curves], 100) for k in range(len(iters))]
        fd = [_spread([c[k]["digits_fd"] for c in curves]) for k in range(len(iters))]
        lines.append(f"| {sampler} | " + " | ".join(acc) + " | " + " | ".join(fd) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=1500)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--work", default="keystep-speedit")
    parser.add_argument("--seeds", default="0", help="training seeds, comma list (e.g. 0,1,2)")
    parser.add_argument("--max-minutes", type=float,
                        help="stop after this long (training state and finished curves kept); run again to continue")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s)
    except ValueError:
        parser.error(f"--seeds takes integers separated by commas, got {args.seeds!r}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = run(args.iters, args.every, args.samples, work, seeds, args.max_minutes)
    if results is None:
        print(f"time budget reached; state kept in {work} — run the same command again to continue")
        return 0
    command = (f"python -m keystep.tools.train.speedit_compare --iters {args.iters} --every {args.every} "
               f"--samples {args.samples} --seeds {args.seeds}")
    text = to_markdown(results, command, args.samples)
    emit(text, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
