"""SDXL bundles and DeepFloyd-IF cascades in the layers every family goes through: the manifest schema (what a build
writes loads; what the schema does not describe is refused), the Python API (``keystep.load(...)(...)`` gives the
images ``keystep generate`` writes for the same inputs), one request validation layer for both (bad input: one line,
exit 2, nothing written) and Triton (SDXL served by the orchestrator; cascades refused in one line).

The references: the CLI's own PNGs (written by ``keystep generate``, which the API must reproduce bit for bit) and,
for the schema, manifests edited by hand in the test."""

import copy
import json

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

import keystep
from keystep.runtime.bundle import Bundle, BundleError
from keystep.runtime.manifest import manifest_model
from keystep.tools.cli import main


def cli_image(bundle, tmp_path, *args) -> np.ndarray:
    out = tmp_path / f"cli-{abs(hash(args))}.png"
    assert main(["generate", str(bundle), *args, "--out", str(out)]) == 0
    return np.asarray(Image.open(out))


def refused(data: dict) -> str:
    with pytest.raises(ValidationError) as info:
        manifest_model(data).model_validate(data)
    return str(info.value)


def manifest(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


# --- the manifest schema --------------------------------------------------------------------------------------


def test_schema_describes_sdxl(sdxl_bundle_dir):
    data = manifest(sdxl_bundle_dir)
    spec = manifest_model(data).model_validate(data)
    assert spec.family == "unet" and spec.config.sdxl.projection_dim == 32
    assert spec.config.conditioning == ["text_embeds", "time_ids"]
    for edit, message in [
        (lambda d: d["model_config"]["sdxl"].update(pooled=True), "pooled"),  # closed: an unknown key
        (lambda d: d["model_config"]["sdxl"].update(time_ids=5), "time_ids"),  # the refiner's 5 ids: not supported
        (lambda d: d["model_config"].update(conditioning=["time_ids"]), "text_embeds + time_ids"),
        (lambda d: d["stages"].pop("text_encoder_2"), "text_encoder_2"),
        (lambda d: d["assets"].pop("tokenizer_2"), "tokenizer_2"),
        (lambda d: d["stages"]["decoder"]["inputs"].pop(), "stages.decoder: no input"),
        (lambda d: d["default_plan"].update(noise_level=250), "noise_level"),
    ]:
        edited = copy.deepcopy(data)
        edit(edited)
        assert message in refused(edited)


def test_schema_describes_the_cascade_and_its_stages(if_bundle_dir):
    top = manifest(if_bundle_dir)
    assert manifest_model(top).model_validate(top).cascade[1].role == "super_resolution"
    stage_2 = manifest(if_bundle_dir / "stage_2")
    spec = manifest_model(stage_2).model_validate(stage_2)
    assert spec.family == "if" and spec.config.if_.learned_variance and spec.default_plan.noise_level == 250
    for data, edit, message in [
        (top, lambda d: d.update(scheduler={}), "scheduler"),  # a cascade has no scheduler of its own
        (top, lambda d: d["cascade"].reverse(), "a base stage first"),
        (top, lambda d: d["cascade"].append({"name": "../x", "role": "super_resolution"}), "cascade.2.name"),
        (top, lambda d: d["model_config"].update(text_dim=7), "text_dim"),
        (stage_2, lambda d: d["default_plan"].pop("noise_level"), "noise_level"),
        (stage_2, lambda d: d["model_config"]["if"].pop("noising_scheduler"), "noising_scheduler"),
        (stage_2, lambda d: d["model_config"]["if"].update(role="base"), "in_channels 6"),
        (stage_2, lambda d: d["model_config"]["if"]["noising_scheduler"].update(beta_end=2.0), "beta_end"),
    ]:
        edited = copy.deepcopy(data)
        edit(edited)
        assert message in refused(edited)


def test_cascade_load_checks_its_stage_bundles(if_bundle_dir, tmp_path):
    import shutil

    root = tmp_path / "if"
    shutil.copytree(if_bundle_dir, root)
    assert list(Bundle.load(root).parts) == ["stage_1", "stage_2"]
    top = manifest(root)
    top["cascade"][1]["role"] = "base"
    top["cascade"][0]["role"] = "base"
    (root / "manifest.json").write_text(json.dumps(top))
    with pytest.raises(BundleError, match="base stage first"):
        Bundle.load(root)
    top["cascade"] = [{"name": "stage_2", "role": "base"}]
    (root / "manifest.json").write_text(json.dumps(top))
    with pytest.raises(BundleError, match="stage 'stage_2' is a super_resolution stage"):
        Bundle.load(root)


# --- the Python API == keystep generate -------------------------------------------------------------------------


def test_api_equals_cli_for_sdxl(sdxl_bundle_dir, tmp_path):
    pipe = keystep.load(sdxl_bundle_dir)
    out = pipe(prompt="a cat", prompt_2="a dog", negative_prompt="blurry", seed=3, num_inference_steps=3, height=64,
               width=96, original_size=(128, 128), crops_coords_top_left=(0, 8), target_size=(64, 96))
    expected = cli_image(sdxl_bundle_dir, tmp_path, "--prompt", "a cat", "--prompt-2", "a dog", "--negative-prompt",
                         "blurry", "--seed", "3", "--steps", "3", "--height", "64", "--width", "96", "--original-size",
                         "128", "128", "--crops-coords-top-left", "0", "8", "--target-size", "64", "96")
    assert np.array_equal(np.asarray(out.images[0]), expected)
    # defaults (no negative prompt: SDXL's zero negative embeddings; sizes from height/width), two prompts, key steps
    out = pipe(prompt=["a cat", "a dog"], seed=5, num_inference_steps=6, key_steps="0,2", output_type="np")
    assert out.images.shape == (2, 128, 128, 3) and "2 key steps of 6" in out.plan
    assert main(["generate", str(sdxl_bundle_dir), "--prompt", "a cat", "--prompt", "a dog", "--seed", "5", "--steps",
                 "6", "--key-steps", "0,2", "--out", str(tmp_path / "two.png")]) == 0
    for i in range(2):
        expected = np.asarray(Image.open(tmp_path / f"two-{i}.png"))
        assert np.array_equal(np.round(out.images[i] * 255).astype(np.uint8), expected)


def test_api_runs_the_cascade_as_the_cli(if_bundle_dir, tmp_path):
    pipe = keystep.load(if_bundle_dir)
    assert pipe.family == "cascade" and pipe.can_decode
    out = pipe(prompt="a cat", negative_prompt="blurry", seed=1, noise_level=100,
               stage_plans={"stage_2": {"num_inference_steps": 3, "key_steps": "all"}})
    expected = cli_image(if_bundle_dir, tmp_path, "--prompt", "a cat", "--negative-prompt", "blurry", "--seed", "1",
                         "--noise-level", "100", "--stage", "stage_2", "--steps", "3", "--key-steps", "all")
    assert out.images[0].size == (32, 32) and np.array_equal(np.asarray(out.images[0]), expected)
    assert out.plan.startswith("stage_1 16x16: default: 3 key steps of 10") and "stage_2 32x32: all" in out.plan
    # plan arguments for every stage; stage I's size sets stage II's (2x here)
    wide = pipe(prompt="a cat", num_inference_steps=2, height=16, width=24, output_type="latent")
    assert wide.latents.shape == (1, 3, 32, 48)
    # a numpy generator replaces the seeds: the same generator state, the same images
    runs = [pipe(prompt="a cat", num_inference_steps=2, generator=np.random.default_rng(7), output_type="latent")
            for _ in range(2)]
    assert np.array_equal(runs[0].latents, runs[1].latents)
    assert not np.array_equal(runs[0].latents, pipe(prompt="a cat", num_inference_steps=2, output_type="latent").latents)


# --- one validation layer: bad input is one line, exit 2, nothing written ---------------------------------------


@pytest.mark.parametrize("case", ["sdxl", "cascade", "sd"])
def test_bad_input_is_one_line_and_writes_nothing(case, sdxl_bundle_dir, if_bundle_dir, sd_bundle_dir, tmp_path,
                                                  capsys):
    bundle = {"sdxl": sdxl_bundle_dir, "cascade": if_bundle_dir, "sd": sd_bundle_dir}[case]
    cases = {
        "sdxl": [(["--prompt", "a", "--prompt-2", "x", "y", "z"], "--prompt-2: 3 prompts for 1 prompts"),
                 (["--prompt", "a", "--target-size", "0", "5"], "--target-size: must be in 1..65536, got 0"),
                 (["--prompt", "a", "--crops-coords-top-left", "-1", "0"], "--crops-coords-top-left: must be in 0.."),
                 (["--prompt", "a", "--noise-level", "3"], "--noise-level: applies to DeepFloyd-IF"),
                 (["--prompt", "a", "--height", "80"], "--height: must be a multiple of 32"),
                 (["--prompt", "a", "--stage", "stage_2"], "--stage: applies to cascade bundles")],
        "cascade": [(["--prompt", "a", "--stage", "stage_9"], "--stage: no diffusion stage 'stage_9'"),
                    (["--prompt", "a", "--height", "18"], "--height: must be a multiple of 4"),
                    (["--prompt", "a", "--noise-level", "1000"], "--noise-level: must be in 0..999"),
                    (["--prompt", "a", "--original-size", "1", "1"], "--original-size: applies to SDXL bundles only"),
                    (["--prompt", "a", "--stage", "stage_2", "--key-steps", "0,99"], "--key-steps: stage_2:"),
                    (["--prompt", "a", "--steps", "0"], "--steps: stage_1: must be at least 1"),
                    (["--prompt", "a", "--control-image", "x.png"], "no ControlNet stage"),
                    (["--class", "1"], "--class: this is a text-to-image bundle")],
        "sd": [(["--prompt", "a", "--prompt-2", "b"], "--prompt-2: applies to SDXL bundles only"),
               (["--prompt", "a", "--target-size", "64", "64"], "--target-size: applies to SDXL bundles only")],
    }[case]
    for args, message in cases:
        capsys.readouterr()
        out = tmp_path / "never.png"
        assert main(["generate", str(bundle), *args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
        assert not out.exists()
    with pytest.raises(keystep.KeystepError, match="latents: a cascade draws"):
        keystep.load(if_bundle_dir)(prompt="a", latents=np.zeros((1, 3, 16, 16), np.float32))


# --- Triton --------------------------------------------------------------------------------------------------


def test_triton_serves_sdxl_and_refuses_cascades(sdxl_bundle_dir, if_bundle_dir, tmp_path, capsys):
    """The orchestrator model (in-process stage calls, Triton's request API faked by its core) answers an SDXL
    request with the CLI's image; the repository writer writes SDXL repositories (both text encoders as BLS stage
    models) and refuses cascades and their stages in one line, writing nothing."""
    pytest.importorskip("tritonclient")
    from keystep.runtime.pipeline import Pipeline, make_backend
    from keystep.runtime.triton.orchestrator import OrchestratorCore
    from keystep.tools.serve.repository import RepositoryOptions, write_repository

    core = OrchestratorCore(Pipeline(Bundle.load(sdxl_bundle_dir), make_backend("onnxruntime")), max_rows=2)
    inputs = {"prompt": np.array([[b"a cat"]], object), "seed": np.array([[4]], np.int64),
              "steps": np.array([[3]], np.int32), "height": np.array([[64]], np.int32),
              "width": np.array([[64]], np.int32), "plan": np.array([[b"0,1"]], object)}
    (got,) = core.execute([(inputs, None)])
    expected = cli_image(sdxl_bundle_dir, tmp_path, "--prompt", "a cat", "--seed", "4", "--steps", "3", "--height",
                         "64", "--width", "64", "--key-steps", "0,1")
    assert np.array_equal(got["image"][0], expected)
    repo = write_repository(sdxl_bundle_dir, tmp_path / "repo", RepositoryOptions(stage_calls="bls", max_batch=1))
    assert {"keystep_text_encoder", "keystep_text_encoder_2", "keystep_encoder", "keystep_decoder"} <= {
        p.name for p in repo.iterdir()}
    for bundle in (if_bundle_dir, if_bundle_dir / "stage_1"):
        capsys.readouterr()
        assert main(["triton", str(bundle), "--out", str(tmp_path / "cascade-repo")]) == 2
        err = capsys.readouterr().err
        assert "DeepFloyd-IF" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "cascade-repo").exists()
