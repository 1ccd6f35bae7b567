"""Shared fixtures: tiny random models in both checkpoint formats, and bundles built from them (once per run)."""

import json

import pytest
import torch

from dit_reference import make_diffusers_dit, random_original_dit
from sd_reference import tiny_clip, tiny_controlnet, tiny_tokenizer_vocab, tiny_unet, tiny_vae


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy machine 2 OpenMP threads make torch ~7x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def original_dit():
    """An original-format DiT (TINY_CFG: 8x8x4 latent, hidden 64, depth 4, 4 heads, 10 classes, learned sigma)."""
    return random_original_dit(0)


@pytest.fixture(scope="session")
def original_checkpoint(original_dit, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "dit.pt"
    torch.save(original_dit.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def clipped_dit_scheduler(tmp_path_factory):
    """The original DiT's sampler (what bundles of original checkpoints default to: respaced DDIM) with
    clip_denoised=True, DiT's ddim_sample_loop's own default: random weights predict x0 far outside [-1, 1], and
    unclipped their samples grow to |x| ~ 1000, where no absolute tolerance means anything. The unclipped default is
    tested on the trained digits-dit (``digits_bundle``), whose samples stay in range. DiT's "ddimN" respacing: for
    step counts dividing 1000 these are diffusers' "leading" timesteps, which the width fixtures' masks were chosen
    for (``dit_reference.DiTDDIM(steps, "ddim", clip_denoised=True)`` is the reference)."""
    from keystep.export.build import DIT_TRAINING_SCHEDULE

    path = tmp_path_factory.mktemp("scheduler") / "dit-clipped.json"
    path.write_text(json.dumps({**DIT_TRAINING_SCHEDULE, "timestep_respacing": "ddim", "clip_sample": True}))
    return str(path)


@pytest.fixture(scope="session")
def tiny_bundle(original_checkpoint, clipped_dit_scheduler, tmp_path_factory):
    from keystep.export.build import build_dit_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return build_dit_bundle(str(original_checkpoint), str(out), steps=10, num_heads=4,
                            scheduler_config=clipped_dit_scheduler, progress=lambda m: None)


@pytest.fixture(scope="session")
def block_cache_bundle(original_checkpoint, clipped_dit_scheduler, tmp_path_factory):
    """The tiny DiT with two block-caching variants: blocks 1..2 and block 2 skipped at cached steps."""
    from keystep.export.build import build_dit_bundle

    out = tmp_path_factory.mktemp("bundles") / "blockcache"
    return build_dit_bundle(str(original_checkpoint), str(out), steps=10, num_heads=4, cache="blocks:1-2,2-2",
                            scheduler_config=clipped_dit_scheduler, progress=lambda m: None)


# --- the shipped, trained digits-dit: samples that stay in range ------------------------------------------------


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory):
    """``keystep build digits-dit`` (its tuned DDIM config and default plan: 50 steps, uniform:6, guidance 2). A
    trained model: its samples stay within about [-1.5, 1.5], so absolute tolerances mean what they say."""
    from keystep.tools.cli import main

    out = tmp_path_factory.mktemp("bundles") / "digits-dit"
    assert main(["build", "digits-dit", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def digits_dit():
    """digits-dit's weights in the independent ``dit_reference.OriginalDiT`` (16x16x1, patch 4, hidden 128, 6
    blocks, 4 heads, 10 classes, no learned sigma)."""
    from safetensors.torch import load_file

    from dit_reference import OriginalDiT
    from keystep.models import shipped

    model = OriginalDiT(input_size=16, patch_size=4, in_channels=1, hidden_size=128, depth=6, num_heads=4,
                        num_classes=10, learn_sigma=False)
    model.load_state_dict(load_file(shipped("digits-dit").path))
    return model.eval()


@pytest.fixture(scope="session")
def digits_dit_bundle(tmp_path_factory):
    """`keystep build digits-dit --out B` (the shipped pixel-space DiT), with one block-caching variant so that
    the manifest has every section a DiT bundle can have."""
    from keystep.tools.cli import main

    out = tmp_path_factory.mktemp("bundles") / "digits-dit"
    assert main(["build", "digits-dit", "--out", str(out), "--cache", "blocks:1-3"]) == 0
    return out


# --- DyDiT: a random DyDiT-format checkpoint and width bundles (one routed, one calibrated) ----------------------


@pytest.fixture(scope="session")
def dydit_model():
    """tests/dydit_reference.DyDiTReference: the DiT weights of ``original_dit`` + routers whose masks vary over t."""
    from dydit_reference import random_dydit

    return random_dydit(0)


@pytest.fixture(scope="session")
def dydit_checkpoint_path(dydit_model, tmp_path_factory):
    """The official training layout {"model": perturbed weights, "ema": the real ones}."""
    from dydit_reference import dydit_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "dydit.pt"
    torch.save(dydit_checkpoint(dydit_model), path)
    return path


@pytest.fixture(scope="session")
def dydit_bundle(dydit_checkpoint_path, clipped_dit_scheduler, tmp_path_factory):
    """Router widths (the default for a DyDiT checkpoint) with gathered token selection. 5 steps have 3 distinct
    masks; --max-profiles 2 gives each stage one exact narrowed engine and one merged (masked) engine."""
    from keystep.export.build import build_dit_bundle

    out = tmp_path_factory.mktemp("bundles") / "dydit"
    return build_dit_bundle(str(dydit_checkpoint_path), str(out), steps=5, max_profiles=2, token_skip="gather",
                            scheduler_config=clipped_dit_scheduler, progress=lambda m: None)


@pytest.fixture(scope="session")
def calibrated_bundle(original_checkpoint, clipped_dit_scheduler, tmp_path_factory):
    """Training-free widths at half the blocks' FLOPs for the plain DiT: one (merged) engine per stage."""
    from keystep.export.build import build_dit_bundle

    out = tmp_path_factory.mktemp("bundles") / "calibrated"
    return build_dit_bundle(str(original_checkpoint), str(out), steps=5, num_heads=4, width="calibrated:0.5",
                            max_profiles=1, scheduler_config=clipped_dit_scheduler, progress=lambda m: None)


@pytest.fixture(scope="session")
def dit_pipeline_dir(tmp_path_factory):
    """A diffusers DiTPipeline directory: random transformer (1000 classes, since DiTPipeline hard-codes null
    class 1000), a tiny AutoencoderKL and a DDIM scheduler config."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    reference = random_original_dit(1, num_classes=1000)
    transformer = make_diffusers_dit(reference).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=16,
    ).eval()
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label={0: "zero,nil", 1: "one"})
    path = tmp_path_factory.mktemp("pipe") / "dit-pipeline"
    pipe.save_pretrained(path)
    assert json.loads((path / "model_index.json").read_text())["transformer"]
    return path


@pytest.fixture(scope="session")
def pipeline_bundle(dit_pipeline_dir, tmp_path_factory):
    from keystep.export.build import build_dit_bundle

    out = tmp_path_factory.mktemp("bundles") / "pipe"
    return build_dit_bundle(str(dit_pipeline_dir), str(out), steps=10, progress=lambda m: None)


# --- Stable Diffusion: tiny random parts, saved as diffusers directories, and a bundle built from them -------


@pytest.fixture(scope="session")
def sd_models():
    unet = tiny_unet()
    return {"unet": unet, "vae": tiny_vae(), "text_encoder": tiny_clip(), "controlnet": tiny_controlnet(unet)}


@pytest.fixture(scope="session")
def sd_dir(sd_models, tmp_path_factory):
    """A StableDiffusionPipeline directory as save_pretrained writes it (+ the tokenizer's BPE files)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    vocab = tiny_tokenizer_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pipe = StableDiffusionPipeline(
        vae=sd_models["vae"], text_encoder=sd_models["text_encoder"], tokenizer=tokenizer, unet=sd_models["unet"],
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = tmp_path_factory.mktemp("sd") / "pipeline"
    pipe.save_pretrained(path)  # transformers >= 5 writes tokenizer.json only: the build converts it
    return path


@pytest.fixture(scope="session")
def controlnet_dir(sd_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "controlnet"
    sd_models["controlnet"].save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sd_bundle_dir(sd_dir, controlnet_dir, tmp_path_factory):
    """Every SD stage (text encoder, encoder, decoder, full, ControlNet, VAE, DeepCache shallow stages for every
    branch of the two-block tiny UNet) through the normal build path."""
    from keystep.export.build import build_unet_bundle

    out = tmp_path_factory.mktemp("bundles") / "sd"
    return build_unet_bundle(str(sd_dir), str(out), controlnet=str(controlnet_dir), steps=10, cache="deep:0,1,3,4",
                             progress=lambda m: None)


# --- SDXL: a scaled-down StableDiffusionXLPipeline directory and a bundle of it ----------------------------------


@pytest.fixture(scope="session")
def sdxl_pipe():
    from sd_reference import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sdxl_dir(sdxl_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "pipeline"
    sdxl_pipe.save_pretrained(path)  # tokenizer.json only (transformers >= 5): the build converts both tokenizers
    return path


@pytest.fixture(scope="session")
def sdxl_bundle_dir(sdxl_dir, tmp_path_factory):
    """Both text encoders, encoder, decoder and the VAE; no full graph (--no-full: the baseline runs encoder +
    decoder every step), which keeps the default suite's export time down. The slow tests build the rest."""
    from keystep.export.build import build_unet_bundle

    out = tmp_path_factory.mktemp("bundles") / "sdxl"
    return build_unet_bundle(str(sdxl_dir), str(out), steps=10, full=False, progress=lambda m: None)


# --- DeepFloyd-IF: scaled-down IFPipeline + IFSuperResolutionPipeline directories and a cascade bundle -----------


@pytest.fixture(scope="session")
def if_pipes():
    from if_reference import tiny_if_pipelines

    return tiny_if_pipelines()


@pytest.fixture(scope="session")
def if_dirs(if_pipes, tmp_path_factory):
    root = tmp_path_factory.mktemp("if")
    for i, pipe in enumerate(if_pipes, start=1):
        pipe.save_pretrained(root / f"stage_{i}")
    return root / "stage_1", root / "stage_2"


@pytest.fixture(scope="session")
def if_bundle_dir(if_dirs, tmp_path_factory):
    """The cascade (T5 + stage I + stage II), each diffusion stage without its full graph (--no-full keeps the
    default suite's exports down; the slow tests build one with it). Every graph is written with external data
    (the threshold patched to 0), the path the real 4.7B-parameter T5 takes."""
    from unittest import mock

    from keystep.export.build import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "if"
    with mock.patch("keystep.export.bundle_writer.EXTERNAL_DATA_BYTES", 0):
        return build_bundle(str(if_dirs[0]), str(out), super_resolution=[str(if_dirs[1])], steps=10, full=False,
                            progress=lambda m: None)


# --- text-to-video: a tiny UNet3D pipeline (ModelScope's config scaled down) and a bundle built from it -------------


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory):
    """A TextToVideoSDPipeline directory (tiny UNet3D, the SD tests' tiny VAE / CLIP / byte-level tokenizer)."""
    from transformers import CLIPTokenizer

    from video_reference import save_text_to_video_pipeline, tiny_unet3d

    tokenizer = CLIPTokenizer(vocab=tiny_tokenizer_vocab(), merges=[], model_max_length=77)
    path = tmp_path_factory.mktemp("video") / "pipeline"
    return save_text_to_video_pipeline(path, tiny_unet3d(), tiny_vae(), tiny_clip(), tokenizer)


@pytest.fixture(scope="session")
def video_bundle_dir(video_dir, tmp_path_factory):
    """Every text-to-video stage through the normal build path, with DeepCache's default branch 0 (the shallow path
    runs conv_in + transformer_in and re-enters at the last up layer; the cheapest stage to export — every 3-D
    export costs tens of seconds of tracing)."""
    from keystep.export.build import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "video"
    return build_bundle(str(video_dir), str(out), steps=10, cache="deep:0", frames=4, progress=lambda m: None)
