"""Sample quality of a digits bundle, the way the papers measure it, at small scale.

    keystep quality BUNDLE [--plan SPEC ...] [--samples 1000] [--json]

* class accuracy: the shipped digit classifier's prediction vs the requested class (text-to-image bundles, i.e.
  digits-sd: the digit the prompt names; prompts cycle through the training templates, tools/train/digit_prompts.py);
* digits-FD: Fréchet distance between the classifier's penultimate features of the samples and of the real digits
  (FID's formula with a domain classifier; needs >= 1000 samples to be stable);
* fidelity: PSNR of each plan's images against the baseline plan's from the same z_T (pixel range [-1, 1]).

Runs on the runtime alone (numpy + onnxruntime): the classifier ships as ONNX with the real set's feature statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from keystep.runtime.bundle import Bundle
from keystep.runtime.sampler import SamplingError

REAL_STATS = "digits-real-features.npz"


class DigitMetrics:
    def __init__(self, classifier: Path | None = None):
        import onnxruntime as ort

        from keystep.models import CLASSIFIER

        path = Path(classifier or CLASSIFIER)
        if not path.is_file():
            raise SamplingError(f"the digit classifier {path} is missing (train it: python -m keystep.tools.train.digits)")
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        stats = np.load(path.with_name(REAL_STATS))
        self.real_mean, self.real_cov = stats["mean"], stats["cov"]

    def classify(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = self.session.run(None, {"image": np.clip(images, -1, 1).astype(np.float32)})
        return logits.argmax(1), features

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float((self.classify(images)[0] == labels).mean())

    def fd(self, images: np.ndarray) -> float:
        features = self.classify(images)[1].astype(np.float64)
        return frechet_distance(features.mean(0), np.cov(features, rowvar=False), self.real_mean, self.real_cov)


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2) — symmetric square roots, no scipy needed."""
    root1 = _sqrtm_psd(cov1)
    cross = _sqrtm_psd(root1 @ cov2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(cross))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> float:
    mse = float(np.mean((np.clip(a, -1, 1) - np.clip(b, -1, 1)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(data_range**2 / mse)


def digits_sampler(bundle: Bundle, backend):
    """The sampler of a digits bundle: a class-conditional DiT or a text-to-image UNet, pixel space, 1 channel."""
    from keystep.runtime.samplers import sampler_for

    cfg = bundle.model_config
    pixels = bundle.family == "dit" or cfg.get("pixel_space")
    if pixels and cfg["in_channels"] == 1:
        return sampler_for(bundle, backend)
    raise SamplingError("keystep quality measures the digits models (1-channel pixel-space DiT or text-to-image "
                        "UNet bundles, e.g. built from digits-dit or digits-sd)")


def sample_digits(sampler, labels: np.ndarray, options, seed: int, first_sample: int = 0):
    """One sample per requested digit: the class label, or for text-to-image a prompt naming it."""
    if sampler.family == "unet":
        from ..train.digit_prompts import prompts_for

        return sampler.sample(prompts_for(labels, first_sample), options, seed=seed)
    return sampler.sample(labels.tolist(), options, seed=seed)


def generate(sampler, options, labels: np.ndarray, seed: int, batch: int = 100, progress=None):
    """Samples for ``labels`` in batches (noise seeded per batch, the same for every plan) -> (images, seconds,
    FLOPs executed). ``progress(done)`` after each batch."""
    out, seconds, flops = [], 0.0, 0
    for start in range(0, len(labels), batch):
        chunk = labels[start : start + batch]
        result = sample_digits(sampler, chunk, options, seed + start, start)
        out.append(result.latents)
        seconds += result.total_seconds
        flops += sum(f or 0 for f in result.call_flops)
        if progress:
            progress(start + len(chunk))
    return np.concatenate(out), seconds, flops


def evaluate(bundle: Bundle, backend, plans: list[str], samples: int = 1000, seed: int = 0, metrics=None,
             progress=None) -> list[dict]:
    from keystep.runtime.sampler import SamplingOptions

    sampler = digits_sampler(bundle, backend)
    metrics = metrics or DigitMetrics()
    labels = np.arange(samples) % 10
    base_options = SamplingOptions.from_bundle(bundle)
    rows, baseline = [], None
    for spec in ["all", *[p for p in plans if p != "all"]]:
        options = base_options.with_plan(spec)
        sample_digits(sampler, np.array([0]), options, seed)  # warm-up: sessions
        images, seconds, flops = generate(sampler, options, labels, seed)
        if baseline is None:
            baseline = images
        row = {"plan": spec, "samples": samples, "seconds_per_image": seconds / samples, "gflops_per_image":
               flops / samples / 1e9, "accuracy": metrics.accuracy(images, labels), "digits_fd": metrics.fd(images),
               "psnr_vs_baseline": None if spec == "all" else psnr(images, baseline)}
        rows.append(row)
        if progress:
            progress(row)
    for row in rows:
        row["speedup"] = rows[0]["seconds_per_image"] / row["seconds_per_image"]
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'plan':<16} {'s/image':>8} {'speedup':>8} {'GFLOP/img':>9} {'accuracy':>8} {'digits-FD':>9} {'PSNR':>7}"]
    for r in rows:
        p = "-" if r["psnr_vs_baseline"] is None else f"{r['psnr_vs_baseline']:.2f}"
        lines.append(f"{r['plan']:<16} {r['seconds_per_image']:>8.4f} {r['speedup']:>7.2f}x {r['gflops_per_image']:>9.4f} "
                     f"{100 * r['accuracy']:>7.1f}% {r['digits_fd']:>9.3f} {p:>7}")
    return "\n".join(lines)


def run_quality_command(args, bundle: Bundle, backend) -> int:
    from keystep.runtime.sampler import SamplingOptions

    default = SamplingOptions.from_bundle(bundle).plan_spec
    rows = evaluate(bundle, backend, args.plan or [default], args.samples, args.seed)
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0


def add_quality_arguments(p) -> None:
    p.add_argument("bundle")
    p.add_argument("--plan", action="append",
                   help="plan to compare with the baseline: key steps, a cache plan or KEY+CACHE (repeatable; "
                   "default: the bundle's default plan)")
    p.add_argument("--samples", type=int, default=1000, help="samples per plan (classes cycle 0..9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")

