"""SDXL with every plan keystep has (slow: a second bundle with the full graph, a DeepCache variant and an SDXL
ControlNet): the full graph vs StableDiffusionXLPipeline, DeepCache vs the ``deepcache`` package's helper on the same
pipeline, the SDXL ControlNet vs StableDiffusionXLControlNetPipeline and at key steps vs the reference loop, and
``keystep tune`` / ``keystep profile`` on the bundle."""

import json

import DeepCache
import numpy as np
import pytest
import torch
from PIL import Image

from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import Bundle
from keystep.runtime.sampler import SamplingOptions
from keystep.runtime.unet_sampler import UNetSampler, load_control_image
from keystep.tools.cli import main
from sd_reference import encoder_propagation_loop, sdxl_conditioning, tiny_controlnet

pytestmark = pytest.mark.slow
PROMPT = "a photo of an astronaut riding a horse"
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def controlnet_dir(sdxl_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "controlnet"
    tiny_controlnet(sdxl_pipe.unet).save_pretrained(path)  # ControlNetModel.from_unet: an SDXL (text_time) ControlNet
    return path


@pytest.fixture(scope="module")
def sampler(sdxl_dir, controlnet_dir, tmp_path_factory):
    from keystep.export.build import build_unet_bundle

    out = tmp_path_factory.mktemp("bundles") / "sdxl-full"
    build_unet_bundle(str(sdxl_dir), str(out), controlnet=str(controlnet_dir), steps=10, cache="deep:0,3",
                      progress=lambda m: None)
    return UNetSampler(Bundle.load(out), get_backend("onnxruntime"))


def latents_for(h, w, seed):
    return torch.randn((1, 4, h // 8, w // 8), generator=torch.manual_seed(seed))


def options(sampler, **kw):
    return SamplingOptions.from_bundle(sampler.bundle, **kw)


def test_full_graph_baseline_equals_the_pipeline(sampler, sdxl_pipe):
    latents = latents_for(64, 80, 0)
    expected = sdxl_pipe(PROMPT, negative_prompt="blurry", height=64, width=80, num_inference_steps=6,
                         guidance_scale=6.0, latents=latents, output_type="latent").images.numpy()
    ours = sampler.sample([PROMPT], options(sampler, num_steps=6, guidance=6.0, key_steps="all"),
                          negative_prompt="blurry", height=64, width=80, init_noise=latents.numpy())
    assert {c.stage for c in ours.prepared.calls} == {"full"}
    np.testing.assert_allclose(ours.latents, expected, **TOL)


@pytest.mark.parametrize("branch,interval", [(0, 3), (3, 2)])
def test_deepcache_equals_the_deepcache_helper(sampler, sdxl_pipe, branch, interval):
    """The deepcache package's DeepCacheSDHelper wraps the SDXL pipeline's UNet blocks the same way as SD's."""
    latents = latents_for(64, 64, branch)
    helper = DeepCache.DeepCacheSDHelper(pipe=sdxl_pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch, skip_mode="uniform")
    helper.enable()
    try:
        expected = sdxl_pipe(PROMPT, num_inference_steps=8, guidance_scale=5.0, height=64, width=64,
                             latents=latents.clone(), output_type="latent").images.numpy()
    finally:
        helper.disable()
    ours = sampler.sample([PROMPT], options(sampler, num_steps=8, guidance=5.0, key_steps="all",
                                            cache=f"deep{branch}:uniform:{interval}"),
                          height=64, width=64, init_noise=latents.numpy())
    assert [c.stage for c in ours.prepared.calls] == ["full" if i % interval == 0 else "cached" for i in range(8)]
    np.testing.assert_allclose(ours.latents, expected, **TOL)


def control_image(tmp_path, h, w):
    edges = (np.random.default_rng(0).random((h, w)) > 0.8).astype(np.uint8) * 255
    path = tmp_path / "edges.png"
    Image.fromarray(np.stack([edges] * 3, axis=-1)).save(path)
    return path


def test_controlnet_baseline_equals_the_sdxl_controlnet_pipeline(sampler, sdxl_dir, controlnet_dir, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        sdxl_dir, controlnet=ControlNetModel.from_pretrained(controlnet_dir), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    path = control_image(tmp_path, 64, 64)
    latents = latents_for(64, 64, 4)
    expected = pipe(PROMPT, image=Image.open(path), height=64, width=64, num_inference_steps=5, guidance_scale=6.0,
                    controlnet_conditioning_scale=0.7, latents=latents, output_type="latent").images.numpy()
    ours = sampler.sample([PROMPT], options(sampler, num_steps=5, guidance=6.0, key_steps="all"), height=64,
                          width=64, init_noise=latents.numpy(), control_image=load_control_image(path, 64, 64),
                          control_scale=0.7)
    np.testing.assert_allclose(ours.latents, expected, **TOL)
    plain = sampler.sample([PROMPT], options(sampler, num_steps=5, guidance=6.0, key_steps="all"), height=64,
                           width=64, init_noise=latents.numpy())
    assert np.abs(plain.latents - ours.latents).max() > 1e-3


def test_controlnet_at_key_steps_equals_the_reference_loop(sampler, sdxl_pipe, controlnet_dir, tmp_path):
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(controlnet_dir).eval()
    control = load_control_image(control_image(tmp_path, 64, 64), 64, 64)
    text, added = sdxl_conditioning(sdxl_pipe, PROMPT, 64, 64)
    latents = latents_for(64, 64, 6)
    expected = encoder_propagation_loop(sdxl_pipe.unet, sdxl_pipe.scheduler, text, latents, 8, 5.0, {0, 1, 4},
                                        added=added, controlnet=controlnet,
                                        control_image=torch.from_numpy(control)[None], control_scale=0.8).numpy()
    ours = sampler.sample([PROMPT], options(sampler, num_steps=8, guidance=5.0, key_steps="0,1,4", parallel=True),
                          height=64, width=64, init_noise=latents.numpy(), control_image=control, control_scale=0.8)
    np.testing.assert_allclose(ours.latents, expected, **TOL)


def test_tune_and_profile(sampler, tmp_path, capsys):
    root = sampler.bundle.root
    assert main(["tune", str(root), "--target-speedup", "1.5", "--steps", "6", "--seeds", "1", "--prompt", "a",
                 "--dry-run", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.split("\nchosen plan")[0])
    assert record["chosen"] and any(t["plan"].startswith("deep0:") for t in record["trials"])
    assert main(["profile", str(root), "--steps", "4", "--repeats", "1", "--warmup", "0", "--height", "64",
                 "--width", "64", "--plan", "default", "--plan", "deep0:uniform:2", "--json"]) == 0
    profile = json.loads(capsys.readouterr().out)
    stages = profile["plans"][0]["stages"]
    assert "text_encoder" in stages and "text_encoder_2" in stages and "full" in stages
