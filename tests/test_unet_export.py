"""Stable-Diffusion stages (UNet split FasterDiffusion-style, ControlNet, CLIP text encoder, VAE decoder) exported to
ONNX vs the diffusers / transformers sd_models they come from, at batch sizes and latent sizes other than the traced
one (non-square and odd sizes included)."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from keystep.export.bundle_writer import export_stage
from keystep.export.errors import ModelLoadError
from keystep.export.unet_export import (
    LoadedSD,
    load_controlnet,
    load_sd_pipeline_dir,
    trace_latent_size,
    unet_stages,
)
from keystep.export.unet_model import UNetFullStage, level_sizes, skip_layout
from keystep.runtime.bundle import Bundle
from sd_reference import tiny_unet

# (batch, latent height, latent width, text_len): the export traces at batch 2, 16 x 18, text_len 7
# (66 rows: diffusers branches on batch >= 64 in Upsample2D; a decoder call over several steps easily has that many)
SIZES = [(1, 16, 16, 77), (3, 24, 40, 5), (2, 13, 11, 9), (4, 6, 10, 1), (66, 4, 6, 3)]
TOL = dict(rtol=1e-4, atol=1e-4)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def loaded(sd_dir, controlnet_dir):
    return load_sd_pipeline_dir(sd_dir), load_controlnet(controlnet_dir)


@pytest.fixture(scope="module")
def sd_bundle(sd_bundle_dir):
    """The session's SD bundle (built by keystep.export.build from the saved directories), one session per stage."""
    bundle = Bundle.load(sd_bundle_dir)
    return bundle, {name: session(spec.path) for name, spec in bundle.stages.items()}


def unet_inputs(batch, h, w, text_len, seed, dim=32, channels=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, h, w, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()  # a different timestep in every row
    e = torch.randn(batch, text_len, dim, generator=g)
    return x, t, e


def feeds_of(x, t, e):
    return {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": e.numpy()}


def decode_feeds(enc_outputs, t, e, residuals=None):
    *skips, mid = enc_outputs
    if residuals is not None:  # ControlNet: diffusers adds its residuals to the skips and the mid-block output
        *down_res, mid_res = residuals
        skips = [s + r for s, r in zip(skips, down_res)]
        mid = mid + mid_res
    return {**{f"skip_{i}": s for i, s in enumerate(skips)}, "mid": mid, "timestep": t.numpy(),
            "encoder_hidden_states": e.numpy()}


def test_stage_io_in_the_manifest(sd_bundle, sd_models, loaded):
    bundle, _ = sd_bundle
    io = {name: ([(s.name, s.dtype, list(s.shape)) for s in spec.inputs],
                 [(s.name, s.dtype, list(s.shape)) for s in spec.outputs]) for name, spec in bundle.stages.items()}
    b, f = "batch", "float32"
    skips = [("skip_0", f, [b, 32, "height", "width"]), ("skip_1", f, [b, 32, "height", "width"]),
             ("skip_2", f, [b, 32, "height_1", "width_1"]), ("skip_3", f, [b, 64, "height_1", "width_1"])]
    mid = ("mid", f, [b, 64, "height_1", "width_1"])
    sample, timestep = ("sample", f, [b, 4, "height", "width"]), ("timestep", f, [b])
    ehs = ("encoder_hidden_states", f, [b, "text_len", 32])
    noise = ("noise_pred", f, [b, 4, "height", "width"])
    # DeepCache deep features: the hidden state entering the up layer each branch resumes at (see unet_cache)
    deep = {0: ("cache_deep0", f, [b, 32, "height", "width"]),  # last up block, before its layer 1
            1: ("cache_deep1", f, [b, 64, "height", "width"]),  # entering the last up block (upsampled)
            3: ("cache_deep3", f, [b, 64, "height_1", "width_1"]),  # first up block, before its layer 1
            4: ("cache_deep4", f, [b, 64, "height_1", "width_1"])}  # the mid block's output
    assert io == {
        **{f"cached.deep{i}": ([sample, timestep, ehs, spec], [noise]) for i, spec in deep.items()},
        "text_encoder": ([("input_ids", "int64", [b, "text_len"])], [("text_embeddings", f, [b, "text_len", 32])]),
        "encoder": ([sample, timestep, ehs], [*skips, mid]),
        "decoder": ([*skips, mid, timestep, ehs], [noise]),
        "full": ([sample, timestep, ehs], [noise, *deep.values()]),
        "controlnet": ([sample, timestep, ehs, ("controlnet_cond", f, [b, 3, "8*height", "8*width"]),
                        ("conditioning_scale", f, [1])],
                       [(n.replace("skip", "down_res"), d, s) for n, d, s in skips] + [("mid_res", f, mid[2])]),
        "vae_decoder": ([("latent", f, [b, 4, "height", "width"])], [("image", f, [b, 3, "8*height", "8*width"])]),
    }
    assert [c for c, _ in skip_layout(sd_models["unet"])] == [32, 32, 32, 64]
    assert bundle.model_config["skip_levels"] == [0, 0, 1, 1]
    for name, spec in bundle.stages.items():
        assert spec.flops_per_sample > 0, name


def test_encoder_then_decoder_matches_diffusers(sd_bundle, sd_models):
    _, sess = sd_bundle
    unet = sd_models["unet"]
    layout = skip_layout(unet)
    for i, (batch, h, w, text_len) in enumerate(SIZES):
        x, t, e = unet_inputs(batch, h, w, text_len, seed=i)
        with torch.no_grad():
            expected = unet(x, t, e).sample.numpy()
        enc = sess["encoder"].run(None, feeds_of(x, t, e))
        sizes = level_sizes(unet, h, w)
        assert [a.shape for a in enc] == [(batch, c, *sizes[lv]) for c, lv in layout + [layout[-1]]]
        out = sess["decoder"].run(None, decode_feeds(enc, t, e))[0]
        np.testing.assert_allclose(out, expected, **TOL, err_msg=f"split at {batch}x{h}x{w}")


def test_full_stage_module_matches_diffusers(sd_models):
    unet = sd_models["unet"]
    full = UNetFullStage(unet)
    for i, (batch, h, w, text_len) in enumerate(SIZES):
        x, t, e = unet_inputs(batch, h, w, text_len, seed=i)
        with torch.no_grad():
            torch.testing.assert_close(full(x, t, e), unet(x, t, e).sample, rtol=1e-5, atol=1e-5)


def test_full_stage_onnx_matches_diffusers(sd_bundle, sd_models):
    bundle, sess = sd_bundle
    for i, (batch, h, w, text_len) in enumerate(SIZES[:3]):
        x, t, e = unet_inputs(batch, h, w, text_len, seed=i)
        with torch.no_grad():
            expected = sd_models["unet"](x, t, e).sample.numpy()
        np.testing.assert_allclose(sess["full"].run(None, feeds_of(x, t, e))[0], expected, **TOL)
    # encoder + decoder ~= full (the decoder recomputes only the time embedding)
    flops = {name: bundle.stage(name).flops_per_sample for name in ("encoder", "decoder", "full")}
    assert 1.0 <= (flops["encoder"] + flops["decoder"]) / flops["full"] < 1.05


def test_decoder_rows_are_independent_steps(sd_bundle, sd_models):
    """One decoder call holding several steps: cached skips tiled over rows, each row with its own timestep, equals
    calling the decoder step by step (the time embedding is per row, not broadcast from the first one)."""
    _, sess = sd_bundle
    x, t, e = unet_inputs(2, 12, 20, 6, seed=7)
    enc = sess["encoder"].run(None, feeds_of(x, t, e))
    steps = torch.tensor([[900.0, 850.0], [800.0, 10.0], [500.0, 499.0]])  # 3 steps x 2 images
    tiled = [np.concatenate([a] * 3) for a in enc]
    together = sess["decoder"].run(None, decode_feeds(tiled, steps.reshape(-1), torch.cat([e] * 3)))[0]
    for s in range(3):
        alone = sess["decoder"].run(None, decode_feeds(enc, steps[s], e))[0]
        np.testing.assert_allclose(together[2 * s: 2 * s + 2], alone, **TOL)
    assert not np.allclose(together[0:2], together[2:4], atol=1e-3)


def test_controlnet_and_residuals_match_diffusers(sd_bundle, sd_models):
    _, sess = sd_bundle
    unet, controlnet = sd_models["unet"], sd_models["controlnet"]
    for i, (batch, h, w, text_len) in enumerate(SIZES[:3]):
        x, t, e = unet_inputs(batch, h, w, text_len, seed=10 + i)
        cond = torch.rand(batch, 3, 8 * h, 8 * w, generator=torch.Generator().manual_seed(i))
        scale = 0.6
        with torch.no_grad():
            down, mid = controlnet(x, t, e, controlnet_cond=cond, conditioning_scale=scale, return_dict=False)
            expected = unet(x, t, e, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
            without = unet(x, t, e).sample
        residuals = sess["controlnet"].run(None, {**feeds_of(x, t, e), "controlnet_cond": cond.numpy(),
                                                  "conditioning_scale": np.array([scale], np.float32)})
        for got, want in zip(residuals, [*down, mid]):
            np.testing.assert_allclose(got, want.numpy(), **TOL)
        enc = sess["encoder"].run(None, feeds_of(x, t, e))
        out = sess["decoder"].run(None, decode_feeds(enc, t, e, residuals))[0]
        np.testing.assert_allclose(out, expected.numpy(), **TOL, err_msg=f"{batch}x{h}x{w}")
        assert (expected - without).abs().max() > 1e-3  # the residuals matter


def test_text_encoder_matches_clip(sd_bundle, sd_models, sd_dir):
    _, sess = sd_bundle
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")
    ids = tokenizer(["a photo of a cat", "x"], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    for input_ids in (ids, torch.randint(0, 1000, (3, 5), generator=g), torch.randint(0, 1000, (1, 1), generator=g)):
        with torch.no_grad():
            expected = sd_models["text_encoder"](input_ids)[0].numpy()
        got = sess["text_encoder"].run(None, {"input_ids": input_ids.numpy()})[0]
        np.testing.assert_allclose(got, expected, **TOL)


def test_vae_decoder_matches_diffusers(sd_bundle, sd_models):
    _, sess = sd_bundle
    vae = sd_models["vae"]
    for batch, h, w in [(1, 16, 16), (3, 6, 10), (2, 5, 7), (65, 2, 3)]:
        z = torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            expected = (vae.decode(z / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1).numpy()
        got = sess["vae_decoder"].run(None, {"latent": z.numpy()})[0]
        assert got.shape == (batch, 3, 8 * h, 8 * w)
        np.testing.assert_allclose(got, expected, **TOL)


def variant_unet():
    """A UNet whose final ``emb`` is more than the timestep MLP: an added text embedding (addition_embed_type
    "text", pooled from encoder_hidden_states) and time_embedding_act_fn; three levels (so odd sizes forward the
    upsample size twice) and no mid block."""
    return tiny_unet(
        seed=5, block_out_channels=(16, 32, 32), down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3, mid_block_type=None, time_embedding_act_fn="silu",
        addition_embed_type="text", addition_embed_type_num_heads=4)


VARIANT_SIZES = [(3, 13, 7, 4), (1, 24, 40, 77), (5, 9, 16, 2)]


def check_variant(unet, decoder):
    """Encoder -> ``decoder`` (feeds -> noise_pred), a different timestep per row, vs diffusers' forward."""
    stages = {s.name: s for s in unet_stages(LoadedSD(unet))}
    encoder = stages["encoder"].module
    for i, (batch, h, w, text_len) in enumerate(VARIANT_SIZES):
        x, t, e = unet_inputs(batch, h, w, text_len, seed=20 + i)
        with torch.no_grad():
            expected = unet(x, t, e).sample.numpy()
            activation, unet.time_embed_act = unet.time_embed_act, None
            plain = unet(x, t, e).sample.numpy()
            unet.time_embed_act = activation
            skips = [a.numpy() for a in encoder(x, t, e)]
        assert np.abs(plain - expected).max() > 1e-3  # the activation changes the output
        np.testing.assert_allclose(decoder(decode_feeds(skips, t, e)), expected, **TOL, err_msg=f"{batch}x{h}x{w}")


def test_decoder_uses_the_final_embedding():
    unet = variant_unet()
    decoder = {s.name: s for s in unet_stages(LoadedSD(unet))}["decoder"].module

    def run(feeds):
        names = [f"skip_{i}" for i in range(decoder.num_skips)] + ["mid", "timestep", "encoder_hidden_states"]
        with torch.no_grad():
            return decoder(*(torch.from_numpy(np.asarray(feeds[n])) for n in names)).numpy()

    check_variant(unet, run)


@pytest.mark.slow
def test_decoder_onnx_uses_the_final_embedding(tmp_path):
    unet = variant_unet()
    assert trace_latent_size(unet) == (16, 20)
    stage = {s.name: s for s in unet_stages(LoadedSD(unet))}["decoder"]
    sess = session(export_stage(stage, tmp_path)[0])
    check_variant(unet, lambda feeds: sess.run(None, feeds)[0])


def test_rejects_unsupported_unets_and_layouts(sd_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="class labels"):
        unet_stages(LoadedSD(tiny_unet(class_embed_type="projection", projection_class_embeddings_input_dim=4)))
    with pytest.raises(ModelLoadError, match="class labels"):
        unet_stages(LoadedSD(tiny_unet(num_class_embeds=10)))
    with pytest.raises(ModelLoadError, match="timestep_cond"):
        unet_stages(LoadedSD(tiny_unet(time_cond_proj_dim=16)))
    copy = tmp_path / "sdxl"
    shutil.copytree(sd_dir, copy)
    config = json.loads((copy / "unet" / "config.json").read_text())
    (copy / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    with pytest.raises(ModelLoadError, match="does not match the StableDiffusionPipeline layout"):
        load_sd_pipeline_dir(copy)  # an SDXL UNet needs the SDXL layout (two text encoders)
    (copy / "unet" / "config.json").write_text(json.dumps(config))
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    with pytest.raises(ModelLoadError, match="refiner"):
        load_sd_pipeline_dir(copy)
    (copy / "model_index.json").write_text(json.dumps(index))
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (copy / "tokenizer" / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="neither vocab.json"):
        load_sd_pipeline_dir(copy)
    shutil.rmtree(copy / "vae")
    with pytest.raises(ModelLoadError, match="vae"):
        load_sd_pipeline_dir(copy)
    with pytest.raises(ModelLoadError, match="ControlNetModel"):
        load_controlnet(sd_dir / "unet")
