"""The command line end to end, and bad input: a clear message, exit code 2, no traceback, no half-written bundle."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from keystep.tools.cli import main


def run_cli(*args):
    done = subprocess.run([sys.executable, "-m", "keystep.tools.cli", *map(str, args)], capture_output=True, text=True)
    return done.returncode, done.stdout, done.stderr


def test_generate_and_inspect(tiny_bundle, tmp_path, capsys):
    assert main(["generate", str(tiny_bundle), "--class", "1", "4", "--steps", "10", "--save-latents",
                 str(tmp_path / "z.npy")]) == 0
    z = np.load(tmp_path / "z.npy")
    assert z.shape == (2, 4, 8, 8) and z.dtype == np.float32 and np.isfinite(z).all()
    np.save(tmp_path / "noise.npy", np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32))
    assert main(["generate", str(tiny_bundle), "--class", "1", "4", "--steps", "10", "--init-noise",
                 str(tmp_path / "noise.npy"), "--save-latents", str(tmp_path / "z2.npy")]) == 0
    assert not np.array_equal(np.load(tmp_path / "z2.npy"), z)
    capsys.readouterr()
    assert main(["inspect", str(tiny_bundle), "--json", "--steps", "10", "--key-steps", "0,5", "--parallel"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["plan"]["key_steps"] == [0, 5]
    assert [c["stage"] for c in info["plan"]["calls"]] == ["encoder", "decoder", "encoder", "decoder"]
    assert 0 < info["plan"]["flop_ratio"] < 1
    assert main(["inspect", str(tiny_bundle)]) == 0
    assert "GFLOP" in capsys.readouterr().out


def test_pipeline_bundle_writes_png(pipeline_bundle, tmp_path):
    from PIL import Image

    assert main(["generate", str(pipeline_bundle), "--class", "0", "--steps", "4", "--out", str(tmp_path / "a.png")]) == 0
    image = Image.open(tmp_path / "a.png")
    assert image.size == (16, 16) and image.mode == "RGB"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--class", "10"], "unknown class 10"),
        (["--class", "-1"], "unknown class -1"),
        (["--steps", "0"], "at least 1"),
        (["--steps", "10", "--key-steps", "0,10"], "out of range"),
        (["--steps", "10", "--key-steps", "1,2"], "step 0 must be a key step"),
        (["--max-decoder-batch", "1"], "below one step"),
    ],
)
def test_bad_generate_input(tiny_bundle, args, message):
    code, out, err = run_cli("generate", tiny_bundle, *args)
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_corrupt_missing_and_unreadable_bundles(tiny_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    with open(bad / "decoder.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00corrupt")
    code, _, err = run_cli("generate", bad)
    assert code == 2 and "sha256" in err and "decoder" in err and "Traceback" not in err
    (bad / "decoder.onnx").unlink()
    code, _, err = run_cli("inspect", bad)
    assert code == 2 and "missing" in err
    (bad / "manifest.json").write_text("{not json")
    code, _, err = run_cli("inspect", bad)
    assert code == 2 and "unreadable manifest" in err
    code, _, err = run_cli("inspect", tmp_path / "nowhere")
    assert code == 2 and "not found" in err


def test_failed_build_leaves_nothing_behind(original_checkpoint, tmp_path):
    out = tmp_path / "b"
    code, _, err = run_cli("build", original_checkpoint, "--out", out, "--num-heads", "4", "--split", "9")
    assert code == 2 and "--split 9 is out of range" in err
    code, _, err = run_cli("build", tmp_path / "missing.pt", "--out", out)
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli("build", original_checkpoint, "--out", out, "--num-heads", "4", "--key-steps", "3")
    assert code == 2 and "step 0" in err
    assert list(tmp_path.iterdir()) == []  # no bundle, no temp dir


def test_export_failure_midway_removes_the_temp_dir(original_checkpoint, tmp_path, monkeypatch):
    from keystep.export import bundle_writer
    from keystep.export.build import build_dit_bundle

    real = bundle_writer.export_stage
    calls = []

    def failing(stage, out_dir):
        calls.append(stage.name)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(stage, out_dir)

    monkeypatch.setattr(bundle_writer, "export_stage", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        build_dit_bundle(str(original_checkpoint), str(tmp_path / "b"), num_heads=4, progress=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_width_build_inspect_generate_and_profile(original_checkpoint, tmp_path, capsys):
    """--width calibrated on a plain DiT end to end from the CLI; the profiles show in inspect and profile."""
    out = tmp_path / "calibrated"
    assert main(["build", str(original_checkpoint), "--out", str(out), "--num-heads", "4", "--steps", "4",
                 "--width", "calibrated:0.6", "--max-profiles", "1"]) == 0
    capsys.readouterr()
    # an original DiT checkpoint has no scheduler config: the bundle samples as DiT's own code (unclipped DDIM)
    scheduler = json.loads((out / "manifest.json").read_text())["scheduler"]
    assert (scheduler["_class_name"], scheduler["clip_sample"]) == ("RespacedDDIMScheduler", False)
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    width = info["width"]
    assert width["spec"] == "calibrated:0.6" and width["token_selection"] == "none" and not width["approximation"]
    assert [e["name"] for e in width["engines"]] == ["encoder.w0", "decoder.w0"]
    assert [e["steps"] for e in width["engines"]] == [[0, 1, 2, 3]] * 2  # one engine per stage serves every step
    assert all(0 < s["block_flops_fraction"] <= 0.6 for s in width["steps"])
    assert {c["stage"] for c in info["plan"]["calls"]} == {"encoder.w0", "decoder.w0"}
    assert main(["inspect", str(out)]) == 0
    assert "profile" in capsys.readouterr().out
    assert main(["generate", str(out), "--class", "3", "--save-latents", str(tmp_path / "z.npy")]) == 0
    assert np.isfinite(np.load(tmp_path / "z.npy")).all()
    capsys.readouterr()
    assert main(["profile", str(out), "--repeats", "1", "--warmup", "0", "--json"]) == 0
    profile = json.loads(capsys.readouterr().out)
    assert profile["width"]["spec"] == "calibrated:0.6"
    assert [p["stages"]["decoder"]["calls_per_run"] for p in profile["plans"]] == [4, 4]


@pytest.mark.parametrize("args, message", [
    (["--width", "calibrated:1.5"], "bad --width"),
    (["--width", "dydit"], "needs a DyDiT checkpoint"),
    (["--width", "calibrated:0.5", "--max-profiles", "0"], "--max-profiles must be at least 1"),
])
def test_bad_width_options(original_checkpoint, tmp_path, args, message):
    code, _, err = run_cli("build", original_checkpoint, "--out", tmp_path / "b", "--num-heads", "4", *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()
