"""``keystep demo``: build a bundle (once) and sample it with the baseline and the default key-step plan."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import MANIFEST_NAME, Bundle
from keystep.runtime.dit_sampler import DiTSampler
from keystep.runtime.sampler import SamplingOptions

DEMO_MODEL = "random:dit-s2"  # until trained models ship: DiT-S/2-sized, random weights


def run_demo(out_dir: str = "keystep-demo", steps: int = 50) -> int:
    bundle_dir = Path(out_dir) / "bundle"
    if not (bundle_dir / MANIFEST_NAME).is_file():
        from keystep.export.build import build_dit_bundle

        print(f"building {bundle_dir} from {DEMO_MODEL} (random weights, DiT-S/2 size) ...")
        build_dit_bundle(DEMO_MODEL, str(bundle_dir), steps=steps, progress=lambda m: print("  " + m))
    bundle = Bundle.load(bundle_dir)
    sampler = DiTSampler(bundle, get_backend("onnxruntime"))
    labels = [207]
    noise = sampler.initial_noise(len(labels), seed=0)
    rows = []
    for name, spec in (("baseline", "all"), ("key-step", "default")):
        options = SamplingOptions.from_bundle(bundle, num_steps=steps, key_steps=spec, scheduler="ddim")
        sampler.sample(labels, options, init_noise=noise)  # warm-up: session creation, allocator
        result = sampler.sample(labels, options, init_noise=noise)
        np.save(Path(out_dir) / f"latents-{name}.npy", result.latents)
        rows.append((name, result, sampler.plan_flops(result.prepared)))
    base_time, base_flops = rows[0][1].total_seconds, rows[0][2]
    print(f"\n{'plan':<10} {'calls':>5} {'GFLOP':>8} {'seconds':>8} {'speedup':>8} {'FLOP bound':>10}")
    for name, result, flops in rows:
        print(f"{name:<10} {len(result.prepared.calls):>5} {flops / 1e9:>8.1f} {result.total_seconds:>8.2f} "
              f"{base_time / result.total_seconds:>7.2f}x {base_flops / flops:>9.2f}x")
    diff = np.abs(rows[0][1].latents - rows[1][1].latents)
    print(f"\nkey-step vs baseline latents: mean |diff| {diff.mean():.4f} (random weights: images are noise)")
    print(f"latents written to {out_dir}/latents-*.npy; try `keystep inspect {bundle_dir}`")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
