"""``--backend auto`` (the default): the choice logic on faked CPUs, and a real run on this machine against fp32.
OpenVINO's static-shape compiles (one per distinct input shapes) against ONNX Runtime."""

import numpy as np
import pytest

from keystep.runtime.backends.auto import choose_cpu_backend, cpu_flags
from keystep.runtime.backends.base import BackendError, get_backend
from keystep.runtime.bundle import Bundle

ZEN4 = {"avx512f", "avx512_bf16", "avx512_vnni"}
SAPPHIRE_RAPIDS = {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}
ZEN3 = {"avx2", "fma"}
SKYLAKE_X = {"avx512f", "avx512bw"}  # OpenVINO may still list BF16 here (emulated): not native
OV_BF16 = ["BF16", "WINOGRAD", "FP32", "INT8", "BIN", "EXPORT_IMPORT"]
OV_FP32 = ["FP32", "INT8", "BIN", "EXPORT_IMPORT"]


@pytest.mark.parametrize("flags, native", [(ZEN4, "avx512_bf16"), (SAPPHIRE_RAPIDS, "amx_bf16")])
def test_native_bf16_picks_openvino_bf16(flags, native):
    choice = choose_cpu_backend(flags, OV_BF16)
    assert (choice.backend, choice.precision) == ("openvino", "bf16")
    assert native in choice.reason


@pytest.mark.parametrize("flags, capabilities", [(ZEN3, OV_FP32), (SKYLAKE_X, OV_BF16), (ZEN4, OV_FP32)])
def test_no_native_bf16_picks_fp32(flags, capabilities):
    """bf16 only where the CPU computes it natively *and* OpenVINO can use it; else OpenVINO f32."""
    choice = choose_cpu_backend(flags, capabilities)
    assert (choice.backend, choice.precision) == ("openvino", "f32")


def test_without_openvino_falls_back_to_onnxruntime():
    choice = choose_cpu_backend(ZEN4, None)
    assert (choice.backend, choice.precision) == ("onnxruntime", None)
    assert "not installed" in choice.reason and "avx512_bf16" in choice.reason
    assert choose_cpu_backend(ZEN3, None).backend == "onnxruntime"


def test_asked_precision_wins():
    assert choose_cpu_backend(ZEN4, OV_BF16, precision="f32").precision == "f32"
    assert choose_cpu_backend(ZEN3, OV_FP32, precision="bf16").precision == "bf16"  # the backend then refuses


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert cpu_flags(info) == {"fpu", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_auto_backend_and_default(monkeypatch):
    """get_backend("auto") builds the chosen backend and says why; no name means $KEYSTEP_BACKEND, else auto."""
    pytest.importorskip("openvino", reason="openvino is part of the dev extra")
    import keystep.runtime.backends.auto as auto
    from keystep.runtime.pipeline import make_backend

    monkeypatch.setattr(auto, "cpu_flags", lambda: set(ZEN3))
    backend = get_backend("auto")
    assert (backend.name, backend.precision) == ("openvino", "f32")
    assert "no native bf16" in backend.choice.reason
    import keystep.runtime.backends.openvino as ov

    monkeypatch.setattr(ov, "openvino_capabilities", lambda: None)
    assert get_backend("auto").name == "onnxruntime"
    monkeypatch.setenv("KEYSTEP_BACKEND", "onnxruntime")
    assert make_backend().name == "onnxruntime"
    monkeypatch.delenv("KEYSTEP_BACKEND")
    assert make_backend().choice is not None  # auto
    with pytest.raises(BackendError, match="precision applies to the openvino backend"):
        make_backend("onnxruntime", precision="bf16")


def test_auto_on_this_machine_matches_fp32(digits_bundle, tmp_path):
    """The real thing: `keystep generate --backend auto` against ONNX Runtime fp32, same seed. bf16 (where this CPU
    has it natively) keeps 8 mantissa bits: over 50 DDIM steps of the trained digits-dit its final latents (pixels in
    [-1, 1]) stay within 0.15 of fp32 and 30 dB PSNR; an fp32 choice must agree to 1e-4."""
    from keystep.runtime.backends.auto import auto_choice
    from keystep.tools.cli import main

    choice = auto_choice()
    latents = {}
    for backend in ("auto", "onnxruntime"):
        out = tmp_path / f"{backend}.npy"
        assert main(["generate", str(digits_bundle), "--class", "3", "7", "--seed", "0", "--backend", backend,
                     "--key-steps", "all", "--save-latents", str(out), "--out", str(tmp_path / f"{backend}.png")]) == 0
        latents[backend] = np.load(out)
    diff = latents["auto"] - latents["onnxruntime"]
    if choice.precision == "bf16":
        psnr = 20 * np.log10(np.ptp(latents["onnxruntime"]) / np.sqrt(np.mean(diff ** 2)))
        assert np.abs(diff).max() < 0.15 and psnr > 30, (np.abs(diff).max(), psnr)
        assert np.abs(diff).max() > 0  # bf16 really ran (an fp32 run would agree to ~1e-6)
    else:
        assert np.abs(diff).max() < 1e-4


def test_openvino_static_shapes_compile_per_shape(tiny_bundle):
    """A static-shape OpenVINO runner compiles each distinct call shape once, and computes what ONNX Runtime and the
    dynamic compile compute. Defaults (measured, docs/benchmarks.md): static under bf16, dynamic under f32."""
    pytest.importorskip("openvino", reason="openvino is part of the dev extra")
    from test_backends import feeds_for

    spec = Bundle.load(tiny_bundle).stage("decoder")
    static = get_backend("openvino", static_shapes=True).load(spec)
    dynamic = get_backend("openvino").load(spec)  # f32's default: dynamic
    reference = get_backend("onnxruntime").load(spec)
    for batch in (2, 6, 2):
        feeds = feeds_for(spec, batch, seed=batch)
        want = reference.run(feeds)
        for runner in (static, dynamic):
            got = runner.run(feeds)
            for name, value in want.items():
                np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-4)
    assert len(static.compiled_shapes) == 2 and dynamic.compiled_shapes == [None]
    assert get_backend("openvino").static_shapes is False
    from keystep.runtime.backends.openvino import openvino_capabilities

    if "BF16" in openvino_capabilities():
        assert get_backend("openvino", precision="bf16").static_shapes is True


def test_profile_reports_bf16_error_vs_fp32(tiny_bundle):
    """`keystep profile` on OpenVINO bf16 reports each plan's final latents against fp32; the figure must be the one
    an independent fp32 run (ONNX Runtime) gives for the same seed."""
    pytest.importorskip("openvino", reason="openvino is part of the dev extra")
    from keystep.runtime.backends.openvino import openvino_capabilities
    from keystep.runtime.dit_sampler import DiTSampler
    from keystep.runtime.sampler import SamplingOptions
    from keystep.tools.cli.profile import format_table, profile_bundle

    if "BF16" not in openvino_capabilities():
        pytest.skip("OpenVINO has no bf16 on this CPU: nothing to measure")
    bundle = Bundle.load(tiny_bundle)
    options = SamplingOptions.from_bundle(bundle, num_steps=6)
    bf16 = get_backend("openvino", precision="bf16")
    d = profile_bundle(bundle, bf16, options, plans=["0,3"], warmup=0, repeats=1, peak_size=128)
    error = d["precision_error"]
    assert error["reference"].startswith("openvino f32") and set(error["plans"]) == {p["name"] for p in d["plans"]}
    for name, spec in (("all", "all"), ("0,3", "0,3")):
        run = options.with_plan(spec)
        mine = DiTSampler(bundle, get_backend("openvino", precision="bf16")).sample([0], run, seed=0).latents
        fp32 = DiTSampler(bundle, get_backend("onnxruntime")).sample([0], run, seed=0).latents
        rel_l2 = np.linalg.norm(mine - fp32) / np.linalg.norm(fp32)
        reported = next(v for k, v in error["plans"].items() if k.startswith(name))["rel_l2"]
        assert 0 < rel_l2 < 0.5 and reported == pytest.approx(rel_l2, rel=0.05, abs=1e-4), (name, reported, rel_l2)
    assert "bf16 error vs openvino f32" in format_table(d)
    fp32_profile = profile_bundle(bundle, get_backend("onnxruntime"), options, plans=["0,3"], warmup=0, repeats=1,
                                  peak_size=128)
    assert fp32_profile["precision_error"] is None  # nothing to report at fp32
