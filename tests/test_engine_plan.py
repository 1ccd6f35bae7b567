"""The GPU path's pure logic: optimisation profiles from plans, engine cache keys and rebuild decisions, CUDA-graph
keys, buffer plans and axis sizing -- checked against values computed here from the plan rules and from ONNX
Runtime runs, without TensorRT or a GPU."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from keystep.graphs.trt_build import EngineBuildError, EngineBuildOptions, bundle_axes, build_engines, polygraphy_config
from keystep.runtime.bundle import Bundle
from keystep.runtime.engine_plan import (
    CallShape, EngineIndex, EnginePlanError, EngineTargets, buffer_plan, call_shapes, check_batch, engine_cache_key,
    plan_shape_ranges, profiles_from_calls,
)
from keystep.runtime.plan import StageCall

ENV = ("11.4.0", "Fake GPU 80GB")


def key_step_groups(key_steps, num_steps):
    bounds = list(key_steps) + [num_steps]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def test_profiles_span_the_plans_call_sizes(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    plan = bundle.default_plan
    key_steps = [i for i in range(plan["num_steps"]) if i == 0 or i >= 0.92 * plan["num_steps"] or i % 10 >= 6]
    targets = EngineTargets(plans=("default", "all"), images=(1, 3))
    profiles = profiles_from_calls(targets.call_list(bundle))
    # CFG doubles rows; a batched decoder call covers its whole group
    encoder = {2 * images for images in (1, 3)}
    decoder = {2 * images * size for images in (1, 3) for size in key_step_groups(key_steps, plan["num_steps"])}
    assert set(profiles) == {"encoder", "decoder", "full"}
    assert set(profiles["encoder"].batches) == encoder and set(profiles["full"].batches) == encoder
    assert set(profiles["decoder"].batches) == decoder
    assert profiles["decoder"].min == min(decoder) and profiles["decoder"].max == max(decoder)
    # opt: the batch with the most rows over all calls
    rows = {}
    for images in (1, 3):
        for size in key_step_groups(key_steps, plan["num_steps"]):
            rows[2 * images * size] = rows.get(2 * images * size, 0) + 2 * images * size
    assert profiles["decoder"].opt == max(rows, key=lambda b: (rows[b], b))


def test_profile_shapes_bind_every_input(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    profile = profiles_from_calls([CallShape("decoder", b) for b in (2, 4, 4, 4, 4, 12)])["decoder"]
    assert (profile.min, profile.opt, profile.max) == (2, 4, 12)
    shapes = profile.input_shapes(bundle.stage("decoder"), {})
    hidden = next(io for io in bundle.stage("decoder").inputs if io.name == "hidden")
    assert shapes["hidden"] == tuple((b, *hidden.shape[1:]) for b in (2, 4, 12))
    assert shapes["timestep"] == ((2,), (4,), (12,))


def test_plan_shape_ranges_by_hand(tiny_bundle):
    """Written out for the tiny DiT (8x8x4 latent, patch 2: 16 tokens of 64), CFG, images 1 and 2, the default plan
    (10 steps, DiT rule: key steps 0, 6, 7, 8, 9 -> groups of 6, 1, 1, 1, 1 steps) and the baseline (full stage):
    encoder rows 2/4 (opt 4: 5 calls x 4 rows beat 5 x 2), decoder 2*images*group = 2, 12 | 4, 24 (opt 24: one call
    of 24 rows beats 4 x 4 and 12), full 2/4 (opt 4)."""
    bundle = Bundle.load(tiny_bundle)
    ranges = plan_shape_ranges(bundle, EngineTargets(images=(1, 2)), {})
    assert ranges == {
        "encoder": {"latent": ((2, 4, 8, 8), (4, 4, 8, 8), (4, 4, 8, 8)), "timestep": ((2,), (4,), (4,)),
                    "class_label": ((2,), (4,), (4,))},
        "decoder": {"hidden": ((2, 16, 64), (24, 16, 64), (24, 16, 64)), "timestep": ((2,), (24,), (24,)),
                    "class_label": ((2,), (24,), (24,))},
        "full": {"latent": ((2, 4, 8, 8), (4, 4, 8, 8), (4, 4, 8, 8)), "timestep": ((2,), (4,), (4,)),
                 "class_label": ((2,), (4,), (4,))},
    }


def test_call_shapes_are_the_distinct_calls_in_order():
    calls = [StageCall("encoder", (0,), 2), StageCall("decoder", (0, 1), 4), StageCall("encoder", (2,), 2),
             StageCall("decoder", (2,), 2), StageCall("decoder", (3, 4), 4, "decoder.w1")]
    assert call_shapes(calls) == [CallShape("encoder", 2), CallShape("decoder", 4), CallShape("decoder", 2),
                                  CallShape("decoder.w1", 4)]


def test_engine_cache_key_covers_graph_options_version_and_gpu():
    base = engine_cache_key("a" * 64, {"opt_level": 3, "shapes": {"x": [[1], [2], [4]]}}, *ENV)
    assert base == engine_cache_key("a" * 64, {"shapes": {"x": [[1], [2], [4]]}, "opt_level": 3}, *ENV)
    changed = [
        engine_cache_key("b" * 64, {"opt_level": 3, "shapes": {"x": [[1], [2], [4]]}}, *ENV),
        engine_cache_key("a" * 64, {"opt_level": 4, "shapes": {"x": [[1], [2], [4]]}}, *ENV),
        engine_cache_key("a" * 64, {"opt_level": 3, "shapes": {"x": [[1], [2], [8]]}}, *ENV),
        engine_cache_key("a" * 64, {"opt_level": 3, "shapes": {"x": [[1], [2], [4]]}}, "11.5.0", ENV[1]),
        engine_cache_key("a" * 64, {"opt_level": 3, "shapes": {"x": [[1], [2], [4]]}}, ENV[0], "Other GPU"),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_unet_axes_match_the_encoder_outputs(sd_bundle_dir):
    """Per-level sizes come from shape inference; compare with what ONNX Runtime actually outputs."""
    bundle = Bundle.load(sd_bundle_dir)
    axes = bundle_axes(bundle, {"height": 6, "width": 10})
    encoder = bundle.stage("encoder")
    feeds = {io.name: np.zeros(io.concrete({**axes, "batch": 2}), io.dtype) for io in encoder.inputs}
    session = ort.InferenceSession(str(encoder.path), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for io in encoder.outputs:
        assert io.concrete({**axes, "batch": 2}) == outputs[io.name].shape
    assert axes["height"] == 6 and axes["width"] == 10


def test_buffer_plan_matches_real_call_sizes(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    plan = buffer_plan(bundle, [CallShape("decoder", 6), CallShape("decoder", 6), CallShape("encoder", 2)], {})
    assert [b.call for b in plan] == [CallShape("decoder", 6), CallShape("encoder", 2)]
    spec = bundle.stage("decoder")
    feeds = {io.name: np.zeros(io.concrete(6), io.dtype) for io in spec.inputs}
    outputs = ort.InferenceSession(str(spec.path), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert plan[0].bytes == sum(a.nbytes for a in feeds.values()) + sum(o.nbytes for o in outputs)


def test_batch_outside_the_profile_names_the_fix():
    index_entry = type("E", (), {"stage": "decoder", "profile": {"min": 2, "max": 12}})()
    check_batch(index_entry, 12)
    with pytest.raises(EnginePlanError, match=r"2\.\.12.*14 rows.*Rebuild"):
        check_batch(index_entry, 14)


def test_polygraphy_config_carries_the_profile_and_no_precision_flags():
    shapes = {"hidden": ((2, 16, 64), (8, 16, 64), (12, 16, 64)), "timestep": ((2,), (8,), (12,))}
    profile, config = polygraphy_config(shapes, EngineBuildOptions(opt_level=4, refit=True, timing_cache="tc.bin"))
    assert tuple(profile["hidden"].min) == (2, 16, 64) and tuple(profile["hidden"].opt) == (8, 16, 64)
    assert tuple(profile["timestep"].max) == (12,)
    assert config.builder_optimization_level == 4 and config.refittable
    assert not config.fp16 and not config.bf16  # TensorRT 11: precision lives in the graph


class CountingCompiler:
    def __init__(self):
        self.built = []

    def __call__(self, onnx_path, shapes, options):
        self.built.append(onnx_path.name)
        return onnx_path.read_bytes()


def copy_bundle(src, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    return dst


def test_engines_rebuild_only_when_their_inputs_change(tiny_bundle, tmp_path):
    root = copy_bundle(tiny_bundle, tmp_path)
    compiler = CountingCompiler()
    index = build_engines(root, EngineTargets(), environment=ENV, compile_engine=compiler, progress=lambda m: None)
    assert sorted(compiler.built) == ["decoder.onnx", "encoder.onnx", "full.onnx"]
    assert EngineIndex.load(root).engines.keys() == index.engines.keys()
    compiler.built.clear()
    build_engines(root, EngineTargets(), environment=ENV, compile_engine=compiler, progress=lambda m: None)
    assert compiler.built == []  # unchanged: all cached
    # more images: bigger batches, so every profile (and key) changes
    build_engines(root, EngineTargets(plans=("default", "all"), images=(1, 2)), environment=ENV,
                  compile_engine=compiler, progress=lambda m: None)
    assert sorted(compiler.built) == ["decoder.onnx", "encoder.onnx", "full.onnx"]
    compiler.built.clear()
    build_engines(root, EngineTargets(plans=("default", "all"), images=(1, 2)), environment=(ENV[0], "Other GPU"),
                  compile_engine=compiler, progress=lambda m: None)
    assert len(compiler.built) == 3  # another GPU: every engine
    compiler.built.clear()
    index = build_engines(root, EngineTargets(plans=("all",), images=(1, 2)), environment=(ENV[0], "Other GPU"),
                          compile_engine=compiler, progress=lambda m: None)
    assert compiler.built == [] and set(index.engines) == {"full"}  # the baseline's engine was already built
    files = sorted(p.name for p in (root / "engines").glob("*.plan"))
    assert files == [index.engines["full"].file]  # engines no index entry names are removed
    data = json.loads((root / "engines" / "index.json").read_text())
    assert data["gpu"] == "Other GPU" and data["engines"]["full"]["profile"]["max"] == 4


def test_engine_build_without_tensorrt_fails_clearly(tiny_bundle, tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    root = copy_bundle(tiny_bundle, tmp_path)
    with pytest.raises(EngineBuildError, match="tensorrt package"):
        build_engines(root, EngineTargets(), progress=lambda m: None)
    assert not (root / "engines").exists()


def test_cli_engine_commands_without_tensorrt_fail_before_any_work(tiny_bundle, tmp_path, capsys):
    from keystep.tools.cli import main

    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    root = copy_bundle(tiny_bundle, tmp_path)
    assert main(["engines", str(root)]) == 2
    assert "tensorrt package" in capsys.readouterr().err and not (root / "engines").exists()
    out = tmp_path / "new"
    assert main(["build", "random:dit-tiny", "--out", str(out), "--backend", "tensorrt"]) == 2
    assert "tensorrt package" in capsys.readouterr().err and not out.exists()
    assert main(["generate", str(root), "--backend", "tensorrt"]) == 2
    assert "tensorrt" in capsys.readouterr().err
