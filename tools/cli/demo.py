"""``keystep demo``: the shipped digits models end to end — build (once, cached), sample every plan from the same
noise, and print speed and quality side by side; PNG grids, a Markdown table and a plot go to ``--dir``.

Two groups of rows, each against its own baseline in the same run: the class-conditional DiT (and its DyDiT
fine-tune), and the text-to-image ``digits-sd`` (prompts naming each digit, the templates cycling over the samples).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from keystep.runtime.backends.base import describe_backend
from keystep.runtime.pipeline import make_backend
from keystep.runtime.bundle import MANIFEST_NAME, Bundle
from keystep.runtime.sampler import SamplingOptions

# plan row -> (shipped model, key-step spec; None = the model's tuned default plan)
DEMO_PLANS = {
    "baseline": ("digits-dit", "all"),
    "key-step": ("digits-dit", None),
    "DyDiT 0.5 profiles": ("digits-dydit-0.5", "all"),
    "DyDiT 0.5 + key-step": ("digits-dydit-0.5", None),
    "text-to-image baseline": ("digits-sd", "all"),
    "text-to-image key-step": ("digits-sd", None),
}
# rows are compared with the first row of their group (speedup, PSNR): the DyDiT rows with the dense DiT
BASELINE_OF = {"digits-dit": "digits-dit", "digits-dydit-0.5": "digits-dit", "digits-sd": "digits-sd"}


def weights_digest(model: str) -> str:
    """sha256 over the shipped model's weight file(s): a cached bundle is reused only for the weights it was built
    from (the shipped models are retrained now and then; a stale bundle would show the old model's numbers)."""
    from keystep.models import shipped

    entry = shipped(model)
    files = sorted(f for f in entry.path.rglob("*") if f.is_file()) if entry.is_directory else [entry.path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(entry.path).as_posix().encode() if entry.is_directory else b"")
        h.update(f.read_bytes())
    return h.hexdigest()


def bundle_for(model: str, out_dir: Path, steps: int) -> Bundle:
    path = out_dir / "bundles" / model
    stamp = out_dir / "bundles" / f"{model}.weights-sha256"
    digest = weights_digest(model)
    if (path / MANIFEST_NAME).is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        bundle = Bundle.load(path)
        if bundle.default_plan["num_steps"] == steps:
            return bundle
    from keystep.export.build import build_bundle

    print(f"building {path} from the shipped model {model} (once; cached for the next run) ...", file=sys.stderr)
    stamp.unlink(missing_ok=True)
    build_bundle(model, str(path), steps=steps, progress=lambda m: print("  " + m, file=sys.stderr))
    stamp.write_text(digest + "\n")
    return Bundle.load(path)


def _progress(label: str, done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    print(f"\r  {label:<22} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=sys.stderr)
    if done == total:
        print(file=sys.stderr)


def grid_png(images: np.ndarray, labels: np.ndarray, title: str, path: Path, per_class: int = 8,
             row_labels: list[str] | None = None) -> None:
    """Rows = classes 0..9, ``per_class`` samples each, 4x nearest upscaling, the plan name on top; ``row_labels``
    (one per digit) go in a column on the left."""
    from PIL import Image, ImageDraw

    size = images.shape[-1] * 4
    margin = 0 if row_labels is None else 8 + 6 * max(len(t) for t in row_labels)
    canvas = Image.new("L", (max(margin + per_class * size, 6 * len(title) + 4), 10 * size + 16), 255)
    draw = ImageDraw.Draw(canvas)
    for digit in range(10):
        picks = np.flatnonzero(labels == digit)[:per_class]
        for col, i in enumerate(picks):
            pixels = ((np.clip(images[i, 0], -1, 1) + 1) * 127.5).round().astype(np.uint8)
            canvas.paste(Image.fromarray(pixels).resize((size, size), Image.NEAREST),
                         (margin + col * size, 16 + digit * size))
        if row_labels is not None:
            draw.text((2, 16 + digit * size + size // 2 - 5), row_labels[digit], fill=0)
    draw.text((2, 2), title, fill=0)
    canvas.save(path)


def run_demo(out_dir: str = "keystep-demo", steps: int = 50, samples: int = 200, seed: int = 0) -> int:
    from keystep.models import shipped

    from ..train.digit_prompts import DIGIT_WORDS, TEMPLATES, digit_prompt
    from .quality import DigitMetrics, digits_sampler, generate, psnr, sample_digits

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plans = {name: p for name, p in DEMO_PLANS.items() if shipped(p[0]) and shipped(p[0]).available}
    backend = make_backend()  # the default: $KEYSTEP_BACKEND or auto (OpenVINO bf16 on CPUs with native bf16)
    print(f"backend: {describe_backend(backend)}")
    samplers = {model: digits_sampler(bundle_for(model, out, steps), backend) for model, _ in plans.values()}
    metrics = DigitMetrics()
    labels = np.arange(samples) % 10
    rows, baselines = [], {}  # baseline model -> (its row, its images)
    for name, (model, spec) in plans.items():
        sampler = samplers[model]
        options = SamplingOptions.from_bundle(sampler.bundle, key_steps=spec)
        spec = options.key_steps
        sample_digits(sampler, np.array([0]), options, seed)  # warm-up: session creation
        images, seconds, flops = generate(sampler, options, labels, seed, progress=lambda done: _progress(name, done, samples))
        group = BASELINE_OF[model]
        row = {"plan": name, "model": model, "key_steps": spec, "baseline": group, "seconds_per_image": seconds / samples,
               "gflops_per_image": flops / samples / 1e9, "accuracy": metrics.accuracy(images, labels),
               "digits_fd": metrics.fd(images), "psnr_vs_baseline": None}
        if group in baselines:
            row["psnr_vs_baseline"] = psnr(images, baselines[group][1])
        else:
            baselines[group] = (row, images)
        row["speedup"] = baselines[group][0]["seconds_per_image"] / row["seconds_per_image"]
        rows.append(row)
        path = out / f"{name.replace(' ', '-').replace('+', 'and')}.png"
        if sampler.family == "unet":
            shown = min(8, len(TEMPLATES))
            grid_png(images, labels, f"{name} ({model}, {spec}); column j: prompt template j, e.g. "
                     f"{', '.join(repr(digit_prompt(7, j)) for j in range(3))}, ...", path, per_class=shown,
                     row_labels=[f"{d} ({DIGIT_WORDS[d]})" for d in range(10)])
        else:
            grid_png(images, labels, f"{name} ({model}, {spec})", path)
    table = markdown_table(rows, samples, steps) + f"\n\nBackend: {describe_backend(backend)}."
    print("\n" + table)
    (out / "demo.md").write_text(table + "\n")
    (out / "demo.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, out / "demo-plot.png")
    print(f"\nimage grids, demo.md, demo.json and demo-plot.png are in {out}/")
    return 0


def markdown_table(rows: list[dict], samples: int, steps: int) -> str:
    note = "" if samples >= 1000 else f"; digits-FD from {samples} samples is noisy (papers' figure: >= 1000)"
    lines = [f"{samples} samples per plan (classes 0-9; text-to-image: prompts naming them), DDIM {steps} steps, "
             f"same z_T for every plan{note}. Speedup and PSNR are against the baseline row of the same model "
             f"(DyDiT rows: the dense DiT) in this run.", "",
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
