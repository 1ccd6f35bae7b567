"""SDXL bundles (StableDiffusionXLPipeline layout) vs diffusers: the text_time conditioning (pooled text embedding +
size/crop time ids) through the split stages, both CLIP encoders through the runtime's own BPE tokenizer, the
baseline plan vs StableDiffusionXLPipeline on the same latents, the key-step plan vs an independent loop (batched
and sequential decoders)."""

import numpy as np
import pytest
import torch
from PIL import Image

from keystep.export.unet_model import UNetFullStage
from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import Bundle
from keystep.runtime.sampler import SamplingOptions
from keystep.runtime.sdxl import SizeConditioning
from keystep.runtime.unet_sampler import UNetSampler
from keystep.tools.cli import main
from sd_reference import encoder_propagation_loop, sdxl_conditioning

TOL = dict(rtol=1e-4, atol=1e-4)
PROMPTS = ["a photo of an astronaut riding a horse", "Ünïcode & punctuation!!"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sampler(sdxl_bundle_dir):
    return UNetSampler(Bundle.load(sdxl_bundle_dir), get_backend("onnxruntime", threads=1))


def unet_rows(batch, h, w, text_len, seed):
    """Inputs with a different timestep, pooled embedding and size/crop ids in every row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    e = torch.randn(batch, text_len, 64, generator=g)
    added = {"text_embeds": torch.randn(batch, 32, generator=g),
             "time_ids": torch.randint(0, 1024, (batch, 6), generator=g).float()}
    return x, t, e, added


def feeds(**tensors):
    return {k: v.numpy() for k, v in tensors.items()}


def test_manifest_and_stage_io(sampler):
    bundle = sampler.bundle
    assert bundle.model_config["sdxl"] == {"time_ids": 6, "projection_dim": 32, "force_zeros_for_empty_prompt": True}
    assert bundle.model_config["conditioning"] == ["text_embeds", "time_ids"]
    assert set(bundle.stages) == {"text_encoder", "text_encoder_2", "encoder", "decoder", "vae_decoder"}  # --no-full
    assert set(bundle.manifest["assets"]) == {"tokenizer", "tokenizer_2"}
    extra = [("text_embeds", ("batch", 32)), ("time_ids", ("batch", 6))]
    for stage in ("encoder", "decoder"):
        assert [(s.name, s.shape) for s in bundle.stage(stage).inputs][-2:] == extra
    assert [(s.name, s.shape) for s in bundle.stage("text_encoder_2").outputs] == [
        ("text_embeddings", ("batch", "text_len", 40)), ("text_embeds", ("batch", 32))]


def test_split_stages_match_the_unet(sampler, sdxl_pipe):
    """encoder -> decoder (ONNX) with per-row conditioning == UNet2DConditionModel(added_cond_kwargs=...), at
    non-square and odd latent sizes; the added embedding changes the output (so it is really carried)."""
    unet = sdxl_pipe.unet
    for i, (batch, h, w, text_len) in enumerate([(2, 8, 10, 77), (3, 7, 5, 4)]):
        x, t, e, added = unet_rows(batch, h, w, text_len, seed=i)
        with torch.no_grad():
            expected = unet(x, t, e, added_cond_kwargs=added).sample.numpy()
            other = unet(x, t, e, added_cond_kwargs={**added, "time_ids": added["time_ids"] + 64}).sample.numpy()
        enc = sampler.runner("encoder").run(feeds(sample=x, timestep=t, encoder_hidden_states=e, **added))
        out = sampler.runner("decoder").run({**enc, **feeds(timestep=t, encoder_hidden_states=e, **added)})
        np.testing.assert_allclose(out["noise_pred"], expected, **TOL)
        assert np.abs(other - expected).max() > 1e-3


def test_batched_decoder_rows_carry_their_own_conditioning(sampler):
    """One decoder call over 3 steps x 2 images (encoder features, text and added conditioning tiled per step) ==
    three single-step calls: each row's time embedding uses its own timestep and its own text_embeds/time_ids."""
    x, t, e, added = unet_rows(2, 8, 8, 77, seed=5)
    enc = sampler.runner("encoder").run(feeds(sample=x, timestep=t, encoder_hidden_states=e, **added))
    steps = np.array([[901.0, 901.0], [601.0, 601.0], [1.0, 1.0]], np.float32)
    tiled = {k: np.concatenate([v] * 3) for k, v in {**enc, **feeds(encoder_hidden_states=e, **added)}.items()}
    together = sampler.runner("decoder").run({**tiled, "timestep": steps.reshape(-1)})["noise_pred"]
    for s in range(3):
        alone = sampler.runner("decoder").run({**enc, **feeds(encoder_hidden_states=e, **added),
                                               "timestep": steps[s]})["noise_pred"]
        np.testing.assert_allclose(together[2 * s: 2 * s + 2], alone, **TOL)
    assert np.abs(together[0:2] - together[2:4]).max() > 1e-3


def test_full_stage_module_matches_the_unet(sdxl_pipe):
    """The full stage's torch module (exported by default builds; the slow tests export it) == diffusers."""
    x, t, e, added = unet_rows(2, 9, 6, 5, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(UNetFullStage(sdxl_pipe.unet)(x, t, e, added["text_embeds"], added["time_ids"]),
                                   sdxl_pipe.unet(x, t, e, added_cond_kwargs=added).sample, rtol=1e-5, atol=1e-5)


def test_text_encoders_match_the_pipeline(sampler, sdxl_pipe):
    """Both tokenizers (the second pads with "!") in pure Python and both ONNX encoders == encode_prompt."""
    long = "a very long prompt " * 30  # truncated at 77 tokens
    prompts, prompts_2 = [*PROMPTS, long], ["second encoder text", "", "x"]
    text, conditioning = sampler.encode_prompt(prompts, prompts_2)
    with torch.no_grad():
        embeds, _, pooled, _ = sdxl_pipe.encode_prompt(prompts, prompt_2=prompts_2, device="cpu",
                                                       do_classifier_free_guidance=False)
    np.testing.assert_allclose(text, embeds.numpy(), **TOL)
    np.testing.assert_allclose(conditioning["text_embeds"], pooled.numpy(), **TOL)


def latents_for(images, h, w, seed):
    return torch.randn((images, 4, h // 8, w // 8), generator=torch.manual_seed(seed))


@pytest.mark.parametrize("case", ["defaults", "negative+prompt_2+sizes"])
def test_baseline_equals_the_sdxl_pipeline(sampler, sdxl_pipe, case):
    """2 images at 64x80 through the baseline plan (encoder + decoder every step) == StableDiffusionXLPipeline on
    the same latents: without a negative prompt (zero negative embeddings) and with negative prompts, a second
    prompt and size/crop conditioning."""
    latents = latents_for(2, 64, 80, seed=1)
    kwargs = {}
    if case != "defaults":
        kwargs = dict(negative_prompt="blurry", negative_prompt_2="lowres", prompt_2="an oil painting",
                      original_size=(96, 128), crops_coords_top_left=(8, 16), target_size=(64, 80))
    expected = sdxl_pipe(PROMPTS, height=64, width=80, num_inference_steps=5, guidance_scale=6.0, latents=latents,
                         output_type="latent", **{k: [v] * 2 if "prompt" in k else v for k, v in kwargs.items()}
                         ).images.numpy()
    sizes = {k: v for k, v in kwargs.items() if "prompt" not in k}
    result = sampler.sample(PROMPTS, SamplingOptions.from_bundle(sampler.bundle, num_steps=5, guidance=6.0,
                                                                 key_steps="all"),
                            negative_prompt=kwargs.get("negative_prompt"), prompt_2=kwargs.get("prompt_2"),
                            negative_prompt_2=kwargs.get("negative_prompt_2"), height=64, width=80,
                            init_noise=latents.numpy(), size_conditioning=SizeConditioning(**sizes))
    calls = result.prepared.calls  # no full graph: every step is a key step with its own decoder call
    assert [c.stage for c in calls] == ["encoder", "decoder"] * 5 and all(len(c.steps) == 1 for c in calls)
    np.testing.assert_allclose(result.latents, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("key_steps", [[0, 1, 4], "default"])
def test_key_step_plan_equals_the_reference_loop(sampler, sdxl_pipe, key_steps):
    """Encoder propagation (decoders batched per group, then one per step) == a plain loop that runs the encoder
    at key steps and the decoder at every step with the SDXL added embedding of each row (sd_reference)."""
    steps = 8
    keys = key_steps if isinstance(key_steps, list) else [0, 1, 2, 3, 5]  # the UNet default cut to 8 steps
    text, added = sdxl_conditioning(sdxl_pipe, PROMPTS[0], 64, 64)
    latents = latents_for(1, 64, 64, seed=3)
    expected = encoder_propagation_loop(sdxl_pipe.unet, sdxl_pipe.scheduler, text, latents, steps, 5.0, set(keys),
                                        added=added).numpy()
    for parallel in (True, False):
        ours = sampler.sample([PROMPTS[0]], SamplingOptions.from_bundle(
            sampler.bundle, num_steps=steps, guidance=5.0, key_steps=key_steps, parallel=parallel),
            height=64, width=64, init_noise=latents.numpy())
        assert list(ours.prepared.plan.key_steps) == keys
        assert any(len(c.steps) > 1 for c in ours.prepared.calls) == parallel
        np.testing.assert_allclose(ours.latents, expected, **TOL)


def test_cli_generates_with_sdxl_options(sdxl_bundle_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", str(sdxl_bundle_dir), "--prompt", "a cat", "--prompt-2", "a dog", "--negative-prompt",
                 "blurry", "--height", "64", "--width", "96", "--steps", "3", "--original-size", "128", "128",
                 "--crops-coords-top-left", "0", "8", "--target-size", "64", "96", "--out", str(out)]) == 0
    assert Image.open(out).size == (96, 64)
    capsys.readouterr()
    assert main(["generate", str(sdxl_bundle_dir), "--prompt", "a", "--original-size", "-1", "5"]) == 2
    assert "--original-size: must be in 1..65536, got -1" in capsys.readouterr().err
    assert main(["inspect", str(sdxl_bundle_dir), "--steps", "10", "--key-steps", "all"]) == 0
    text = capsys.readouterr().out
    assert "text_encoder_2" in text and "baseline" in text


def test_sd_bundles_refuse_sdxl_options(sd_bundle_dir, capsys):
    assert main(["generate", str(sd_bundle_dir), "--prompt", "a", "--target-size", "64", "64", "--steps", "1"]) == 2
    assert "SDXL bundles only" in capsys.readouterr().err


def test_key_step_measurement_tool(sdxl_bundle_dir, capsys):
    """tools/bench/key_steps (how the SDXL default key steps were measured) runs on an SDXL bundle: every candidate
    costs fewer FLOPs than the baseline and the feature-change ranking names real steps."""
    from keystep.tools.bench.key_steps import main as key_steps_main

    assert key_steps_main([str(sdxl_bundle_dir), "--steps", "8", "--seeds", "1", "--height", "64", "--width",
                           "64"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "dB |" in line]
    assert len(rows) == 8 and all(0 < float(r.split("|")[3]) < 1 for r in rows)
    assert "largest feature change" in out and "step 1:" in out
