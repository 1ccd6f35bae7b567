"""Sampling from bundles vs independent references: diffusers' DiTPipeline and a plain PyTorch loop."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from dit_reference import baseline_sample, encoder_propagation_sample
from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import Bundle
from keystep.runtime.dit_sampler import DiTSampler
from keystep.runtime.sampler import SamplingOptions

DIT_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
DIFFUSERS = {"ddim": DDIMScheduler, "dpmpp-2m": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}


@pytest.fixture(scope="module")
def sampler(tiny_bundle):
    return DiTSampler(Bundle.load(tiny_bundle), get_backend("onnxruntime"))


def reference_scheduler(name, steps):
    scheduler = DIFFUSERS[name](**DIT_SCHEDULE)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("scheduler_name", ["ddim", "dpmpp-2m"])
def test_baseline_plan_equals_diffusers_dit_pipeline(pipeline_bundle, dit_pipeline_dir, scheduler_name):
    pipe = DiTPipeline.from_pretrained(dit_pipeline_dir)
    pipe.scheduler = DIFFUSERS[scheduler_name].from_config(pipe.scheduler.config)
    labels, steps, guidance = [3, 999], 8, 3.0
    expected = pipe(labels, guidance_scale=guidance, generator=torch.manual_seed(7), num_inference_steps=steps,
                    output_type="np").images
    # DiTPipeline draws z_T with randn_tensor(generator) on CPU: the same draw is our --init-noise
    z_T = torch.randn((2, 4, 8, 8), generator=torch.manual_seed(7)).numpy()
    sampler = DiTSampler(Bundle.load(pipeline_bundle), get_backend("onnxruntime"))
    options = SamplingOptions.from_bundle(sampler.bundle, num_steps=steps, guidance=guidance, key_steps="all",
                                          scheduler=scheduler_name)
    result = sampler.sample(labels, options, init_noise=z_T)
    images = sampler.runner("vae_decoder").run({"latent": result.latents})["image"].transpose(0, 2, 3, 1)
    assert np.abs(images - expected).max() < 2e-4
    assert np.abs(expected[0] - expected[1]).max() > 1e-2  # the two classes give different images


def run_reference(model, z_T, labels, scheduler_name, steps, guidance, key_steps, injection, split):
    sched = reference_scheduler(scheduler_name, steps)
    # standard diffusers pipelines start from randn * init_noise_sigma (DiTPipeline forgets it: wrong for Euler)
    z = torch.from_numpy(z_T) * sched.init_noise_sigma
    with torch.no_grad():
        if key_steps is None:
            return baseline_sample(model, z, labels, sched, guidance, noise_injection=injection).numpy()
        return encoder_propagation_sample(model, z, labels, sched, guidance, split, set(key_steps),
                                          noise_injection=injection).numpy()


@pytest.mark.parametrize(
    "scheduler_name,steps,key_steps,guidance",
    [("ddim", 10, [0, 3, 4, 9], 4.0), ("dpmpp-2m", 10, [0, 1, 5], 2.5), ("euler", 8, [0, 4], 4.0),
     ("ddim", 6, [0], 1.0)],
)
def test_key_step_plan_equals_pytorch_encoder_propagation(sampler, original_dit, scheduler_name, steps, key_steps,
                                                          guidance):
    labels = [1, 7, 2]
    z_T = sampler.initial_noise(3, seed=11)
    options = SamplingOptions.from_bundle(sampler.bundle, num_steps=steps, guidance=guidance, key_steps=key_steps,
                                          scheduler=scheduler_name)
    ours = sampler.sample(labels, options, init_noise=z_T).latents
    split = sampler.bundle.manifest["split"]
    expected = run_reference(original_dit, z_T, labels, scheduler_name, steps, guidance, key_steps, (0.003, 0.3),
                             split)
    assert np.abs(ours - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())
    baseline = run_reference(original_dit, z_T, labels, scheduler_name, steps, guidance, None, None, split)
    if len(key_steps) < steps:
        assert np.abs(ours - baseline).max() > 1e-3  # propagation really skipped encoder work


def test_parallel_equals_sequential_and_split_decoder_batches(sampler):
    labels = [0, 5]
    z_T = sampler.initial_noise(2, seed=3)
    base = dict(num_steps=10, guidance=4.0, key_steps="0,4", scheduler="ddim")
    parallel = sampler.sample(labels, SamplingOptions.from_bundle(sampler.bundle, parallel=True, **base),
                              init_noise=z_T)
    sequential = sampler.sample(labels, SamplingOptions.from_bundle(sampler.bundle, parallel=False, **base),
                                init_noise=z_T)
    chunked = sampler.sample(labels, SamplingOptions.from_bundle(sampler.bundle, parallel=True, max_decoder_batch=8,
                                                                 **base), init_noise=z_T)
    assert max(c.batch for c in parallel.prepared.calls) == 24  # 6 steps x CFG x 2 images in one call
    assert max(c.batch for c in sequential.prepared.calls) == 4
    default = sampler.prepare(SamplingOptions.from_bundle(sampler.bundle, **base), 2)
    assert max(c.batch for c in default.calls) == 4  # ORT on CPU: sequential decoders (measured faster)
    assert max(c.batch for c in chunked.prepared.calls) == 8
    np.testing.assert_allclose(parallel.latents, sequential.latents, rtol=0, atol=1e-5)
    np.testing.assert_allclose(parallel.latents, chunked.latents, rtol=0, atol=1e-5)


def test_noise_injection_follows_the_formula(sampler, original_dit):
    """z <- z + alpha*z_T before each scheduler step with t < tau*T (large alpha so the effect is unmistakable)."""
    labels, z_T = [2], sampler.initial_noise(1, seed=5)
    common = dict(num_steps=10, guidance=4.0, key_steps="0,5", scheduler="ddim", noise_alpha=0.05, noise_tau=0.6)
    on = sampler.sample(labels, SamplingOptions.from_bundle(sampler.bundle, **common), init_noise=z_T).latents
    off = sampler.sample(labels, SamplingOptions.from_bundle(sampler.bundle, noise_injection=False, **common),
                         init_noise=z_T).latents
    split = sampler.bundle.manifest["split"]
    expected_on = run_reference(original_dit, z_T, labels, "ddim", 10, 4.0, [0, 5], (0.05, 0.6), split)
    expected_off = run_reference(original_dit, z_T, labels, "ddim", 10, 4.0, [0, 5], None, split)
    np.testing.assert_allclose(on, expected_on, rtol=0, atol=1e-4)
    np.testing.assert_allclose(off, expected_off, rtol=0, atol=1e-4)
    assert np.abs(on - off).max() > 1e-2
    # tau = 0: no timestep is below it, so injection is a no-op
    none = sampler.sample(labels, SamplingOptions.from_bundle(sampler.bundle, **{**common, "noise_tau": 0.0}),
                          init_noise=z_T).latents
    np.testing.assert_array_equal(none, off)


def test_noise_injection_defaults_on_for_key_step_plans_only(sampler):
    assert sampler.prepare(SamplingOptions.from_bundle(sampler.bundle, key_steps="0,2"), 1).noise_injection
    assert not sampler.prepare(SamplingOptions.from_bundle(sampler.bundle, key_steps="all"), 1).noise_injection
