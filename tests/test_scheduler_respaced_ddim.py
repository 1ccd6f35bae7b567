"""keystep's RespacedDDIMScheduler (the original DiT's DDIM, the default of bundles built from original DiT / DyDiT
checkpoints) against ``dit_reference.DiTDDIM``, a plain PyTorch/numpy DDIM written from facebookresearch/DiT's
``diffusion/respace.py`` and ``diffusion/gaussian_diffusion.py``.

That reference was run once against the fetched DiT code itself (facebookresearch/DiT @
ed81ce2229091fd4ecc9a223645f95cf379d582b, ``create_diffusion(str(N))`` / ``create_diffusion("ddimN")`` +
``ddim_sample_loop(..., eta=0)``, the fetched code is not in this repository): on ``random_original_dit(0)`` with
CFG 4.0 over all latent channels, 3 images, ``baseline_sample(..., DiTDDIM(...))`` gave exactly DiT's latents (max
|diff| 0.0) for N = 10, 25, 50 (uniform respacing), N = 10 with "ddim10", and N = 10 with clip_denoised=True; the
kept timesteps were identical; and keystep's bundle sampling with this scheduler was within 1.1e-3 of DiT's latents
of max |x| 1730 (float32 ONNX Runtime vs PyTorch; 7.7e-6 with clipping, where |x| <= 1). On the trained digits-dit
weights built as an unnamed original checkpoint (so with this default scheduler), CFG 2, 4 images: keystep vs DiT's
``ddim_sample_loop(clip_denoised=False)`` max |diff| 2.8e-6 / 1.1e-6 / 6.6e-6 at 10 / 50 / 250 steps (latents within
|x| <= 1.08), DiTDDIM vs DiT 0.0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dit_reference import DiTDDIM
from keystep.runtime.schedulers import (DDIMScheduler, RespacedDDIMScheduler, SchedulerConfigError,
                                        make_scheduler)
from keystep.runtime.schedulers.respaced_ddim import respaced_timesteps

SHAPE = (2, 4, 8, 8)


def model(x, t):
    """A deterministic denoiser stand-in (depends on x and t), in range like a trained model's epsilon."""
    return (0.9 * x + 0.1 * np.sin(x + float(t) / 100.0)).astype(np.float32)


def run(ours, reference, steps, eta=0.0, noises=None):
    ours.set_timesteps(steps)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    ref = torch.from_numpy(x.copy())
    assert [int(t) for t in ours.timesteps] == [int(t) for t in reference.timesteps]
    for i, t in enumerate(ours.timesteps):
        noise = None if noises is None else noises[i]
        x = ours.step(model(x, t), t, x, noise=noise, eta=eta)
        ref = reference.step(torch.from_numpy(model(ref.numpy(), t)), t, ref,
                             None if noise is None else torch.from_numpy(noise)).prev_sample
        assert x.dtype == np.float32
    return x, ref.numpy()


# "ddim" respacing cannot take 1 or 600 of 1000 steps (no integer stride does): see the error test
@pytest.mark.parametrize("steps,respacing", [(n, "uniform") for n in (1, 2, 7, 10, 50, 250)]
                         + [(n, "ddim") for n in (2, 7, 10, 50, 250)])
def test_steps_equal_dit_ddim(steps, respacing):
    """Float32 both; torch divides by a scalar as a multiplication by its reciprocal, so 250 steps drift ~1e-5."""
    ours = RespacedDDIMScheduler(timestep_respacing=respacing)
    got, want = run(ours, DiTDDIM(steps, "ddim" if respacing == "ddim" else ""), steps)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_the_comparison_sees_a_slightly_wrong_schedule():
    got, want = run(RespacedDDIMScheduler(beta_end=0.0201), DiTDDIM(50), 50)
    assert np.abs(got - want).max() > 1e-3


def test_clipping_and_eta_noise_equal_dit_ddim():
    got, want = run(RespacedDDIMScheduler(clip_sample=True), DiTDDIM(10, clip_denoised=True), 10)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    noises = np.random.default_rng(1).standard_normal((10, *SHAPE)).astype(np.float32)
    got, want = run(RespacedDDIMScheduler(), DiTDDIM(10, eta=0.5), 10, eta=0.5, noises=noises)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    plain, _ = run(RespacedDDIMScheduler(), DiTDDIM(10), 10)
    assert np.abs(got - plain).max() > 1e-2  # the noise really entered


def test_kept_timesteps_by_hand():
    """space_timesteps(1000, "4") = round(k * 333) = 0, 333, 666, 999; "ddim3": the smallest stride with exactly 3
    steps is 334; "50": a stride of 999/49 = 20.387..., so 0, 20, 41, 61, ..., 979, 999."""
    assert respaced_timesteps(1000, 4) == [0, 333, 666, 999]
    assert respaced_timesteps(1000, 3, "ddim") == [0, 334, 668]
    fifty = respaced_timesteps(1000, 50)
    assert fifty[:4] == [0, 20, 41, 61] and fifty[-2:] == [979, 999] and len(set(fifty)) == 50
    assert respaced_timesteps(1000, 50, "ddim") == list(range(0, 1000, 20))
    assert respaced_timesteps(1000, 1) == [0]
    s = RespacedDDIMScheduler()
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999, 666, 333, 0]


def test_differs_from_diffusers_ddim_where_dit_does():
    """diffusers' DDIM (leading spacing, prev = t - T // N, clip_sample=True by default) is another sampler."""
    ours, theirs = RespacedDDIMScheduler(), DDIMScheduler(clip_sample=False)
    for s in (ours, theirs):
        s.set_timesteps(10)
    assert ours.timesteps.tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert theirs.timesteps.tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]


def test_ddim_respacing_that_cannot_be_done_fails_clearly():
    s = RespacedDDIMScheduler(timestep_respacing="ddim")
    for steps in (1, 600):
        with pytest.raises(ValueError, match=f"cannot take exactly {steps} of 1000 timesteps with an integer stride"):
            s.set_timesteps(steps)
    with pytest.raises(SchedulerConfigError, match="timestep_respacing"):
        RespacedDDIMScheduler(timestep_respacing="ddim50")
    with pytest.raises(ValueError, match="not in scheduler.timesteps"):
        s.set_timesteps(10)
        s.step(np.zeros(SHAPE, np.float32), 5, np.zeros(SHAPE, np.float32))


def test_the_dit_default_config_and_switching_class():
    """Original-checkpoint bundles carry this scheduler, unclipped (test_cli checks a built manifest); --scheduler ddim
    on them keeps clip_sample off and alpha_bar = 1 at the end, as DiT."""
    from keystep.export.build import DIT_TRAINING_SCHEDULE, resolve_scheduler_config

    config = resolve_scheduler_config(None, None, None)
    assert config == DIT_TRAINING_SCHEDULE and config["clip_sample"] is False
    assert isinstance(make_scheduler(config), RespacedDDIMScheduler)
    ddim = make_scheduler(config, "ddim")
    assert isinstance(ddim, DDIMScheduler) and ddim.config["clip_sample"] is False
    assert ddim.config["set_alpha_to_one"] is True
    assert make_scheduler(resolve_scheduler_config(None, None, "ddim")).config == ddim.config


def test_what_each_source_gets_without_a_scheduler_config(original_checkpoint, dit_pipeline_dir, monkeypatch,
                                                          tmp_path):
    """The manifest's scheduler per source (write_bundle replaced: no export needed to see it)."""
    from keystep.export import build

    written = {}
    monkeypatch.setattr(build, "write_bundle", lambda out, stages, fields, **kw: written.setdefault(out.name, fields))
    build.build_dit_bundle(str(original_checkpoint), str(tmp_path / "original"), num_heads=4, progress=print)
    build.build_dit_bundle("random:dit-tiny", str(tmp_path / "random"), progress=print)
    build.build_dit_bundle(str(dit_pipeline_dir), str(tmp_path / "pipeline"), progress=print)
    assert written["original"]["scheduler"] == {**build.DIT_TRAINING_SCHEDULE, "clip_sample": False}
    assert written["random"]["scheduler"] == {**build.DIT_TRAINING_SCHEDULE, "clip_sample": True}
    pipeline = written["pipeline"]["scheduler"]  # a diffusers pipeline keeps its own scheduler_config.json
    assert pipeline["_class_name"] == "DDIMScheduler" and pipeline["clip_sample"] is False
