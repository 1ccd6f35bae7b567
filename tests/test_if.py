"""DeepFloyd-IF cascade bundles vs diffusers: the T5 tokenizer (tokenizers library) vs transformers' T5Tokenizer, the
T5 stage with external weights, stage I (learned-range variance, T5 through encoder_hid_proj) and stage II
(upscaled + noised stage-I image, noise level as class embedding) vs IFPipeline / IFSuperResolutionPipeline on the
same noise, their key-step plans vs an independent loop, and the CLI (one generate for the whole cascade; inspect,
profile, tune per diffusion stage)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import Bundle
from keystep.runtime.if_sampler import CascadeSampler, resize_bilinear_align_corners
from keystep.runtime.sampler import SamplingOptions
from keystep.runtime.t5_tokenizer import T5Tokenizer as RuntimeT5Tokenizer
from keystep.tools.cli import main
from if_reference import TorchNormal
from sd_reference import encoder_propagation_loop

PROMPTS = ["A photo of a Cat riding a horse", "  an oil painting! "]
NEGATIVE = "blurry"
TOL = dict(rtol=1e-4, atol=1e-4)
# key-step runs vs the torch loop: ORT-vs-torch rounding compounds over 8 thresholded, stochastic DDPM steps (seen:
# 1.9e-4 on one pixel of 768); the baselines hold 1e-4
LOOP_TOL = dict(rtol=1e-4, atol=5e-4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cascade(if_bundle_dir):
    return CascadeSampler(Bundle.load(if_bundle_dir), get_backend("onnxruntime", threads=1))


def options(stage, **kw):
    return SamplingOptions.from_bundle(stage.bundle, **kw)


def test_cascade_layout(cascade, if_bundle_dir):
    top = cascade.bundle
    assert top.family == "cascade" and [p["role"] for p in top.manifest["cascade"]] == ["base", "super_resolution"]
    assert set(top.stages) == {"text_encoder"} and set(top.manifest["assets"]) == {"tokenizer"}
    assert [f["path"] for f in top.manifest["stages"]["text_encoder"]["files"]] == [
        "text_encoder.onnx", "text_encoder.onnx.data"]  # external weights (the fixture's threshold is 0)
    first, second = (s.bundle for s in cascade.stages)
    assert first.family == second.family == "if" and first.root == if_bundle_dir / "stage_1"
    assert first.model_config["if"] == {"role": "base", "image_channels": 3, "learned_variance": True}
    assert second.model_config["if"]["role"] == "super_resolution"
    assert second.model_config["conditioning"] == ["class_labels"] and "conditioning" not in first.model_config
    assert [s.name for s in second.stage("decoder").inputs][-1] == "class_labels"
    assert second.stage("encoder").inputs[0].shape == ("batch", 6, "height", "width")  # sample + upscaled image
    assert first.default_plan["guidance"] == 7.0 and second.default_plan["noise_level"] == 250
    assert (first.default_plan["key_steps"], second.default_plan["key_steps"]) == ("default", "all")
    assert first.model_config["size_multiple"] == 4  # fixed 2x Resnet upsamplers over two downsamples


def test_t5_tokenizer_matches_transformers(if_bundle_dir, if_dirs):
    from transformers import T5Tokenizer

    ours = RuntimeT5Tokenizer.from_dir(if_bundle_dir / "tokenizer")
    reference = T5Tokenizer.from_pretrained(if_dirs[0] / "tokenizer")
    texts = ["a photo of a cat riding!", "", "cat " * 100, "<extra_id_3> weird   spaces\ttab", "ünïcode ☃ 12.5"]
    expected = reference(texts, padding="max_length", max_length=77, truncation=True, add_special_tokens=True)
    ids, mask = ours.encode(texts, 77)
    np.testing.assert_array_equal(ids, np.array(expected.input_ids))
    np.testing.assert_array_equal(mask, np.array(expected.attention_mask))
    assert ids[2, -1] == reference.eos_token_id and mask[1].sum() == 1  # truncation keeps </s>; "" is only </s>


def test_text_embeddings_match_the_pipeline(cascade, if_pipes):
    """Lower-casing + stripping, T5 tokens with the attention mask, the ONNX T5 (external data) == encode_prompt."""
    with torch.no_grad():
        embeds, negative = if_pipes[0].encode_prompt(PROMPTS, negative_prompt=[NEGATIVE] * 2, device="cpu")
    np.testing.assert_allclose(cascade.text_rows(PROMPTS, NEGATIVE, True),
                               torch.cat([negative, embeds]).numpy(), **TOL)


def test_bilinear_upscale_matches_torch():
    image = torch.randn(2, 3, 5, 7, generator=torch.manual_seed(0))
    for size in [(20, 28), (16, 9), (5, 7), (1, 3)]:
        expected = F.interpolate(image, size, mode="bilinear", align_corners=True).numpy()
        np.testing.assert_allclose(resize_bilinear_align_corners(image.numpy(), *size), expected, atol=1e-6)


def stage_1_noise(seed, images, size):
    """IFPipeline's draws from one generator: the initial images, then one noise per DDPM step."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((images, 3, size, size), generator=generator), generator


def test_stage_1_baseline_equals_if_pipeline(cascade, if_pipes):
    first = cascade.stages[0]
    expected = if_pipes[0](PROMPTS, negative_prompt=[NEGATIVE] * 2, num_inference_steps=6, guidance_scale=7.0,
                           generator=torch.Generator().manual_seed(0), output_type="pt").images.numpy()
    noise, generator = stage_1_noise(0, 2, 16)
    ours = first.sample(PROMPTS, options(first, num_steps=6, guidance=7.0, key_steps="all"), NEGATIVE,
                        init_noise=noise.numpy(), generator=TorchNormal(generator))
    np.testing.assert_allclose(ours.latents, expected, **TOL)


@pytest.fixture(scope="module")
def low_res(if_pipes):
    """A stage-I image as IFSuperResolutionPipeline takes it (IFPipeline's output_type="pt")."""
    return if_pipes[0](PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(5),
                       output_type="pt").images


def test_stage_2_baseline_equals_super_resolution_pipeline(cascade, if_pipes, low_res):
    second = cascade.stages[1]
    expected = if_pipes[1](image=low_res, prompt=PROMPTS, negative_prompt=[NEGATIVE] * 2, num_inference_steps=5,
                           guidance_scale=4.0, noise_level=100, generator=torch.Generator().manual_seed(1),
                           output_type="pt").images.numpy()
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn((2, 3, 32, 32), generator=generator)  # then the upscale noise, then the DDPM steps
    ours = second.sample(PROMPTS, options(second, num_steps=5, guidance=4.0, key_steps="all"), NEGATIVE,
                         init_noise=noise.numpy(), image=low_res.numpy(), noise_level=100,
                         generator=TorchNormal(generator))
    np.testing.assert_allclose(ours.latents, expected, **TOL)


@pytest.mark.parametrize("key_steps", [[0, 1, 4], "default"])
def test_stage_1_key_steps_equal_the_reference_loop(cascade, if_pipes, key_steps):
    first, pipe = cascade.stages[0], if_pipes[0]
    text = torch.from_numpy(cascade.text_rows(PROMPTS[:1], None, True))
    noise, generator = stage_1_noise(2, 1, 16)
    keys = key_steps if isinstance(key_steps, list) else [0, 5, 7]  # FasterDiffusion's IF rule at 8 steps
    expected = encoder_propagation_loop(pipe.unet, pipe.scheduler, text, noise, 8, 7.0, set(keys),
                                        generator=generator).numpy()
    for parallel in (True, False):
        noise, generator = stage_1_noise(2, 1, 16)
        ours = first.sample(PROMPTS[:1], options(first, num_steps=8, key_steps=key_steps, parallel=parallel),
                            init_noise=noise.numpy(), generator=TorchNormal(generator))
        assert list(ours.prepared.plan.key_steps) == keys
        np.testing.assert_allclose(ours.latents, expected, **LOOP_TOL)


def test_stage_2_key_steps_equal_the_reference_loop(cascade, if_pipes, low_res):
    """Stage II's decoders carry the noise level (class embedding) per row; upscaled image concatenated."""
    second, pipe = cascade.stages[1], if_pipes[1]
    text = torch.from_numpy(cascade.text_rows(PROMPTS[:1], None, True))
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn((1, 3, 32, 32), generator=generator)
    upscaled = F.interpolate(low_res[:1], (32, 32), mode="bilinear", align_corners=True)
    upscaled = pipe.image_noising_scheduler.add_noise(upscaled, torch.randn(upscaled.shape, generator=generator),
                                                      torch.tensor([250]))
    expected = encoder_propagation_loop(pipe.unet, pipe.scheduler, text, noise, 8, 4.0, {0, 2, 5}, image=upscaled,
                                        class_labels=torch.full((2,), 250.0), generator=generator).numpy()
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn((1, 3, 32, 32), generator=generator)
    ours = second.sample(PROMPTS[:1], options(second, num_steps=8, key_steps="0,2,5", parallel=True),
                         init_noise=noise.numpy(), image=low_res[:1].numpy(), generator=TorchNormal(generator))
    assert any(len(c.steps) > 1 for c in ours.prepared.calls)
    np.testing.assert_allclose(ours.latents, expected, **LOOP_TOL)


def test_cascade_runs_stage_2_on_stage_1s_output(cascade):
    results = cascade.sample(PROMPTS, seed=4)
    assert [r.latents.shape for r in results] == [(2, 3, 16, 16), (2, 3, 32, 32)]
    alone = cascade.stages[1].sample(PROMPTS, options(cascade.stages[1]), image=results[0].latents, seed=4)
    np.testing.assert_array_equal(alone.latents, results[1].latents)
    wide = cascade.sample(PROMPTS[:1], height=16, width=24, seed=4)  # stage II keeps its 2x ratio
    assert [r.latents.shape[2:] for r in wide] == [(16, 24), (32, 48)]


def test_cli_cascade(if_bundle_dir, sd_bundle_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", str(if_bundle_dir), "--prompt", "a cat", "--images", "2", "--steps", "3",
                 "--stage", "stage_2", "--key-steps", "all", "--out", str(out)]) == 0
    assert [Image.open(tmp_path / f"img-{i}.png").size for i in range(2)] == [(32, 32)] * 2
    text = capsys.readouterr().out
    assert "stage_1 16x16: default: 3 key steps of 10" in text  # i < 1, i > 8.5 or i mod 5 == 0
    assert "stage_2 32x32: all: 3 key steps of 3, 6 stage calls" in text  # all: encoder + decoder per step (no full)
    assert main(["generate", str(if_bundle_dir / "stage_1"), "--prompt", "a cat", "--steps", "2",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == (16, 16)
    for argv, message in [
        (["generate", str(if_bundle_dir), "--prompt", "a", "--stage", "stage_9"], "stage_1, stage_2"),
        (["generate", str(if_bundle_dir), "--prompt", "a", "--height", "18"], "must be a multiple of 4"),
        (["generate", str(if_bundle_dir), "--prompt", "a", "--original-size", "1", "1"], "SDXL bundles only"),
        (["generate", str(sd_bundle_dir), "--prompt", "a", "--noise-level", "3"], "super-resolution"),
        (["profile", str(if_bundle_dir)], "each diffusion stage has its own plan"),
        (["tune", str(if_bundle_dir), "--target-speedup", "2"], "keystep tune"),
        (["engines", str(if_bundle_dir)], "keystep engines"),
    ]:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["inspect", str(if_bundle_dir), "--stage", "stage_1", "--key-steps", "0,4"]) == 0
    text = capsys.readouterr().out
    assert "=== stage_1" in text and "key steps [0, 4]" in text and "=== stage_2" in text


def test_profile_and_tune_one_stage(if_bundle_dir, capsys):
    stage = if_bundle_dir / "stage_2"
    assert main(["profile", str(stage), "--steps", "4", "--repeats", "1", "--warmup", "0", "--plan", "default",
                 "--json"]) == 0
    profile = json.loads(capsys.readouterr().out)
    assert profile["family"] == "if" and [p["name"] for p in profile["plans"]][0].startswith("all")
    assert set(profile["plans"][1]["stages"]) >= {"encoder", "decoder", "host"}
    assert main(["tune", str(stage), "--target-speedup", "1.15", "--steps", "6", "--seeds", "1", "--dry-run",
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out.split("\nchosen plan")[0])
    assert record["chosen"] and all(t["flops_ratio"] <= 1 for t in record["trials"])
