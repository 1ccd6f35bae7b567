"""The benchmark tool runs end to end (tiny model, few steps) and its numbers are consistent."""

from keystep.tools.bench_common import to_markdown
from keystep.tools.bench_dit import run


def test_bench_dit_smoke():
    result = run("dit-tiny", steps=4, repeats=1)
    assert set(result["median"]) == {"diffusers eager", "baseline", "key-step", "key-step, sequential"}
    assert all(t > 0 for t in result["median"].values())
    # same weights, same z_T, same scheduler: the ONNX baseline reproduces the diffusers loop
    assert result["max_abs_diff_baseline_vs_eager"] < 1e-3
    assert result["flops"]["key-step"] < result["flops"]["baseline"]
    assert "| baseline |" in to_markdown(result, "cmd", "tiny")
