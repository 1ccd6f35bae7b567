"""The benchmark tool runs end to end (tiny model, few steps) and its numbers are consistent."""

import pytest

from keystep.tools.bench.common import to_markdown
from keystep.tools.bench.dit import run


def test_bench_dit_smoke():
    result = run("dit-tiny", steps=4, repeats=1)
    assert set(result["median"]) == {"diffusers eager", "baseline", "key-step", "key-step, sequential"}
    assert all(t > 0 for t in result["median"].values())
    # same weights, same z_T, same scheduler: the ONNX baseline reproduces the diffusers loop
    assert result["max_abs_diff_baseline_vs_eager"] < 1e-3
    assert result["flops"]["key-step"] < result["flops"]["baseline"]
    assert "| baseline |" in to_markdown(result, "cmd", "tiny")


@pytest.mark.slow  # two bundles and both backends: ~2 minutes
def test_unified_bench_dit_smoke(capsys):
    """tools/bench end to end on the tiny DiT preset, both CPU backends: every row ran and is reported."""
    from keystep.tools.bench.side_by_side import main

    assert main(["--model", "dit", "--preset", "dit-tiny", "--steps", "6", "--repeats", "1", "--interval", "2",
                 "--target-speedup", "1.5"]) == 0
    out = capsys.readouterr().out
    for row in ("diffusers eager", "keystep baseline", "key-step (FasterDiffusion)", "block cache blocks2-5",
                "block cache blocks3-4", "tuned: ", "DyDiT width profiles", "DyDiT width + key steps"):
        assert f"| {row}" in out
    assert "| keystep baseline | onnxruntime |" in out and "| keystep baseline | openvino |" in out
    assert "Backend peaks" in out


@pytest.mark.slow  # two DyDiT bundles, one process per engine: ~1.5 minutes
def test_cpu_bench_smoke(tmp_path, capsys):
    """bench.cpu end to end on the tiny DyDiT: each engine in its own process, the tables filled, bf16's error vs
    ONNX Runtime fp32 reported."""
    from keystep.tools.bench.cpu import main

    engines = ["ort-fp32", "ov-f32"] + (["ov-bf16"] if _openvino_has_bf16() else [])
    assert main(["--model", "random:dydit-tiny", "--steps", "4", "--repeats", "1", "--work", str(tmp_path),
                 "--engines", *engines]) == 0
    out = capsys.readouterr().out
    row = "| openvino f32, static shapes |"
    assert "| onnxruntime |" in out and row in out and "widths + `default`: speedup / bound" in out
    bound_rows = [line for line in out.splitlines() if line.startswith(row) and "/" in line]
    assert bound_rows and bound_rows[0].rstrip(" |").split("|")[-1].strip() != "—"  # its error vs ORT fp32


def _openvino_has_bf16() -> bool:
    from keystep.runtime.backends.openvino import openvino_capabilities

    return "BF16" in (openvino_capabilities() or [])
