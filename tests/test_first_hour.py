"""What a new user hits right after `keystep demo` (issue 14): images from the shipped DiT, outputs checked before any
stage runs, repeated flags, bad values as one line, and DiTs with per-block embedders."""

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from keystep.tools.cli import main, make_parser
from keystep.tools.cli.args import Extend


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keystep: error: "), err
    return lines[0]


def test_pixel_space_dit_writes_pngs(digits_dit_bundle, tmp_path, capsys):
    """Item 1: the next command after the demo gives a 16x16 grey PNG of the sample itself."""
    out, z = tmp_path / "three.png", tmp_path / "z.npy"
    assert main(["generate", str(digits_dit_bundle), "--class", "3", "--steps", "10", "--out", str(out),
                 "--save-latents", str(z)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    image = np.asarray(Image.open(out))
    assert image.shape == (16, 16) and image.dtype == np.uint8
    # the demo's own mapping of a pixel-space sample in [-1, 1] to 8-bit grey
    sample = np.load(z)[0, 0]
    expected = ((np.clip(sample, -1, 1) + 1) * 127.5).round()
    assert np.abs(image.astype(int) - expected).max() <= 1
    assert json.loads((digits_dit_bundle / "manifest.json").read_text())["model_config"]["pixel_space"] is True


def test_without_out_an_image_bundle_writes_a_default_file(digits_dit_bundle, tmp_path, monkeypatch, capsys):
    """Item 2: never compute and throw the result away: a default file, and the command says where."""
    monkeypatch.chdir(tmp_path)
    assert main(["generate", str(digits_dit_bundle), "--class", "3", "--steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert "no --out given: writing digits-dit.png" in printed and "wrote digits-dit.png" in printed
    assert Image.open(tmp_path / "digits-dit.png").size == (16, 16)


def sampling_forbidden(monkeypatch):
    from keystep.runtime import sampler

    def refuse(*args, **kwargs):
        raise AssertionError("a stage ran before the output options were checked")

    monkeypatch.setattr(sampler.PlanSampler, "run_plan", refuse)


def test_latent_only_bundle_refuses_image_output_before_sampling(tiny_bundle, tmp_path, monkeypatch, capsys):
    """Items 2 and 3: a latent-space DiT without a VAE cannot make images; it says so before any stage runs and
    writes nothing, not even the latents it was also asked for."""
    sampling_forbidden(monkeypatch)
    z = tmp_path / "z.npy"
    assert main(["generate", str(tiny_bundle), "--out", str(tmp_path / "a.png"), "--save-latents", str(z)]) == 2
    assert "--out: this bundle makes latents, not images" in one_error_line(capsys.readouterr().err)
    assert main(["generate", str(tiny_bundle)]) == 2
    assert "pass --save-latents" in one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["--out", "x.unknown"], "not an image format Pillow writes"),
    (["--out", "."], "is a directory"),
    (["--save-latents", "z.txt"], "name it so"),
])
def test_output_paths_are_checked_before_sampling(digits_dit_bundle, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    sampling_forbidden(monkeypatch)
    assert main(["generate", str(digits_dit_bundle), "--class", "3", *args]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_repeated_list_flags_accumulate(digits_dit_bundle, sd_bundle_dir, tmp_path):
    """Item 4: --prompt a --prompt b is two prompts; --class 1 2 --class 3 is three classes."""
    z = tmp_path / "z.npy"
    assert main(["generate", str(digits_dit_bundle), "--class", "1", "2", "--class", "3", "--steps", "2",
                 "--save-latents", str(z)]) == 0
    assert np.load(z).shape[0] == 3
    assert main(["generate", str(sd_bundle_dir), "--prompt", "a red cat", "--prompt", "two dogs", "--steps", "2",
                 "--height", "32", "--width", "32", "--save-latents", str(z)]) == 0
    assert np.load(z).shape[0] == 2
    args = make_parser().parse_args(["engines", "B", "--engine-images", "1", "--engine-images", "4"])
    assert args.engine_images == [1, 4]
    args = make_parser().parse_args(["engines", "B"])
    assert args.engine_images == [1]  # the default, not extended by later uses


def all_actions(parser):
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_actions(sub)


def test_every_list_flag_accumulates():
    """The class of problem behind item 4: no flag of any command takes several values and drops earlier uses."""
    offenders = ["/".join(a.option_strings) for a in all_actions(make_parser())
                 if a.option_strings and a.nargs in ("+", "*") and not isinstance(a, Extend)]
    assert offenders == []


@pytest.mark.parametrize("args,flag", [
    (["--steps", "1000000"], "--steps: 1000000 steps"),
    (["--seed", "-5"], "--seed: must be in 0..9223372036854775807, got -5"),
    (["--guidance", "nan"], "--guidance: must be a finite number"),
    (["--guidance", "inf"], "--guidance: must be a finite number"),
    (["--threads", "-1"], "--threads: must be in 1..1024, got -1"),
    (["--threads", "0"], "--threads: must be in 1..1024, got 0"),
    (["--images", "0"], "--images: must be in 1..64"),
    (["--height", "32"], "--height: this DiT makes 16x16 images only"),
    (["--prompt", "a cat"], "--prompt: this is a class-conditional bundle"),
    (["--max-decoder-batch", "0"], "--max-decoder-batch: must be at least 1"),
    (["--scheduler", "euler", "--steps", "2000"], "--steps: 2000 steps"),
])
def test_bad_values_are_one_line_before_any_stage(digits_dit_bundle, monkeypatch, capsys, args, flag):
    sampling_forbidden(monkeypatch)
    assert main(["generate", str(digits_dit_bundle), "--class", "3", *args]) == 2
    assert flag in one_error_line(capsys.readouterr().err)


def test_unparsable_values_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "B", "--steps", "x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["keystep generate: error: argument --steps: invalid int value: 'x' (see keystep generate --help)"]


def test_generate_help_shows_a_png_from_every_shipped_model(capsys):
    from keystep.models import SHIPPED

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for name in SHIPPED:
        assert f"keystep build {name} --out" in text
    assert text.count("--out ") >= len(SHIPPED)


# --- item 5: DiTs whose blocks carry their own timestep/class embedders -------------------------------------------


def diffusers_dit(per_block: bool):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(3)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-5)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        if not per_block:  # a converted original checkpoint: every block holds a copy of block 0's embedder
            first = model.transformer_blocks[0].norm1.emb
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(first.state_dict())
    return model.eval()


@pytest.mark.parametrize("per_block", [True, False], ids=["own-embedder-per-block", "shared-embedder"])
def test_dit_with_per_block_embedders_exports_faithfully(per_block, tmp_path):
    """A DiT initialised in diffusers (a different embedder in every block) builds and its stages compute what
    diffusers' own model computes; a converted one (copies) still exports one shared embedding."""
    import onnxruntime as ort

    from keystep.export.build import build_dit_bundle

    model = diffusers_dit(per_block)
    model.save_pretrained(tmp_path / "transformer")
    bundle = build_dit_bundle(str(tmp_path / "transformer"), str(tmp_path / "b"), steps=4, split=2,
                              progress=lambda m: None)
    config = json.loads((bundle / "manifest.json").read_text())["model_config"]
    assert config["own_embedder_blocks"] == ([1, 2, 3] if per_block else [])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 8, 8), dtype=np.float32)
    t = np.array([5.0, 500.0, 999.0], np.float32)
    y = np.array([1, 7, 10], np.int64)  # 10: the null class
    with torch.no_grad():
        expected = model(torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample
    run = {name: ort.InferenceSession(str(bundle / f"{name}.onnx")) for name in ("encoder", "decoder", "full")}
    full = run["full"].run(None, {"latent": x, "timestep": t, "class_label": y})[0]
    hidden = run["encoder"].run(None, {"latent": x, "timestep": t, "class_label": y})[0]
    split = run["decoder"].run(None, {"hidden": hidden, "timestep": t, "class_label": y})[0]
    scale = float(expected.abs().max())
    np.testing.assert_allclose(full, expected.numpy(), atol=2e-5 * scale, rtol=0)
    np.testing.assert_allclose(split, expected.numpy(), atol=2e-5 * scale, rtol=0)


def test_missing_output_parent_is_created_and_written_whole(digits_dit_bundle, tmp_path):
    out = tmp_path / "new" / "dir" / "a.png"
    assert main(["generate", str(digits_dit_bundle), "--class", "5", "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (16, 16)
    assert [p.name for p in out.parent.iterdir()] == ["a.png"]  # no temp file left behind


def test_newer_schema_version_says_upgrade(digits_dit_bundle, tmp_path, capsys):
    bundle = tmp_path / "b"
    shutil.copytree(digits_dit_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["schema_version"] = 7
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(bundle)]) == 2
    assert "comes from a newer keystep" in one_error_line(capsys.readouterr().err)
