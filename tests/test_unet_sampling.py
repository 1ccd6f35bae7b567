"""Text-to-image from SD bundles vs diffusers' own pipelines and an independent FasterDiffusion loop."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import Bundle
from keystep.runtime.sampler import SamplingOptions
from keystep.runtime.unet_sampler import UNetSampler, load_control_image
from keystep.tools.cli import main
from sd_reference import sd_encoder_propagation_sample

DIFFUSERS = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler}
PROMPT, NEGATIVE = "a handwritten 7", "blurry"


@pytest.fixture(scope="module")
def sampler(sd_bundle_dir):
    return UNetSampler(Bundle.load(sd_bundle_dir), get_backend("onnxruntime"))


@pytest.fixture(scope="module")
def pipe(sd_dir):
    return StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)


def latents_for(images, h, w, seed=0):
    return torch.randn((images, 4, h // 8, w // 8), generator=torch.manual_seed(seed))


def options(sampler, **kw):
    return SamplingOptions.from_bundle(sampler.bundle, **kw)


@pytest.mark.parametrize("scheduler_name", ["ddim", "pndm", "euler"])
def test_baseline_equals_stable_diffusion_pipeline(sampler, pipe, scheduler_name):
    pipe.scheduler = DIFFUSERS[scheduler_name].from_config(pipe.scheduler.config)
    latents = latents_for(2, 64, 96)
    expected = pipe([PROMPT, "the digit seven"], negative_prompt=[NEGATIVE] * 2, height=64, width=96, num_inference_steps=6,
                    guidance_scale=7.5, latents=latents, output_type="np").images
    result = sampler.sample([PROMPT, "the digit seven"], options(sampler, num_steps=6, guidance=7.5, key_steps="all",
                            scheduler=scheduler_name), negative_prompt=NEGATIVE, height=64, width=96,
                            init_noise=latents.numpy())
    images = sampler.runner("vae_decoder").run({"latent": result.latents})["image"].transpose(0, 2, 3, 1)
    assert images.shape == expected.shape == (2, 64, 96, 3)
    np.testing.assert_allclose(images, expected, rtol=0, atol=2e-4)


@pytest.mark.parametrize("scheduler_name,key_steps", [("ddim", [0, 1, 2, 5]), ("euler", [0, 3]), ("pndm", None)])
def test_key_step_plan_equals_reference_loop(sampler, pipe, scheduler_name, key_steps):
    scheduler = DIFFUSERS[scheduler_name].from_config(pipe.scheduler.config)
    steps = 8
    scheduler.set_timesteps(steps)  # PNDM with PRK warm-up: 8 steps are 17 model evaluations
    evaluations = len(scheduler.timesteps)
    keys = key_steps if key_steps is not None else [k for k in (0, 1, 2, 3, 5, 10, 15, 25, 35) if k < evaluations]
    latents = latents_for(1, 64, 64, seed=3)
    expected = sd_encoder_propagation_sample(pipe, scheduler, PROMPT, None, latents, steps, 5.0, set(keys)).numpy()
    ours = sampler.sample([PROMPT], options(sampler, num_steps=steps, guidance=5.0, scheduler=scheduler_name,
                                            key_steps=key_steps if key_steps is not None else "default",
                                            parallel=True),
                          height=64, width=64, init_noise=latents.numpy())
    assert list(ours.prepared.plan.key_steps) == keys
    np.testing.assert_allclose(ours.latents, expected, rtol=1e-4, atol=1e-4)
    sequential = sampler.sample([PROMPT], options(sampler, num_steps=steps, guidance=5.0, scheduler=scheduler_name,
                                                  key_steps=keys, parallel=False), height=64, width=64,
                                init_noise=latents.numpy())
    np.testing.assert_allclose(sequential.latents, ours.latents, rtol=0, atol=1e-5)


def control_png(tmp_path, h, w):
    rng = np.random.default_rng(0)
    edges = (rng.random((h, w)) > 0.8).astype(np.uint8) * 255  # a sparse "edge map"
    path = tmp_path / "edges.png"
    Image.fromarray(np.stack([edges] * 3, axis=-1)).save(path)
    return path


def test_controlnet_baseline_equals_diffusers_pipeline(sampler, sd_dir, controlnet_dir, tmp_path):
    from diffusers import ControlNetModel

    cn_pipe = StableDiffusionControlNetPipeline.from_pretrained(
        sd_dir, controlnet=ControlNetModel.from_pretrained(controlnet_dir), safety_checker=None,
        requires_safety_checker=False)
    path = control_png(tmp_path, 64, 64)
    latents = latents_for(1, 64, 64, seed=5)
    expected = cn_pipe(PROMPT, image=Image.open(path), height=64, width=64, num_inference_steps=5, guidance_scale=7.5,
                       controlnet_conditioning_scale=0.7, latents=latents, output_type="np").images
    result = sampler.sample([PROMPT], options(sampler, num_steps=5, guidance=7.5, key_steps="all"), height=64,
                            width=64, init_noise=latents.numpy(), control_image=load_control_image(path, 64, 64),
                            control_scale=0.7)
    images = sampler.runner("vae_decoder").run({"latent": result.latents})["image"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(images, expected, rtol=0, atol=2e-4)
    plain = sampler.sample([PROMPT], options(sampler, num_steps=5, guidance=7.5, key_steps="all"), height=64,
                           width=64, init_noise=latents.numpy())
    assert np.abs(plain.latents - result.latents).max() > 1e-3  # the control image really steers


def test_controlnet_runs_at_key_steps_only(sampler, pipe, sd_dir, controlnet_dir, tmp_path):
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(controlnet_dir).eval()
    path = control_png(tmp_path, 64, 64)
    control = load_control_image(path, 64, 64)
    latents = latents_for(1, 64, 64, seed=6)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    expected = sd_encoder_propagation_sample(pipe, scheduler, PROMPT, None, latents, 8, 5.0, {0, 1, 4},
                                             controlnet=controlnet, control_image=torch.from_numpy(control)[None],
                                             control_scale=0.8).numpy()
    ours = sampler.sample([PROMPT], options(sampler, num_steps=8, guidance=5.0, key_steps="0,1,4", scheduler="ddim"),
                          height=64,
                          width=64, init_noise=latents.numpy(), control_image=control, control_scale=0.8)
    np.testing.assert_allclose(ours.latents, expected, rtol=1e-4, atol=1e-4)


def test_cli_text_to_image(sd_bundle_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", str(sd_bundle_dir), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--images", "2",
                 "--height", "64", "--width", "80", "--steps", "4", "--out", str(out)]) == 0
    for i in range(2):
        assert Image.open(tmp_path / f"img-{i}.png").size == (80, 64)
    path = control_png(tmp_path, 64, 64)
    assert main(["generate", str(sd_bundle_dir), "--prompt", PROMPT, "--height", "64", "--width", "64", "--steps",
                 "3", "--control-image", str(path), "--out", str(tmp_path / "c.png")]) == 0
    capsys.readouterr()
    assert main(["generate", str(sd_bundle_dir), "--class", "3"]) == 2
    assert "--class: this is a text-to-image bundle: it takes a prompt" in capsys.readouterr().err
    assert main(["generate", str(sd_bundle_dir), "--prompt", "x", "--height", "60"]) == 2
    assert "--height: must be a multiple of" in capsys.readouterr().err
    assert main(["inspect", str(sd_bundle_dir), "--steps", "50"]) == 0
    text = capsys.readouterr().out
    assert "key steps [0, 1, 2, 3, 5, 10, 15, 25, 35]" in text
