"""Text-to-video (UNet3D) bundles vs diffusers' UNet3DConditionModel and TextToVideoSDPipeline, the deepcache
package's helper on that pipeline and an independent FasterDiffusion loop (tests/video_reference.py), at frame counts
and sizes other than the traced ones; GIF / MP4 output, profile and tune from the CLI."""

import json

import DeepCache
import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, TextToVideoSDPipeline
from PIL import Image

from keystep.export.unet3d_export import trace_frames
from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import Bundle
from keystep.runtime.sampler import SamplingError, SamplingOptions
from keystep.runtime.video_sampler import VideoSampler
from keystep.tools.cli import main
from keystep.tools.cli.profile import profile_bundle
from video_reference import video_encoder_propagation_sample

PROMPT, NEGATIVE = "a handwritten 7 spinning", "blurry"
TOL = dict(rtol=1e-4, atol=1e-4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle(video_bundle_dir):
    return Bundle.load(video_bundle_dir)


@pytest.fixture(scope="module")
def sampler(bundle):
    return VideoSampler(bundle, get_backend("onnxruntime", threads=1))


@pytest.fixture(scope="module")
def pipe(video_dir):
    pipe = TextToVideoSDPipeline.from_pretrained(video_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents_for(frames, h, w, videos=1, seed=0):
    return torch.randn((videos, 4, frames, h // 8, w // 8), generator=torch.manual_seed(seed))


def options(sampler, **kw):
    return SamplingOptions.from_bundle(sampler.bundle, **kw)


def traced_frames(unet) -> int:
    """The frame count the export traced at (the tests use others)."""
    from keystep.export.unet_export import TRACE_TEXT_LEN, _size_dict, trace_latent_size

    return trace_frames({**_size_dict(unet, *trace_latent_size(unet)), "text_len": TRACE_TEXT_LEN})


def test_stages_equal_the_diffusers_unet3d_at_other_sizes(bundle, pipe):
    """encoder -> decoder and full through ONNX Runtime == UNet3DConditionModel.forward, at frame counts (1 included)
    and latent sizes other than the traced ones (odd ones too), every row with its own timestep."""
    traced = traced_frames(pipe.unet)
    sessions = {name: ort.InferenceSession(str(bundle.stage(name).path), providers=["CPUExecutionProvider"])
                for name in ("encoder", "decoder", "full", "cached.deep0")}
    g = torch.Generator().manual_seed(0)
    for batch, frames, h, w, text_len in [(1, 1, 8, 8, 77), (3, 5, 6, 10, 5), (2, 7, 5, 9, 2)]:
        assert frames != traced
        x = torch.randn(batch, 4, frames, h, w, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g).float()
        e = torch.randn(batch, text_len, 32, generator=g)
        with torch.no_grad():
            expected = pipe.unet(x, t, encoder_hidden_states=e).sample.numpy()
        feeds = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": e.numpy()}
        encoded = sessions["encoder"].run(None, feeds)
        assert encoded[0].shape == (batch, frames, 16, h, w)  # (batch, frames, C, h, w): rows of diffusers' layout
        names = [o.name for o in sessions["encoder"].get_outputs()]
        decoded = sessions["decoder"].run(None, {**dict(zip(names, encoded)), "timestep": feeds["timestep"],
                                                 "encoder_hidden_states": feeds["encoder_hidden_states"]})[0]
        full, deep = sessions["full"].run(None, feeds)
        np.testing.assert_allclose(decoded, expected, **TOL)
        np.testing.assert_allclose(full, expected, **TOL)
        # a shallow step fed the same step's deep feature is the full model again
        shallow = sessions["cached.deep0"].run(None, {**feeds, "cache_deep0": deep})[0]
        np.testing.assert_allclose(shallow, expected, **TOL)


def decode_frames(sampler, latents):
    """The VAE stage on every frame, floats in [0, 1] as (videos, frames, H, W, 3) like the pipeline's "np"."""
    v, c, f, h, w = latents.shape
    rows = np.ascontiguousarray(latents.transpose(0, 2, 1, 3, 4).reshape(v * f, c, h, w))
    images = sampler.runner("vae_decoder").run({"latent": rows})["image"]
    return images.transpose(0, 2, 3, 1).reshape(v, f, *images.shape[2:], 3)


def test_baseline_equals_text_to_video_pipeline(sampler, pipe):
    latents = latents_for(6, 48, 80, videos=2)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    expected = pipe([PROMPT, "the digit seven"], negative_prompt=[NEGATIVE] * 2, num_frames=6, height=48, width=80,
                    num_inference_steps=5, guidance_scale=9.0, latents=latents, output_type="np").frames
    result = sampler.sample([PROMPT, "the digit seven"], options(sampler, num_steps=5, guidance=9.0, key_steps="all"),
                            negative_prompt=NEGATIVE, height=48, width=80, init_noise=latents.numpy(), num_frames=6)
    assert [c.stage for c in result.prepared.calls] == ["full"] * 5
    frames = decode_frames(sampler, result.latents)
    assert frames.shape == expected.shape == (2, 6, 48, 80, 3)
    np.testing.assert_allclose(frames, expected, rtol=0, atol=2e-4)
    pixels = sampler.decode(result.latents)
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 6, 48, 80, 3)
    assert np.abs(pixels.astype(float) - np.round(expected * 255)).max() <= 1


@pytest.mark.parametrize("scheduler_name,key_steps,frames", [("ddim", [0, 1, 3], 2), ("euler", [0, 2], 5)])
def test_key_step_plan_equals_reference_loop(sampler, pipe, scheduler_name, key_steps, frames):
    """Encoder propagation with each group's decoders batched across steps (at F frames per row) == the reference
    loop; one decoder call per step == the batched calls."""
    scheduler = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler_name].from_config(
        pipe.scheduler.config)
    latents = latents_for(frames, 64, 48, seed=3)
    expected = video_encoder_propagation_sample(pipe, scheduler, PROMPT, latents, 6, 7.0, set(key_steps)).numpy()
    run = dict(num_steps=6, guidance=7.0, scheduler=scheduler_name, key_steps=key_steps)
    batched = sampler.sample([PROMPT], options(sampler, parallel=True, **run), height=64, width=48,
                             init_noise=latents.numpy(), num_frames=frames)
    groups = [c.steps for c in batched.prepared.calls if c.stage == "decoder"]
    assert groups == [tuple(range(a, b)) for a, b in zip(key_steps, key_steps[1:] + [6])]
    np.testing.assert_allclose(batched.latents, expected, **TOL)
    sequential = sampler.sample([PROMPT], options(sampler, parallel=False, **run), height=64, width=48,
                                init_noise=latents.numpy(), num_frames=frames)
    assert all(len(c.steps) == 1 for c in sequential.prepared.calls)
    np.testing.assert_allclose(sequential.latents, batched.latents, rtol=0, atol=1e-5)


def deepcache_reference(pipe, branch, interval, latents, steps):
    """The deepcache package's DeepCacheSDHelper on the video pipeline: it wraps the resnets and spatial attentions
    (the temporal layers after them recompute the same values from the cached inputs)."""
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch, skip_mode="uniform")
    helper.enable()
    try:
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_frames=latents.shape[2], num_inference_steps=steps,
                    guidance_scale=7.5, latents=latents.clone(), output_type="latent").frames.numpy()
    finally:
        helper.disable()


def test_deepcache_plan_equals_deepcache_helper_on_the_video_pipeline(sampler, pipe):
    """keystep's branch 0 (full stage + shallow stage, DeepCache's default branch) == the helper's video."""
    latents = latents_for(5, 64, 64, seed=4)
    expected = deepcache_reference(pipe, 0, 3, latents, 7)
    ours = sampler.sample([PROMPT], options(sampler, num_steps=7, guidance=7.5, key_steps="all",
                                            cache="deep0:uniform:3"),
                          negative_prompt=NEGATIVE, init_noise=latents.numpy(), num_frames=5)
    assert [c.stage for c in ours.prepared.calls] == ["full", "cached", "cached"] * 2 + ["full"]
    np.testing.assert_allclose(ours.latents, expected, **TOL)


def test_bad_video_input(sampler):
    opts = options(sampler, num_steps=2)
    with pytest.raises(SamplingError, match="frames must be at least 1"):
        sampler.sample([PROMPT], opts, num_frames=0)
    with pytest.raises(SamplingError, match=r"expected \(1, 4, 3, 8, 8\) \(videos, C, frames, H, W\)"):
        sampler.sample([PROMPT], opts, num_frames=3, init_noise=np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(SamplingError, match="multiples of 8"):
        sampler.sample([PROMPT], opts, height=60)


def test_cli_text_to_video(video_bundle_dir, tmp_path, capsys):
    gif, latents = tmp_path / "v.gif", tmp_path / "z.npy"
    assert main(["generate", str(video_bundle_dir), "--prompt", PROMPT, "--images", "2", "--frames", "5",
                 "--height", "48", "--width", "64", "--steps", "4", "--out", str(gif), "--save-latents",
                 str(latents), "--fps", "4"]) == 0
    assert np.load(latents).shape == (2, 4, 5, 6, 8)
    for i in range(2):
        with Image.open(tmp_path / f"v-{i}.gif") as image:
            assert (image.size, image.n_frames, image.info["duration"], image.info["loop"]) == ((64, 48), 5, 250, 0)
    out = capsys.readouterr().out
    assert "5 frames" in out and "4 key steps of 4" in out
    for argv, message in [(["--frames", "0"], "--frames: must be in 1..1024, got 0"),
                          (["--out", str(tmp_path / "v.avi")], "use a .gif or .mp4"),
                          (["--fps", "0"], "--fps: must be a positive number"),
                          (["--class", "3"], "--class: this is a text-to-image bundle: it takes a prompt")]:
        args = argv if argv[0] == "--class" else ["--prompt", PROMPT, *argv]
        assert main(["generate", str(video_bundle_dir), "--steps", "2", *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "v.avi").exists()
    assert main(["inspect", str(video_bundle_dir), "--steps", "50"]) == 0
    text = capsys.readouterr().out
    assert "family  unet3d" in text and "key steps [0, 1, 2, 3, 5, 10, 15, 25, 35]" in text
    assert "conv_in + transformer_in + down blocks" in text


def test_cli_mp4(video_bundle_dir, tmp_path, capsys):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="MP4 output needs the video extra")
    out = tmp_path / "v.mp4"
    assert main(["generate", str(video_bundle_dir), "--prompt", PROMPT, "--frames", "6", "--steps", "3",
                 "--height", "48", "--width", "32", "--fps", "6", "--out", str(out)]) == 0
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert frames == 6 and seconds == pytest.approx(1.0, abs=0.1)
    reader = imageio_ffmpeg.read_frames(str(out))
    assert next(reader)["size"] == (32, 48)
    reader.close()


def test_mp4_without_imageio_ffmpeg_says_how_to_get_it(video_bundle_dir, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails as when the extra is not installed
    assert main(["generate", str(video_bundle_dir), "--prompt", PROMPT, "--out", str(tmp_path / "v.mp4")]) == 2
    assert "pip install 'keystep[video]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_profile_and_tune(bundle, video_bundle_dir, capsys):
    result = profile_bundle(bundle, get_backend("onnxruntime", threads=1),
                            SamplingOptions.from_bundle(bundle, num_steps=4),
                            plans=["0,2", "deep0:uniform:2"], warmup=0, repeats=1, frames=2)
    assert result["family"] == "unet3d" and result["settings"]["frames"] == 2
    assert "scaled by frames x pixels" in result["flops_note"]
    plans = {p["spec"]: p for p in result["plans"]}
    assert set(plans) == {"all", "0,2", "deep0:uniform:2"}
    assert plans["0,2"]["flop_ratio"] < 1 and plans["deep0:uniform:2"]["flop_ratio"] < 1
    assert "vae_decoder" in plans["all"]["stages"] and "text_encoder" in plans["all"]["stages"]
    full = bundle.stage("full").flops(2) * 4 * 2 / bundle.model_config["num_frames"]  # 4 steps, CFG rows, 2 frames
    assert plans["all"]["stages"]["full"]["flops_per_run"] == pytest.approx(full)
    assert main(["tune", str(video_bundle_dir), "--target-speedup", "1.3", "--steps", "4", "--seeds", "1",
                 "--prompt", PROMPT, "--dry-run", "--json", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    record = json.loads(out[: out.rindex("}") + 1])
    chosen = next(t for t in record["trials"] if t["plan"] == record["chosen"])
    assert chosen["flops_ratio"] <= 1 / 1.3 and chosen["psnr"] is not None
    assert any(t["plan"].startswith("deep0:") for t in record["trials"])  # the cache variant was a candidate


# --- slow: a deeper ModelScope-pattern UNet3D (three levels, two layers per block) with every kind of branch -------


@pytest.fixture(scope="module")
def deep_video(tmp_path_factory):
    """(pipeline, sampler) of a three-level UNet3D, 2 layers per block, built with DeepCache branches 2 (inside the
    last up block), 4 (inside the middle one) and 7 (inside the first, plain one)."""
    from transformers import CLIPTokenizer

    from keystep.export.build import build_bundle
    from sd_reference import tiny_clip, tiny_tokenizer_vocab, tiny_vae
    from video_reference import save_text_to_video_pipeline, tiny_unet3d

    unet = tiny_unet3d(seed=5, block_out_channels=(16, 32, 32), layers_per_block=2,
                       down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
                       up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"))
    tokenizer = CLIPTokenizer(vocab=tiny_tokenizer_vocab(), merges=[], model_max_length=77)
    root = tmp_path_factory.mktemp("deep-video")
    path = save_text_to_video_pipeline(root / "pipeline", unet, tiny_vae(), tiny_clip(), tokenizer)
    out = build_bundle(str(path), str(root / "bundle"), steps=10, cache="deep:2,4,7", frames=8,
                       progress=lambda m: None)
    pipe = TextToVideoSDPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe, VideoSampler(Bundle.load(out), get_backend("onnxruntime", threads=1))


@pytest.mark.slow
@pytest.mark.parametrize("branch,interval", [(2, 3), (4, 2), (7, 4)])
def test_deepcache_branches_of_a_deeper_unet3d(deep_video, branch, interval):
    pipe, sampler = deep_video
    latents = latents_for(3, 64, 80, seed=branch)
    expected = deepcache_reference(pipe, branch, interval, latents, 8)
    ours = sampler.sample([PROMPT], options(sampler, num_steps=8, guidance=7.5, key_steps="all",
                                            cache=f"deep{branch}:uniform:{interval}"),
                          negative_prompt=NEGATIVE, height=64, width=80, init_noise=latents.numpy(), num_frames=3)
    np.testing.assert_allclose(ours.latents, expected, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("scheduler_name", ["pndm", "dpmpp-2m"])
def test_deeper_unet3d_baseline_and_key_steps(deep_video, scheduler_name):
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

    pipe, sampler = deep_video
    cls = {"pndm": PNDMScheduler, "dpmpp-2m": DPMSolverMultistepScheduler}[scheduler_name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    latents = latents_for(9, 64, 64, seed=1)
    expected = pipe(PROMPT, num_frames=9, num_inference_steps=6, guidance_scale=9.0, latents=latents,
                    output_type="latent").frames.numpy()
    run = dict(num_steps=6, guidance=9.0, scheduler=scheduler_name)
    ours = sampler.sample([PROMPT], options(sampler, key_steps="all", **run), init_noise=latents.numpy(),
                          num_frames=9)
    np.testing.assert_allclose(ours.latents, expected, **TOL)
    keys = [0, 1, 2, 3, 5]
    reference = video_encoder_propagation_sample(pipe, pipe.scheduler, PROMPT, latents, 6, 9.0, set(keys)).numpy()
    # explicit key steps: PNDM makes 7 model calls of 6 steps (a repeated timestep), so its default list differs
    fd = sampler.sample([PROMPT], options(sampler, key_steps=",".join(map(str, keys)), parallel=True, **run),
                        init_noise=latents.numpy(), num_frames=9)
    assert list(fd.prepared.plan.key_steps) == keys
    np.testing.assert_allclose(fd.latents, reference, **TOL)


def test_python_api_makes_the_cli_videos(video_bundle_dir, tmp_path):
    """keystep.load() on a text-to-video bundle: the CLI's latents for the same inputs, frames per video as PIL."""
    import keystep

    z = tmp_path / "z.npy"
    assert main(["generate", str(video_bundle_dir), "--prompt", PROMPT, "--frames", "4", "--steps", "3", "--seed", "5",
                 "--height", "48", "--width", "64", "--save-latents", str(z)]) == 0
    pipe = keystep.load(video_bundle_dir)
    out = pipe(prompt=PROMPT, num_frames=4, num_inference_steps=3, seed=5, height=48, width=64)
    np.testing.assert_array_equal(out.latents, np.load(z))
    assert len(out.images) == 1 and len(out.images[0]) == 4 and out.images[0][0].size == (64, 48)
    with pytest.raises(keystep.KeystepError, match="num_frames: must be in 1..1024"):
        pipe(prompt=PROMPT, num_frames=0)


def test_triton_orchestrator_serves_videos(video_bundle_dir):
    """The Triton model's core on a text-to-video bundle: (1, F, H, W, 3) frames per row, the API's for that seed."""
    import keystep
    from keystep.runtime.triton.orchestrator import OrchestratorCore

    pipe = keystep.load(video_bundle_dir)
    core = OrchestratorCore(pipe, max_rows=2)
    inputs = {"prompt": np.array([[PROMPT.encode()]], object), "seed": np.array([[3]], np.int64),
              "steps": np.array([[2]], np.int32), "num_frames": np.array([[3]], np.int32),
              "height": np.array([[48]], np.int32), "width": np.array([[64]], np.int32)}
    out = core.execute([(inputs, None)])[0]
    expected = pipe(prompt=PROMPT, seed=3, num_inference_steps=2, num_frames=3, height=48, width=64, output_type="np")
    assert out["image"].shape == (1, 3, 48, 64, 3)
    np.testing.assert_array_equal(out["image"], np.round(expected.images * 255).astype(np.uint8))
    np.testing.assert_array_equal(out["latents"], expected.latents)
