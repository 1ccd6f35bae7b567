"""The shipped DyDiT digits models against the dense digits-dit: time, FLOPs and quality on the same z_T.

    python -m keystep.tools.bench.digits_dydit [--models digits-dydit-0.5 digits-dydit-0.7] [--samples 1000]
                                               [--backend onnxruntime] [--work DIR] [--markdown FILE]

Rows: the dense baseline (``digits-dit``, every step full), the dense key-step plan, and for each DyDiT model its
width profiles alone (``all``) and with its default plan — each built as shipped (``keystep build NAME``; bundles
cached in ``--work`` under the weights' sha256). Every row samples the same ``--samples`` images (classes cycling
0..9) in batches of 100 for the quality columns. Time is measured apart from that: ``--rounds`` rounds, each running
one batch of 100 per row in turn, so that a slow spell of the machine falls on every row alike rather than on
whichever row was running (row after row, the same plan once measured 0.89–1.30 s per batch); time/image is a row's
median batch time / 100, the speedup is against the dense baseline's median in the same run. Accuracy and digits-FD as in ``keystep quality``; PSNR against the dense baseline's images.
Run it under ``cpu-exclusive`` for numbers that go into docs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
from pathlib import Path

import numpy as np

from .common import cpu_name, emit

BATCH = 100


def bundle_for(model: str, work: Path, steps: int):
    """The shipped model's bundle as ``keystep build NAME`` makes it, rebuilt when the weights change."""
    from keystep.export.build import build_bundle
    from keystep.models import shipped
    from keystep.runtime.bundle import MANIFEST_NAME, Bundle

    entry = shipped(model)
    if entry is None or not entry.available or entry.is_directory:
        raise SystemExit(f"error: {model} is not a shipped DiT model (keystep models lists them)")
    digest = hashlib.sha256(entry.path.read_bytes()).hexdigest()[:12]
    path = work / f"{model}-{digest}-{steps}"
    if not (path / MANIFEST_NAME).is_file():
        print(f"building {path} ...", file=sys.stderr)
        build_bundle(model, str(path), steps=steps, progress=lambda m: None)
    return Bundle.load(path)


def measure_row(sampler, spec: str | None, labels: np.ndarray, seed: int):
    """-> (images, FLOPs per image, the plan) for one plan (``None``: the bundle's default)."""
    from keystep.runtime.sampler import SamplingOptions

    from ..cli.quality import sample_digits

    options = SamplingOptions.from_bundle(sampler.bundle, key_steps=spec)
    sample_digits(sampler, np.array([0]), options, seed)  # warm-up: sessions
    images, flops = [], 0
    for start in range(0, len(labels), BATCH):
        result = sample_digits(sampler, labels[start : start + BATCH], options, seed + start, start)
        images.append(result.latents)
        flops += sum(f or 0 for f in result.call_flops)
    return np.concatenate(images), flops / len(labels), options.key_steps


def time_rows(samplers: dict, rows_spec: list[tuple], rounds: int, seed: int) -> dict[str, list[float]]:
    """Seconds per batch of ``BATCH`` images for each row, the rows interleaved round by round."""
    from keystep.runtime.sampler import SamplingOptions

    from ..cli.quality import sample_digits

    labels = np.arange(BATCH) % 10
    options = {name: SamplingOptions.from_bundle(samplers[m].bundle, key_steps=spec) for name, m, spec in rows_spec}
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in rows_spec}
    for _ in range(rounds):
        for name, model, _ in rows_spec:
            seconds[name].append(sample_digits(samplers[model], labels, options[name], seed).total_seconds)
    return seconds


def run(models: list[str], samples: int, backend_name: str, work: Path, steps: int = 50, seed: int = 0,
        threads: int | None = None, rounds: int = 5) -> list[dict]:
    from keystep.runtime.backends.base import get_backend

    from ..cli.quality import DigitMetrics, digits_sampler, psnr

    backend = get_backend(backend_name, threads=threads) if threads else get_backend(backend_name)
    metrics = DigitMetrics()
    labels = np.arange(samples) % 10
    rows_spec = [("dense baseline", "digits-dit", "all"), ("dense key-step", "digits-dit", None)]
    for model in models:
        rows_spec += [(f"{model} profiles", model, "all"), (f"{model} + key-step", model, None)]
    samplers = {m: digits_sampler(bundle_for(m, work, steps), backend) for _, m, _ in rows_spec}
    quality = {name: measure_row(samplers[model], spec, labels, seed) for name, model, spec in rows_spec}
    timing = time_rows(samplers, rows_spec, rounds, seed)
    rows, base = [], None
    for name, model, spec in rows_spec:
        (images, flops, plan), seconds = quality[name], timing[name]
        per_image = statistics.median(seconds) / BATCH
        row = {"row": name, "model": model, "plan": plan, "samples": samples, "rounds": rounds,
               "seconds_per_image": per_image,
               "batch_seconds_min_max": [min(seconds), max(seconds)], "gflops_per_image": flops / 1e9,
               "accuracy": metrics.accuracy(images, labels), "digits_fd": metrics.fd(images)}
        if base is None:
            base = (row, images)
        row["speedup"] = base[0]["seconds_per_image"] / per_image
        row["psnr_vs_dense"] = None if row is base[0] else psnr(images, base[1])
        rows.append(row)
        print(f"{name}: {1000 * per_image:.2f} ms/image, {100 * row['accuracy']:.1f} %, FD {row['digits_fd']:.2f}",
              file=sys.stderr)
    return rows


def to_markdown(rows: list[dict], command: str) -> str:
    r0 = rows[0]
    lines = [f"`{command}` — {cpu_name()}, {os.cpu_count()} cores; {r0['samples']} samples per row (classes 0–9 "
             f"cycling, same z_T), DDIM 50, CFG 2, batches of {BATCH}; time = median batch / {BATCH} over "
             f"{r0['rounds']} rounds of one batch per row, rows interleaved", "",
             "| row | plan | ms/image | batch min–max (s) | speedup vs dense | GFLOP/image | accuracy | digits-FD | PSNR vs dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = "—" if r["psnr_vs_dense"] is None else f"{r['psnr_vs_dense']:.1f} dB"
        lo, hi = r["batch_seconds_min_max"]
        lines.append(f"| {r['row']} | {r['plan']} | {1000 * r['seconds_per_image']:.2f} | {lo:.2f}–{hi:.2f} | "
                     f"{r['speedup']:.2f}× | {r['gflops_per_image']:.3f} | {100 * r['accuracy']:.1f} % | "
                     f"{r['digits_fd']:.2f} | {p} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits-dydit-0.5", "digits-dydit-0.7"])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: all cores)")
    parser.add_argument("--work", default="keystep-bench-digits-dydit", help="bundle cache")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (one batch per row each, interleaved)")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.samples < BATCH or args.samples % BATCH:
        parser.error(f"--samples must be a multiple of {BATCH}")
    rows = run(args.models, args.samples, args.backend, Path(args.work), threads=args.threads, rounds=args.rounds)
    command = (f"python -m keystep.tools.bench.digits_dydit --models {' '.join(args.models)} --samples {args.samples}"
               f" --rounds {args.rounds}")
    emit(to_markdown(rows, command), args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
