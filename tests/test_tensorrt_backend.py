"""The TensorRT backend's control flow without a GPU, on the fakes of ``fake_tensorrt`` (TensorRT's builder, runtime
and an asynchronous CUDA stream, refusing what the real ones refuse). A sampling run through the backend must equal
the ONNX Runtime CPU backend; the fakes count what was allocated, bound, captured, replayed and freed. The real thing
runs under ``-m gpu`` (and ``python -m keystep.tools.bench.gpu_check``)."""

import dataclasses
import shutil
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from fake_tensorrt import ENV, DataType, FakeCuda, FakeCudart, FakeTensorRT, fake_compile
from keystep.graphs.trt_build import EngineBuildOptions, build_engines
from keystep.runtime.backends.base import BackendError, get_backend
from keystep.runtime.backends.cuda import Cuda
from keystep.runtime.backends.tensorrt import TensorRTBackend, numpy_dtype
from keystep.runtime.bundle import Bundle, IOSpec, StageSpec, sha256_file
from keystep.runtime.dit_sampler import DiTSampler
from keystep.runtime.engine_plan import ENGINE_DIR, EngineEntry, EngineIndex, EngineTargets, call_shapes
from keystep.runtime.sampler import SamplingOptions


@pytest.fixture()
def engine_bundle(tiny_bundle, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    build_engines(root, EngineTargets(plans=("default", "all"), images=(1, 2)), environment=ENV,
                  compile_engine=fake_compile, progress=lambda m: None)
    return root


def fake_backend(cuda, cuda_graphs=True, trt=None):
    trt = trt or FakeTensorRT(cuda)
    backend = TensorRTBackend(cuda_graphs=cuda_graphs, trt=trt, cuda=cuda)
    return backend, trt


def sample(bundle, backend, plan="default", labels=(1, 3), runs=1):
    sampler = DiTSampler(bundle, backend)
    options = SamplingOptions.from_bundle(bundle, parallel=True)
    options = options if plan == "default" else options.with_plan(plan)
    out = []
    for _ in range(runs):
        out.append(sampler.sample(list(labels), options, seed=5))
    return out


def test_sampling_through_the_engines_equals_onnxruntime(engine_bundle):
    bundle = Bundle.load(engine_bundle)
    cuda = FakeCuda()
    backend, trt = fake_backend(cuda)
    results = sample(bundle, backend, runs=3)
    reference = sample(bundle, get_backend("onnxruntime"))[0]
    for result in results:  # warm-up run, capture run, replay run: all the same numbers
        np.testing.assert_allclose(result.latents, reference.latents, rtol=1e-5, atol=1e-5)
    distinct = call_shapes(reference.prepared.calls)
    stats = backend.stats()
    assert stats["call_shapes"] == len(distinct) and stats["cuda_graphs"] == len(distinct)
    assert cuda.captures == len(distinct)  # one capture per distinct call, never again
    # each shape's first call is its warm-up; every later call (in any run) launches the graph
    assert cuda.launches == 3 * len(reference.prepared.calls) - len(distinct)
    # one context per call shape, all on one shared activation allocation sized for the largest engine
    contexts = [c for e in trt.engines for c in e.contexts]
    assert len(contexts) == len(distinct)
    assert len({c.device_memory for c in contexts}) == 1
    assert contexts[0].device_memory[1] == max(e.device_memory_size_v2 for e in trt.engines)
    assert stats["io_buffer_bytes"] > 0 and stats["graph_fallbacks"] == []
    assert cuda.pending == []  # every run synchronised before handing its outputs back


def test_without_cuda_graphs_every_call_is_enqueued(engine_bundle):
    bundle = Bundle.load(engine_bundle)
    cuda = FakeCuda()
    backend, _ = fake_backend(cuda, cuda_graphs=False)
    results = sample(bundle, backend, runs=2)
    np.testing.assert_allclose(results[0].latents, results[1].latents)
    assert cuda.captures == 0 and cuda.launches == 0 and backend.stats()["cuda_graphs"] == 0


def test_a_failed_capture_falls_back_and_says_so_once(engine_bundle):
    bundle = Bundle.load(engine_bundle)
    cuda = FakeCuda(fail_capture_for={"decoder"})
    backend, _ = fake_backend(cuda)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = sample(bundle, backend, runs=3)
    messages = [str(w.message) for w in caught if "CUDA graph capture failed" in str(w.message)]
    assert len(messages) == 1
    reference = sample(bundle, get_backend("onnxruntime"))[0]
    for result in results:
        np.testing.assert_allclose(result.latents, reference.latents, rtol=1e-5, atol=1e-5)
    stats = backend.stats()
    distinct = call_shapes(reference.prepared.calls)
    assert sorted(stats["graph_fallbacks"]) == sorted(f"decoder@{c.batch}" for c in distinct if c.runner == "decoder")
    assert stats["cuda_graphs"] == sum(1 for c in distinct if c.runner != "decoder") == cuda.captures


def test_the_fake_refuses_capture_before_a_plain_enqueue(engine_bundle):
    """What makes the backend's warm-up run necessary: TensorRT initialises lazily in a context's first enqueue."""
    cuda = FakeCuda()
    backend, trt = fake_backend(cuda)
    runner = backend.load(Bundle.load(engine_bundle).stage("full"))
    runner._backend.cuda_graphs = False
    feeds = {"latent": np.zeros((2, 4, 8, 8), np.float32), "timestep": np.zeros(2, np.float32),
             "class_label": np.zeros(2, np.int64)}
    runner.run(feeds)  # allocates the slot (and warms its context up)
    context = trt.engine("full").contexts[0]
    fresh = trt.engine("full").create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    fresh.__dict__.update(shapes=context.shapes, addresses=context.addresses, device_memory=context.device_memory)
    cuda.begin_capture()
    assert fresh.execute_async_v3(cuda.stream_handle)
    with pytest.raises(BackendError, match="no plain enqueue before"):
        cuda.end_capture()


def test_calls_outside_the_built_profiles_and_stale_engines_fail_clearly(engine_bundle):
    bundle = Bundle.load(engine_bundle)
    backend, _ = fake_backend(FakeCuda())
    with pytest.raises(BackendError, match=r"takes batches 2\.\.4.*6 rows"):
        sample(bundle, backend, plan="all", labels=(1, 2, 3))
    other = FakeCuda()
    other.device_name = "Another GPU"
    with pytest.raises(BackendError, match="rebuild"):
        sample(bundle, fake_backend(other)[0])
    engine = next((engine_bundle / "engines").glob("decoder.*.plan"))
    engine.write_bytes(engine.read_bytes()[:-10])
    with pytest.raises(BackendError, match="corrupt or replaced"):
        sample(bundle, fake_backend(FakeCuda())[0])


def test_a_bundle_without_engines_names_the_command(tiny_bundle):
    with pytest.raises(BackendError, match="keystep engines"):
        sample(Bundle.load(tiny_bundle), fake_backend(FakeCuda())[0])


def test_tensorrt_backend_without_tensorrt_fails_clearly():
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(BackendError, match="tensorrt"):
        get_backend("tensorrt")


def test_build_options_and_profiles_reach_the_builder(tiny_bundle, tmp_path):
    """The fake builder asserts a profile per graph input with the graph's ranks and static dims; here the options
    and the batch ranges, derived by hand: key steps 0,3,4,9 of 10 make groups of 3, 1, 5 and 1 steps, so with CFG at
    1 and 2 images the decoder runs 2..20 rows (opt: the 5-step group at 2 images, the most rows) and the baseline's
    full stage 2..4 rows."""
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    options = EngineBuildOptions(opt_level=5, tf32=True, refit=True, timing_cache=str(tmp_path / "tc.bin"))
    build_engines(root, EngineTargets(plans=("0,3,4,9", "all"), images=(1, 2)), options, environment=ENV,
                  compile_engine=fake_compile, progress=lambda m: None)
    backend, trt = fake_backend(FakeCuda())
    sample(Bundle.load(root), backend, plan="0,3,4,9", labels=(1, 3))
    for engine in trt.engines:
        assert engine.build_options == {"opt_level": 5, "tf32": True, "refit": True,
                                        "timing_cache": str(tmp_path / "tc.bin")}
    assert trt.engine("decoder").profile["hidden"] == ((2, 16, 64), (20, 16, 64), (20, 16, 64))
    assert trt.engine("decoder").profile["timestep"] == ((2,), (20,), (20,))
    assert [s[0] for s in trt.engine("encoder").profile["latent"]] == [2, 4, 4]
    assert trt.engine("full").profile["latent"] == ((2, 4, 8, 8), (4, 4, 8, 8), (4, 4, 8, 8))


# --- call slots keyed by the full input shapes (a UNet-like stage with spatial axes) -------------------------------

def spatial_stage(root, aux=True):
    """A stage ``y = 2 * latent + 1`` (and ``aux = latent``) with batch, height and width axes, its fake engine
    built for (1, 4, 8, 8)..(2, 4, 16, 16), and the engine index that lists it."""
    latent = helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["batch", 4, "height", "width"])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, "height", "width"])
    aux = helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["batch", 4, "height", "width"])
    nodes = [helper.make_node("Mul", ["latent", "two"], ["doubled"]),
             helper.make_node("Add", ["doubled", "one"], ["y"]),
             helper.make_node("Identity", ["latent"], ["aux"])]
    inits = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
             helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])]
    outputs = [out, aux] if aux else [out]
    nodes = nodes if aux else nodes[:2]
    model = helper.make_model(helper.make_graph(nodes, "spatial", [latent], outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    root.mkdir()
    path = root / "unet.onnx"
    onnx.save(model, path)
    shapes = {"latent": ((1, 4, 8, 8), (1, 4, 16, 16), (2, 4, 16, 16))}
    (root / ENGINE_DIR).mkdir()
    plan = root / ENGINE_DIR / "unet.plan"
    plan.write_bytes(fake_compile(path, shapes, EngineBuildOptions()))
    profile = {"min": 1, "opt": 1, "max": 2, "shapes": {"latent": [list(s) for s in shapes["latent"]]}}
    index = EngineIndex(*ENV, {}, {})
    index.engines["unet"] = EngineEntry("unet", plan.name, "k", sha256_file(path), profile, {}, sha256_file(plan))
    index.save(root)
    dims = ("batch", 4, "height", "width")
    return StageSpec("unet", path, (IOSpec("latent", "float32", dims),),
                     tuple(IOSpec(o.name, "float32", dims) for o in outputs), None, 0)


def test_same_batch_new_height_and_width_gets_its_own_slot(tmp_path):
    spec = spatial_stage(tmp_path / "spatial", aux=False)
    cuda = FakeCuda()
    backend, trt = fake_backend(cuda)
    runner = backend.load(spec)
    rng = np.random.default_rng(0)
    for shape in [(1, 4, 8, 8), (1, 4, 16, 16), (1, 4, 8, 8), (2, 4, 12, 16), (1, 4, 16, 16)]:
        latent = rng.standard_normal(shape).astype(np.float32)
        got = runner.run({"latent": latent})
        np.testing.assert_allclose(got["y"], 2 * latent + 1, rtol=1e-6)
    assert len(runner.slots) == 3 and len(trt.engine("unet").contexts) == 3
    assert {c.shapes["latent"] for c in trt.engine("unet").contexts} == {(1, 4, 8, 8), (1, 4, 16, 16), (2, 4, 12, 16)}
    # outside the engine's profile: TensorRT's set_input_shape says no, the message names the profile
    with pytest.raises(BackendError, match=r"rejected input 'latent' shape \(1, 4, 24, 24\).*min/opt/max"):
        runner.run({"latent": np.zeros((1, 4, 24, 24), np.float32)})
    assert len(runner.slots) == 3  # the refused slot's buffers were not kept


def test_every_engine_output_is_bound_and_the_bundle_outputs_returned(tmp_path):
    """The engine's I/O comes from the engine (num_io_tensors): an output the stage does not list is still bound."""
    spec = spatial_stage(tmp_path / "spatial")
    runner = fake_backend(FakeCuda())[0].load(dataclasses.replace(spec, outputs=spec.outputs[:1]))
    latent = np.ones((1, 4, 8, 8), np.float32)
    assert set(runner.run({"latent": latent})) == {"y"}
    wrong = dataclasses.replace(spec, inputs=(IOSpec("sample", "float32", spec.inputs[0].shape),))
    with pytest.raises(BackendError, match=r"inputs \['latent'\] are not the bundle's \['sample'\]"):
        fake_backend(FakeCuda())[0].load(wrong)


@pytest.mark.parametrize("dtype,message", [(DataType.BF16, "'y' is bfloat16 in the engine but float32 in the bundle"),
                                           (DataType.FP8, "'y' has TensorRT type DataType.FP8, which has no numpy"),
                                           (DataType.HALF, "'y' is float16 in the engine but float32")])
def test_engine_dtypes_are_checked_before_any_context(tmp_path, dtype, message):
    spec = spatial_stage(tmp_path / "spatial")
    cuda = FakeCuda()
    trt = FakeTensorRT(cuda)
    trt.dtype_overrides = {"unet": {"y": dtype}}
    backend, _ = fake_backend(cuda, trt=trt)
    with pytest.raises(BackendError, match=message):
        backend.load(spec).run({"latent": np.zeros((1, 4, 8, 8), np.float32)})
    assert trt.engine("unet").contexts == []


def test_numpy_dtype_maps_bf16_through_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert numpy_dtype(FakeTensorRT, DataType.BF16, "s", "t") == np.dtype(ml_dtypes.bfloat16)
    assert numpy_dtype(FakeTensorRT, DataType.HALF, "s", "t") == np.float16


def test_out_of_memory_and_refused_addresses_fail_clearly(tmp_path):
    spec = spatial_stage(tmp_path / "spatial")
    latent = np.zeros((1, 4, 8, 8), np.float32)
    cuda = FakeCuda()
    trt = FakeTensorRT(cuda)
    trt.contexts_left = 0
    with pytest.raises(BackendError, match="could not create an execution context for stage 'unet'"):
        fake_backend(cuda, trt=trt)[0].load(spec).run({"latent": latent})

    class Misaligned(FakeCuda):  # pointers 8 bytes into their allocation: TensorRT wants 256-byte alignment
        def malloc(self, nbytes):
            return super().malloc(nbytes + 8) + 8

        def free(self, ptr):
            super().free(ptr - 8)

    with pytest.raises(BackendError, match="refused the device address of 'latent'"):
        fake_backend(Misaligned())[0].load(spec).run({"latent": latent})


def test_close_frees_every_allocation_graph_and_the_stream(engine_bundle, tmp_path):
    bundle = Bundle.load(engine_bundle)
    cuda = FakeCuda()
    with fake_backend(cuda)[0] as backend:
        sample(bundle, backend, runs=2)
        spatial = backend.load(spatial_stage(tmp_path / "spatial"))
        spatial.run({"latent": np.zeros((1, 4, 8, 8), np.float32)})
        assert cuda.memory and cuda.captures
    assert cuda.memory == {}  # every buffer and the shared activation memory freed (double frees would assert)
    assert sorted(cuda.destroyed_graphs) == list(range(cuda.captures)) and cuda.closed
    backend.close()  # idempotent
    with pytest.raises(BackendError, match="closed"):
        sample(bundle, backend)


# --- the CUDA wrapper on a fake cudart ------------------------------------------------------------------------------

def test_cuda_reports_an_old_driver_not_a_missing_device():
    old_driver = FakeCudart(count_error=35, driver=12080, runtime=13000)
    with pytest.raises(BackendError, match=r"driver supports CUDA 12\.8 but cuda-python is built for CUDA 13\.0.*"
                                           r"cuda-python>=\d+,<\d+"):
        Cuda(cudart=old_driver)
    with pytest.raises(BackendError, match="none was found"):
        Cuda(cudart=FakeCudart(count_error=100))
    with pytest.raises(BackendError, match="no NVIDIA driver"):
        Cuda(cudart=FakeCudart(count_error=35, driver=0))
    with pytest.raises(BackendError, match="device 1 requested, 1 present"):
        Cuda(1, cudart=FakeCudart())


def test_cuda_close_frees_what_is_left_and_the_stream():
    rt = FakeCudart()
    cuda = Cuda(cudart=rt)
    assert cuda.device_name == "Fake GPU 80GB"
    a, b = cuda.malloc(100), cuda.malloc(0)
    cuda.free(a)
    cuda.free(a)  # freed once only
    cuda.destroy_graph("exec")
    cuda.close()
    cuda.close()
    assert rt.freed == [a, b] and rt.allocated == set()
    assert rt.destroyed == [("graph", "exec"), ("stream", 99)]


# --- profile, gpu_check, width bundles ------------------------------------------------------------------------------

def test_profile_reports_graphs_and_device_memory(engine_bundle):
    from keystep.tools.cli.profile import format_table, profile_bundle

    bundle = Bundle.load(engine_bundle)
    backend, _ = fake_backend(FakeCuda())
    report = profile_bundle(bundle, backend, plans=["all", "default"], warmup=1, repeats=1, class_labels=[1],
                            peak_size=64)
    calls = set()
    for spec in ("all", "default"):
        calls |= set(call_shapes(sample(bundle, get_backend("onnxruntime"), spec, labels=(1,))[0].prepared.calls))
    assert report["gpu"]["cuda_graphs"] == report["gpu"]["call_shapes"] == len(calls)
    assert report["gpu"]["shared_activation_bytes"] > 0
    assert f"cuda graphs {len(calls)}" in format_table(report)


def scaled_output_compile(stage, factor):
    """A builder that miscompiles one stage: its first output comes out multiplied by ``factor``."""
    def compile_engine(onnx_path, shapes, options):
        if onnx_path.stem != stage:
            return fake_compile(onnx_path, shapes, options)
        model = onnx.load(str(onnx_path))
        out = model.graph.output[0]
        for node in model.graph.node:
            node.output[:] = [f"{o}_exact" if o == out.name else o for o in node.output]
        model.graph.initializer.append(helper.make_tensor("wrong_factor", TensorProto.FLOAT, [], [factor]))
        model.graph.node.append(helper.make_node("Mul", [f"{out.name}_exact", "wrong_factor"], [out.name]))
        wrong = onnx_path.with_name(f"{stage}.onnx")
        onnx.save(model, wrong)
        return fake_compile(wrong, shapes, options)
    return compile_engine


def test_gpu_check_logic_on_the_fake_engines(engine_bundle, tmp_path):
    from keystep.tools.bench.gpu_check import check_engines, format_report, time_plans

    bundle = Bundle.load(engine_bundle)
    backend, _ = fake_backend(FakeCuda())
    engines = check_engines(bundle, backend)
    index_profiles = {s: (e.profile["min"], e.profile["opt"], e.profile["max"])
                      for s, e in EngineIndex.load(engine_bundle).engines.items()}
    assert {(r["stage"], r["batch"]) for r in engines} == {(s, b) for s, p in index_profiles.items() for b in p}
    assert all(r["ok"] and r["rel_l2"] < 1e-6 for r in engines)
    timings = time_plans(bundle, {"onnxruntime CPU": get_backend("onnxruntime"), "tensorrt": backend},
                         ("default", "all"), repeats=1)
    assert [(r["plan"], r["backend"]) for r in timings] == [
        ("default", "onnxruntime CPU"), ("all", "onnxruntime CPU"), ("default", "tensorrt"), ("all", "tensorrt")]
    assert all(r["latent_rel_l2"] < 1e-5 for r in timings)
    assert "tensorrt" in format_report("tiny", engines, timings)

    # negative control: a decoder engine 1 % off must be reported, and only it
    wrong = tmp_path / "wrong"
    shutil.copytree(engine_bundle, wrong, ignore=shutil.ignore_patterns("engines"))
    build_engines(wrong, EngineTargets(plans=("default", "all"), images=(1, 2)), environment=ENV,
                  compile_engine=scaled_output_compile("decoder", 1.01), progress=lambda m: None)
    rows = check_engines(Bundle.load(wrong), fake_backend(FakeCuda())[0])
    assert {r["stage"] for r in rows if not r["ok"]} == {"decoder"}
    assert all(abs(r["rel_l2"] - 0.01) < 1e-4 for r in rows if r["stage"] == "decoder")
    assert " NO" in format_report("tiny", rows, timings)


def test_gpu_check_without_a_gpu_exits_2(capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from keystep.tools.bench.gpu_check import main

    assert main([]) == 2
    assert "tensorrt package" in capsys.readouterr().err


def data_dependent_stages(root):
    """Stages whose graph sizes a tensor by counting values (TensorRT must synchronise: no CUDA graph)."""
    bundle = Bundle.load(root)
    return {name for name, spec in bundle.stages.items()
            if {n.op_type for n in onnx.load(str(spec.path)).graph.node} & {"NonZero", "Compress", "Unique"}}


def test_width_bundles_get_one_engine_per_profile_and_run_through_them(dydit_bundle, tmp_path):
    root = tmp_path / "width"
    shutil.copytree(dydit_bundle, root)
    index = build_engines(root, EngineTargets(plans=("default",), images=(1,)), environment=ENV,
                          compile_engine=fake_compile, progress=lambda m: None)
    bundle = Bundle.load(root)
    reference = sample(bundle, get_backend("onnxruntime"), labels=(2,))[0]
    used = {c.runner for c in reference.prepared.calls}
    assert set(index.engines) == used and len(used) > 2  # every width profile the plan uses, nothing else
    cuda = FakeCuda()
    backend, _ = fake_backend(cuda)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        results = sample(bundle, backend, labels=(2,), runs=2)
    for result in results:
        np.testing.assert_allclose(result.latents, reference.latents, rtol=1e-5, atol=1e-5)
    # token gathering (NonZero -> Gather) has data-dependent shapes: those engines run without graphs
    gathering = data_dependent_stages(root) & used
    distinct = call_shapes(reference.prepared.calls)
    assert gathering, "the gather bundle has no data-dependent engine: this test checks nothing"
    stats = backend.stats()
    assert sorted(stats["graph_fallbacks"]) == sorted(f"{c.runner}@{c.batch}" for c in distinct
                                                      if c.runner in gathering)
    assert stats["cuda_graphs"] == cuda.captures == sum(c.runner not in gathering for c in distinct)
