"""digits-sd: the trained CLIP BPE tokenizer, the training loop, pixel-space SD bundles (no VAE) against plain
diffusers loops, quality on text-to-image bundles, and the shipped model through the CLI."""

import json

import numpy as np
import pytest
import torch

from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import Bundle
from keystep.runtime.sampler import SamplingOptions
from keystep.runtime.tokenizer import ClipTokenizer
from keystep.runtime.unet_sampler import UNetSampler
from keystep.tools.cli import main
from keystep.tools.train.clip_bpe import save_clip_tokenizer, train_merges
from keystep.tools.train.digit_prompts import TEMPLATES, all_prompts, digit_prompt, prompts_for
from sd_reference import sd_encoder_propagation_sample, tiny_clip, tiny_unet

CORPUS = [p for row in all_prompts() for p in row]
UNSEEN = ["", "A Handwritten 7!", "the digit seven, twice: 77", "an unseen word", "  number\t9  ", "ⅶ café 😀"]
TEXT_LEN = 77  # tiny_clip's positions


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    save_clip_tokenizer(path, train_merges(CORPUS), TEXT_LEN)
    return path


def test_trained_tokenizer_runtime_and_transformers_agree(tokenizer_dir):
    from transformers import CLIPTokenizer

    ours = ClipTokenizer.from_dir(tokenizer_dir)
    ref = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    texts = CORPUS + UNSEEN
    expected = ref(texts, padding="max_length", max_length=16, truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(ours.encode(texts, max_length=16), expected)
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    assert vocab["<|endoftext|>"] == len(vocab) - 1 and vocab["!"] == 0 and "a</w>" in vocab
    # merged until every corpus word is one token: "the digit seven" -> 3 tokens
    assert ours.token_ids("the digit seven") == [vocab["the</w>"], vocab["digit</w>"], vocab["seven</w>"]]
    assert max(len(ours.token_ids(p)) for p in CORPUS) + 2 <= 16  # fits digits-sd's 16 positions


def test_digit_prompts():
    assert digit_prompt(7, 0) == "a handwritten 7" and digit_prompt(8, 3) == "a sketch of an eight"
    assert prompts_for(np.arange(20) % 10)[:2] == [digit_prompt(0, 0), digit_prompt(1, 0)]
    assert prompts_for(np.arange(20) % 10)[10] == digit_prompt(0, 1)
    assert len(set(CORPUS)) == 10 * len(TEMPLATES)
    with pytest.raises(ValueError, match="0..9"):
        digit_prompt(10, 0)


def test_train_sd_smoke_and_the_directory_loads(tmp_path):
    from keystep.export.unet_export import load_sd_pipeline_dir
    from keystep.tools.train.sd import train

    out = tmp_path / "digits-sd"
    info = train(out, iters=2, batch=4, progress=lambda m: None)
    assert np.isfinite(info["final_loss"]) and info["iters"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                                     "training.json", "unet"]
    assert not list(tmp_path.glob("*.tmp")) and list(out.glob("*/*.safetensors"))
    loaded = load_sd_pipeline_dir(out)
    assert loaded.vae is None and loaded.pixel_space and loaded.unet.config.in_channels == 1


# --- a tiny random pixel-space SD directory, its bundle, and plain diffusers loops --------------------------------


@pytest.fixture(scope="module")
def pixel_parts(tokenizer_dir):
    return {"unet": tiny_unet(in_channels=1, out_channels=1), "text_encoder": tiny_clip(), "tokenizer": tokenizer_dir}


@pytest.fixture(scope="module")
def pixel_sd_dir(pixel_parts, tmp_path_factory):
    from keystep.tools.train.sd import save_sd_dir

    path = tmp_path_factory.mktemp("pixel-sd") / "model"
    save_sd_dir(path, pixel_parts["text_encoder"], pixel_parts["unet"], pixel_parts["tokenizer"], {"random": True})
    return path


@pytest.fixture(scope="module")
def pixel_bundle(pixel_sd_dir, tmp_path_factory):
    from keystep.export.build import build_unet_bundle

    out = tmp_path_factory.mktemp("bundles") / "pixel-sd"
    return build_unet_bundle(str(pixel_sd_dir), str(out), steps=10, guidance=3.0, progress=lambda m: None)


@pytest.fixture(scope="module")
def sampler(pixel_bundle):
    return UNetSampler(Bundle.load(pixel_bundle), get_backend("onnxruntime"))


class PixelPipe:
    """What sd_reference's loop needs of a pipeline (``unet``, ``encode_prompt``), with transformers' tokenizer."""

    def __init__(self, parts):
        from transformers import CLIPTokenizer

        self.unet, self.text_encoder = parts["unet"], parts["text_encoder"]
        self.tokenizer = CLIPTokenizer.from_pretrained(str(parts["tokenizer"]), local_files_only=True)

    def embed(self, prompts):
        ids = self.tokenizer(prompts, padding="max_length", max_length=TEXT_LEN, truncation=True,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            return self.text_encoder(ids)[0]

    def encode_prompt(self, prompt, device, images, cfg, negative_prompt):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        return self.embed(prompts), self.embed([negative_prompt or ""] * len(prompts))


def diffusers_ddim_cfg_loop(pipe, prompts, noise, steps, guidance, scheduler_config):
    """The plain loop: DDIM from the bundle's config, CFG rows [unconditional, conditional], full UNet every step."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, None)
    text = torch.cat([uncond, cond])
    z = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=text).sample
            u, c = eps.chunk(2)
            z = scheduler.step(u + guidance * (c - u), t, z).prev_sample
    return z


def test_pixel_space_bundle_has_no_vae_stage(sampler, pixel_bundle):
    bundle = sampler.bundle
    assert "vae_decoder" not in bundle.stages and {"text_encoder", "encoder", "decoder", "full"} <= set(bundle.stages)
    cfg = bundle.model_config
    assert cfg["pixel_space"] and cfg["vae_scale_factor"] == 1 and cfg["sample_size"] == [16, 16]
    assert sampler.default_size == (16, 16)


def test_baseline_equals_plain_diffusers_loop(sampler, pixel_parts):
    pipe = PixelPipe(pixel_parts)
    prompts = ["a handwritten 7", "the digit three"]
    noise = torch.randn((2, 1, 16, 16), generator=torch.manual_seed(0))
    expected = diffusers_ddim_cfg_loop(pipe, prompts, noise, 8, 3.0, sampler.bundle.scheduler_config).numpy()
    ours = sampler.sample(prompts, SamplingOptions.from_bundle(sampler.bundle, num_steps=8, key_steps="all"),
                          init_noise=noise.numpy())
    assert ours.prepared.plan.baseline
    np.testing.assert_allclose(ours.latents, expected, rtol=1e-4, atol=1e-4)  # random weights: |values| ~ 100
    images = sampler.decode(ours.latents)
    assert images.shape == (2, 16, 16, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], (np.clip((ours.latents[:, 0] + 1) / 2, 0, 1) * 255).round())


def test_key_step_plan_equals_encoder_propagation_reference(sampler, pixel_parts):
    from diffusers import DDIMScheduler

    pipe = PixelPipe(pixel_parts)
    scheduler = DDIMScheduler.from_config(sampler.bundle.scheduler_config)
    noise = torch.randn((1, 1, 16, 16), generator=torch.manual_seed(3))
    keys = [0, 1, 2, 5]
    expected = sd_encoder_propagation_sample(pipe, scheduler, "number 4", None, noise, 8, 3.0, set(keys)).numpy()
    ours = sampler.sample(["number 4"], SamplingOptions.from_bundle(sampler.bundle, num_steps=8, key_steps=keys,
                                                                    parallel=True), init_noise=noise.numpy())
    assert list(ours.prepared.plan.key_steps) == keys
    np.testing.assert_allclose(ours.latents, expected, rtol=1e-4, atol=1e-4)


def test_generate_cli_writes_pixel_images(pixel_bundle, tmp_path, capsys):
    out, raw = tmp_path / "seven.png", tmp_path / "seven.npy"
    assert main(["generate", str(pixel_bundle), "--prompt", "a handwritten 7", "--images", "2", "--out", str(out),
                 "--save-latents", str(raw), "--steps", "4"]) == 0
    from PIL import Image

    samples = np.load(raw)
    assert samples.shape == (2, 1, 16, 16)
    image = np.asarray(Image.open(tmp_path / "seven-0.png"))
    assert image.shape == (16, 16) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, (np.clip((samples[0, 0] + 1) / 2, 0, 1) * 255).round())


def test_latent_sd_dir_without_vae_is_rejected(pixel_sd_dir, tmp_path):
    import shutil

    from keystep.export.errors import ModelLoadError
    from keystep.export.unet_export import load_sd_pipeline_dir

    latent = tmp_path / "latent-sd"
    shutil.copytree(pixel_sd_dir, latent)
    config = json.loads((latent / "unet" / "config.json").read_text())
    (latent / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 4, "out_channels": 4}))
    with pytest.raises(ModelLoadError, match="no vae/ directory and its UNet is not pixel-space-shaped"):
        load_sd_pipeline_dir(latent)


def test_quality_on_a_text_to_image_bundle(pixel_bundle):
    from keystep.tools.cli.quality import evaluate

    rows = evaluate(Bundle.load(pixel_bundle), get_backend("onnxruntime"), ["uniform:3"], samples=20)
    assert [r["plan"] for r in rows] == ["all", "uniform:3"]
    assert all(0 <= r["accuracy"] <= 1 and np.isfinite(r["digits_fd"]) for r in rows)
    assert rows[0]["psnr_vs_baseline"] is None and np.isfinite(rows[1]["psnr_vs_baseline"])


# --- the shipped model -------------------------------------------------------------------------------------------


def test_digits_sd_is_shipped_and_listed(capsys):
    from keystep.export.build import is_unet_pipeline
    from keystep.models import shipped

    entry = shipped("digits-sd")
    assert entry.available and entry.is_directory and is_unet_pipeline("digits-sd")
    assert 1e6 < entry.size_bytes < 20e6
    assert main(["models"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("digits-sd"))
    assert "MB" in line and "missing" not in line


@pytest.mark.slow
def test_build_and_generate_the_shipped_model(tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert main(["build", "digits-sd", "--out", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"]["path"] == "digits-sd"
    from keystep.models import shipped

    tuned = shipped("digits-sd").default_plan
    assert manifest["default_plan"]["key_steps"] == tuned["key_steps"]
    assert manifest["default_plan"]["guidance"] == tuned["guidance"]
    out = tmp_path / "seven.png"
    assert main(["generate", str(bundle), "--prompt", "a handwritten 7", "--images", "4", "--out", str(out),
                 "--save-latents", str(tmp_path / "seven.npy")]) == 0
    from keystep.tools.cli.quality import DigitMetrics

    samples = np.load(tmp_path / "seven.npy")
    assert len(list(tmp_path.glob("seven-*.png"))) == 4
    assert DigitMetrics().accuracy(samples, np.full(4, 7)) >= 0.5
