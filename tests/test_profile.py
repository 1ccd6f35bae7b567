"""``keystep profile``: per-stage call counts match the plans, the numbers add up, and every output format works."""

import json

import numpy as np
import pytest

from keystep.runtime.backends.base import get_backend
from keystep.runtime.bundle import Bundle
from keystep.runtime.plan import build_calls, parse_key_steps
from keystep.runtime.sampler import SamplingOptions
from keystep.tools.cli import main
from keystep.tools.cli.profile import format_table, plot, profile_bundle, to_markdown

STEPS = 4
PEAK = 256  # a small MatMul keeps the tests quick; the CLI default is 1024


def expected_calls(spec, parallel):
    return build_calls(parse_key_steps(spec, STEPS), 1, cfg=True, parallel=parallel)


def counts(calls, stage):
    return sum(1 for c in calls if c.stage == stage)


def check_consistency(d, bundle):
    """Stages + host = total, GFLOP/s = FLOPs / seconds, speedup = baseline / plan, 0 < floor < measured."""
    base = next(p for p in d["plans"] if p["name"] == d["baseline"])
    assert d["plans"][0] is base and base["baseline"]
    assert d["peak"]["gflops_per_s"] > 0
    for p in d["plans"]:
        total = p["seconds_per_run"]["median"]
        parts = sum(s["seconds_per_run"]["median"] for s in p["stages"].values())
        assert parts == pytest.approx(total, rel=0.03)
        assert p["seconds_per_image"] == pytest.approx(total / d["settings"]["images"])
        assert p["speedup"] == pytest.approx(base["seconds_per_image"] / p["seconds_per_image"])
        assert p["sampling_speedup"] == pytest.approx(base["sampling_seconds_per_image"] / p["sampling_seconds_per_image"])
        assert 0 < p["floor_seconds_per_run"] < p["seconds_per_run"]["min"]
        assert p["floor_seconds_per_run"] == pytest.approx(p["flops_per_run"] / (d["peak"]["gflops_per_s"] * 1e9))
        assert 0 < p["fraction_of_peak"] < 1
        for name, s in p["stages"].items():
            if name == "host":
                assert s["flops_per_run"] is None
                continue
            items = [t for t in p["timeline"] if t["stage"] == name]
            assert len(items) == s["calls_per_run"]
            assert s["flops_per_run"] == pytest.approx(sum(bundle.stage(name).flops(t["batch"]) for t in items))
            assert s["gflops_per_s"] == pytest.approx(s["flops_per_run"] / s["seconds_per_run"]["median"] / 1e9)
            assert s["seconds_per_call"]["min"] <= s["seconds_per_call"]["median"] <= s["seconds_per_call"]["max"]
            for batch, sub in s["by_batch"].items():
                assert sub["flops_per_call"] == bundle.stage(name).flops(int(batch))
                assert sub["gflops_per_s"] == pytest.approx(
                    sub["flops_per_call"] / sub["seconds_per_call"]["median"] / 1e9)
            assert sum(sub["calls_per_run"] for sub in s["by_batch"].values()) == s["calls_per_run"]
        starts = [t["start"] for t in p["timeline"]]
        assert starts == sorted(starts) and 0 <= starts[0]


@pytest.fixture(scope="module")
def dit_profile(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    options = SamplingOptions.from_bundle(bundle, num_steps=STEPS)
    return profile_bundle(bundle, get_backend("onnxruntime"), options, plans=["0,2"], both_decoder_modes=True,
                          warmup=1, repeats=1, class_labels=[3], peak_size=PEAK)


def test_dit_profile_counts_and_numbers(dit_profile, tiny_bundle):
    d = dit_profile
    assert d["family"] == "dit" and d["settings"]["repeats"] == 1 and d["settings"]["images"] == 1
    names = [p["name"] for p in d["plans"]]
    assert names == ["all", "0,2 (parallel)", "0,2 (sequential)"]
    base, parallel, sequential = d["plans"]
    assert set(base["stages"]) == {"full", "host"}
    assert base["stages"]["full"]["calls_per_run"] == STEPS
    assert base["stages"]["full"]["batches"] == [2]  # CFG doubles the rows
    for p, par in ((parallel, True), (sequential, False)):
        calls = expected_calls("0,2", par)
        assert p["key_steps"] == [0, 2] and p["decoder_mode"] == ("parallel" if par else "sequential")
        assert set(p["stages"]) == {"encoder", "decoder", "host"}
        assert p["stages"]["encoder"]["calls_per_run"] == 2
        assert p["stages"]["decoder"]["calls_per_run"] == counts(calls, "decoder")
        assert p["calls_per_run"] == len(calls)
        plan_items = [t for t in p["timeline"] if t["stage"] in ("encoder", "decoder", "full")]
        assert [(t["stage"], tuple(t["steps"]), t["batch"]) for t in plan_items] == \
            [(c.stage, c.steps, c.batch) for c in calls]
    assert parallel["stages"]["decoder"]["by_batch"].keys() == {"4"}  # two steps x CFG per call
    assert sequential["stages"]["decoder"]["by_batch"]["2"]["calls_per_run"] == STEPS
    assert parallel["flops_per_run"] == sequential["flops_per_run"] < base["flops_per_run"]
    assert parallel["flop_ratio"] == pytest.approx(parallel["flops_per_run"] / base["flops_per_run"])
    check_consistency(d, Bundle.load(tiny_bundle))
    json.dumps(d)  # machine-readable as is


def test_dit_outputs(dit_profile, tmp_path):
    table = format_table(dit_profile)
    for text in ("plan all", "0,2 (parallel)", "0,2 (sequential)", "encoder", "decoder", "host", "floor", "peak",
                 "summary", "GFLOP/s"):
        assert text in table
    md = to_markdown(dit_profile)
    assert "| plan | s/image |" in md and "|---|" in md and "0,2 (sequential)" in md
    path = plot(dit_profile, tmp_path / "out" / "profile.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sd_profile_with_controlnet(sd_bundle_dir, tmp_path):
    from PIL import Image

    control = tmp_path / "edges.png"
    Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)).save(control)
    bundle = Bundle.load(sd_bundle_dir)
    options = SamplingOptions.from_bundle(bundle, num_steps=STEPS, guidance=5.0)
    d = profile_bundle(bundle, get_backend("onnxruntime"), options, plans=["0,2"], warmup=0, repeats=1,
                       prompts=["a red circle"], control_image=control, peak_size=PEAK)
    assert d["family"] == "unet" and d["settings"]["control"]
    base, plan = d["plans"]
    assert base["name"] == "all" and plan["name"] == "0,2 (sequential)"  # CPU: sequential decoders by default
    # with ControlNet the baseline runs encoder + decoder (+ ControlNet) at every step
    assert {k: s["calls_per_run"] for k, s in base["stages"].items()} == {
        "text_encoder": 2, "encoder": STEPS, "controlnet": STEPS, "decoder": STEPS, "vae_decoder": 1, "host": None}
    assert {k: s["calls_per_run"] for k, s in plan["stages"].items()} == {
        "text_encoder": 2, "encoder": 2, "controlnet": 2, "decoder": STEPS, "vae_decoder": 1, "host": None}
    assert list(plan["stages"]) == ["text_encoder", "encoder", "controlnet", "decoder", "vae_decoder", "host"]
    # ControlNet runs right after its key step's encoder call
    stages = [t["stage"] for t in plan["timeline"]]
    assert stages == ["text_encoder", "text_encoder", "encoder", "controlnet", "decoder", "decoder", "encoder",
                      "controlnet", "decoder", "decoder", "vae_decoder"]
    host = plan["stages"]["host"]
    assert 0 <= host["in_loop_seconds_per_run"]["median"] <= host["seconds_per_run"]["median"] + 1e-3
    check_consistency(d, bundle)
    md = to_markdown(d)
    assert "controlnet" in md and "text_encoder" in md and "|---|" in md


def test_cli_profile(tiny_bundle, sd_bundle_dir, tmp_path, capsys):
    args = ["--steps", str(STEPS), "--warmup", "0", "--repeats", "1", "--peak-size", str(PEAK)]
    assert main(["profile", str(tiny_bundle), *args, "--markdown", str(tmp_path / "p.md")]) == 0
    out = capsys.readouterr().out
    assert "plan all" in out and "summary" in out and "floor" in out and "speedup" in out
    assert (tmp_path / "p.md").read_text().startswith("# keystep profile")
    assert main(["profile", str(sd_bundle_dir), *args, "--json", "--plan", "uniform:2", "--threads", "1"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in d["plans"]] == ["all", "uniform:2 (sequential)"] and d["threads"] == 1
    assert d["plans"][0]["stages"]["full"]["calls_per_run"] == STEPS
    assert d["plans"][1]["stages"]["encoder"]["calls_per_run"] == 2
    assert d["settings"]["prompts"] == ["a photo"]


@pytest.mark.parametrize("args,message", [
    (["--plan", "1,2"], "step 0 must be a key step"),
    (["--plan", "bogus"], "bad key-step spec"),
    (["--plan", "0,9"], "out of range"),
    (["--prompt", "a cat"], "use --class"),
])
def test_cli_profile_bad_input(tiny_bundle, capsys, args, message):
    assert main(["profile", str(tiny_bundle), "--steps", str(STEPS), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
