"""``keystep demo``: the shipped digits models end to end — build (once, cached), sample every plan from the same
noise, and print speed and quality side by side; PNG grids, a Markdown table and a plot go to ``--dir``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import MANIFEST_NAME, Bundle
from keystep.runtime.dit_sampler import DiTSampler
from keystep.runtime.sampler import SamplingOptions

# plan row -> (shipped model, key-step spec; None = the model's tuned default plan)
DEMO_PLANS = {
    "baseline": ("digits-dit", "all"),
    "key-step": ("digits-dit", None),
    "DyDiT 0.5 profiles": ("digits-dydit-0.5", "all"),
    "DyDiT 0.5 + key-step": ("digits-dydit-0.5", None),
}


def bundle_for(model: str, out_dir: Path, steps: int) -> Bundle:
    path = out_dir / "bundles" / model
    if (path / MANIFEST_NAME).is_file():
        bundle = Bundle.load(path)
        if bundle.default_plan["num_steps"] == steps:
            return bundle
    from keystep.export.build import build_dit_bundle

    print(f"building {path} from the shipped model {model} (once; cached for the next run) ...", file=sys.stderr)
    build_dit_bundle(model, str(path), steps=steps, progress=lambda m: print("  " + m, file=sys.stderr))
    return Bundle.load(path)


def _progress(label: str, done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    print(f"\r  {label:<22} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=sys.stderr)
    if done == total:
        print(file=sys.stderr)


def grid_png(images: np.ndarray, labels: np.ndarray, title: str, path: Path, per_class: int = 8) -> None:
    """Rows = classes 0..9, ``per_class`` samples each, 4x nearest upscaling, the plan name on top."""
    from PIL import Image, ImageDraw

    size = images.shape[-1] * 4
    canvas = Image.new("L", (per_class * size, 10 * size + 16), 255)
    for digit in range(10):
        picks = np.flatnonzero(labels == digit)[:per_class]
        for col, i in enumerate(picks):
            pixels = ((np.clip(images[i, 0], -1, 1) + 1) * 127.5).round().astype(np.uint8)
            canvas.paste(Image.fromarray(pixels).resize((size, size), Image.NEAREST), (col * size, 16 + digit * size))
    ImageDraw.Draw(canvas).text((2, 2), title, fill=0)
    canvas.save(path)


def run_demo(out_dir: str = "keystep-demo", steps: int = 50, samples: int = 200, seed: int = 0) -> int:
    from keystep.models import shipped

    from .quality import DigitMetrics, generate, psnr

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plans = {name: p for name, p in DEMO_PLANS.items() if shipped(p[0]) and shipped(p[0]).available}
    backend = get_backend("onnxruntime")
    samplers = {model: DiTSampler(bundle_for(model, out, steps), backend) for model, _ in plans.values()}
    metrics = DigitMetrics()
    labels = np.arange(samples) % 10
    rows, baseline = [], None
    for name, (model, spec) in plans.items():
        sampler = samplers[model]
        options = SamplingOptions.from_bundle(sampler.bundle, key_steps=spec)
        spec = options.key_steps
        sampler.sample([0], options, seed=seed)  # warm-up: session creation
        images, seconds, flops = generate(sampler, options, labels, seed, progress=lambda done: _progress(name, done, samples))
        baseline = images if baseline is None else baseline
        grid_png(images, labels, f"{name} ({model}, {spec})", out / f"{name.replace(' ', '-').replace('+', 'and')}.png")
        rows.append({"plan": name, "model": model, "key_steps": spec, "seconds_per_image": seconds / samples,
                     "gflops_per_image": flops / samples / 1e9, "accuracy": metrics.accuracy(images, labels),
                     "digits_fd": metrics.fd(images), "psnr_vs_baseline": None if not rows else psnr(images, baseline)})
    for r in rows:
        r["speedup"] = rows[0]["seconds_per_image"] / r["seconds_per_image"]
    table = markdown_table(rows, samples, steps)
    print("\n" + table)
    (out / "demo.md").write_text(table + "\n")
    (out / "demo.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, out / "demo-plot.png")
    print(f"\nimage grids, demo.md, demo.json and demo-plot.png are in {out}/")
    return 0


def markdown_table(rows: list[dict], samples: int, steps: int) -> str:
    note = "" if samples >= 1000 else f"; digits-FD from {samples} samples is noisy (papers' figure: >= 1000)"
    lines = [f"{samples} samples per plan (classes 0-9), DDIM {steps} steps, same z_T for every plan{note}", "",
             "| plan | time/image | speedup | GFLOP/image | class accuracy | digits-FD | PSNR vs baseline |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = "—" if r["psnr_vs_baseline"] is None else f"{r['psnr_vs_baseline']:.1f} dB"
        lines.append(f"| {r['plan']} | {1000 * r['seconds_per_image']:.1f} ms | {r['speedup']:.2f}× | "
                     f"{r['gflops_per_image']:.3f} | {100 * r['accuracy']:.1f} % | {r['digits_fd']:.2f} | {p} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)", file=sys.stderr)
        return
    names = [r["plan"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].barh(names, [r["speedup"] for r in rows], color="tab:blue")
    axes[0].set_xlabel("speedup vs baseline (same run)")
    axes[1].barh(names, [100 * r["accuracy"] for r in rows], color="tab:green")
    axes[1].set_xlabel("class accuracy (%)")
    axes[1].set_xlim(0, 100)
    axes[1].set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
