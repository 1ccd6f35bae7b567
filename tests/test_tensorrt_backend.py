"""The TensorRT backend's control flow without a GPU: TensorRT and the CUDA runtime are replaced by fakes whose
"engines" run the (cleaned) stage graph with ONNX Runtime on "device memory" that is a dict of numpy buffers, and
whose CUDA graphs record enqueues at capture and run them at replay -- reading the buffers then, as a real graph
does. A sampling run through the backend must equal the ONNX Runtime CPU backend; the fakes count what was
allocated, bound, captured and replayed. The real thing runs under ``-m gpu`` (and ``python -m
keystep.tools.bench.gpu_check``)."""

import shutil
import warnings

import numpy as np
import onnxruntime as ort
import pytest

from keystep.graphs.trt_build import build_engines
from keystep.runtime.backends.base import BackendError, get_backend
from keystep.runtime.backends.tensorrt import TensorRTBackend
from keystep.runtime.bundle import Bundle
from keystep.runtime.dit_sampler import DiTSampler
from keystep.runtime.engine_plan import EngineIndex, EngineTargets, call_shapes
from keystep.runtime.sampler import SamplingOptions

ENV = ("11.4.0", "Fake GPU 80GB")


class FakeCuda:
    device_name = ENV[1]
    stream_handle = 7

    def __init__(self, fail_capture_for=()):
        self.memory: dict[int, np.ndarray] = {}
        self.next_ptr = 4096
        self.capturing: list | None = None
        self.fail_capture_for = set(fail_capture_for)
        self.captures = 0
        self.launches = 0

    def malloc(self, nbytes):
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + max(nbytes, 1) + 256
        self.memory[ptr] = np.zeros(max(nbytes, 1), np.uint8)
        return ptr

    def copy_to_device(self, ptr, array):
        raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        self.memory[ptr][: raw.size] = raw

    def copy_to_host(self, array, ptr):
        array.reshape(-1).view(np.uint8)[:] = self.memory[ptr][: array.nbytes]

    def synchronize(self):
        pass

    def begin_capture(self):
        self.capturing = []

    def end_capture(self):
        recorded, self.capturing = self.capturing, None
        if any(stage in self.fail_capture_for for stage, _ in recorded):
            raise BackendError("operation not permitted when stream is capturing")
        self.captures += 1
        return recorded

    def abort_capture(self):
        self.capturing = None

    def launch(self, graph):
        self.launches += 1
        for _, run in graph:
            run()

    def enqueue(self, stage, run):
        if self.capturing is not None:
            self.capturing.append((stage, run))
        else:
            run()


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.device_memory = engine, {}, {}, None

    def set_device_memory(self, ptr, size):
        self.device_memory = (ptr, size)

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def get_tensor_shape(self, name):
        return self.engine.output_shapes(self.shapes)[name]

    def execute_async_v3(self, stream):
        assert stream == FakeCuda.stream_handle
        self.engine.cuda.enqueue(self.engine.stage, self._run)
        return True

    def _run(self):
        cuda, session = self.engine.cuda, self.engine.session
        feeds = {}
        for i in session.get_inputs():
            dtype = np.int64 if "int64" in i.type else np.float32
            n = int(np.prod(self.shapes[i.name]))
            feeds[i.name] = cuda.memory[self.addresses[i.name]][: n * np.dtype(dtype).itemsize].view(dtype).reshape(
                self.shapes[i.name]).copy()
        for o, value in zip(session.get_outputs(), session.run(None, feeds)):
            cuda.copy_to_device(self.addresses[o.name], value)


class FakeEngine:
    def __init__(self, onnx_bytes, cuda):
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self.cuda = cuda
        self.device_memory_size_v2 = 1000 + len(onnx_bytes) % 997
        self.contexts = []

    @property
    def stage(self):
        """Which of the tiny DiT's stages this is, told by its I/O (the fake runtime only sees bytes)."""
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        return "decoder" if "hidden" in inputs else "encoder" if "hidden" in outputs else "full"

    def output_shapes(self, input_shapes):
        feeds = {i.name: np.zeros(input_shapes[i.name], np.int64 if "int64" in i.type else np.float32)
                 for i in self.session.get_inputs()}
        return {o.name: v.shape for o, v in zip(self.session.get_outputs(), self.session.run(None, feeds))}

    def create_execution_context(self, strategy):
        assert strategy == "USER_MANAGED"
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]

    def get_tensor_dtype(self, name):
        return next("float32" if "float" in o.type else "int64" for o in self.session.get_outputs() if o.name == name)


class FakeTensorRT:
    __version__ = ENV[0]

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class ExecutionContextAllocationStrategy:
        USER_MANAGED = "USER_MANAGED"

    def __init__(self, cuda):
        self.cuda, self.engines = cuda, []
        fake = self

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                fake.engines.append(FakeEngine(data, fake.cuda))
                return fake.engines[-1]

        self.Runtime = Runtime

    @staticmethod
    def nptype(dtype):
        return np.dtype(dtype)


def compile_to_onnx_bytes(onnx_path, shapes, options):
    """The fake builder's "engine" is the cleaned graph itself: the fake runtime runs it with ONNX Runtime."""
    return onnx_path.read_bytes()


@pytest.fixture()
def engine_bundle(tiny_bundle, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    build_engines(root, EngineTargets(plans=("default", "all"), images=(1, 2)), environment=ENV,
                  compile_engine=compile_to_onnx_bytes, progress=lambda m: None)
    return root


def fake_backend(cuda, cuda_graphs=True):
    trt = FakeTensorRT(cuda)
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


def test_gpu_check_logic_on_the_fake_engines(engine_bundle):
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


def test_gpu_check_without_a_gpu_exits_2(capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from keystep.tools.bench.gpu_check import main

    assert main([]) == 2
    assert "tensorrt package" in capsys.readouterr().err


def test_width_bundles_get_one_engine_per_profile_and_run_through_them(dydit_bundle, tmp_path):
    root = tmp_path / "width"
    shutil.copytree(dydit_bundle, root)
    index = build_engines(root, EngineTargets(plans=("default",), images=(1,)), environment=ENV,
                          compile_engine=compile_to_onnx_bytes, progress=lambda m: None)
    bundle = Bundle.load(root)
    reference = sample(bundle, get_backend("onnxruntime"), labels=(2,))[0]
    used = {c.runner for c in reference.prepared.calls}
    assert set(index.engines) == used and len(used) > 2  # every width profile the plan uses, nothing else
    backend, _ = fake_backend(FakeCuda())
    results = sample(bundle, backend, labels=(2,), runs=2)
    for result in results:
        np.testing.assert_allclose(result.latents, reference.latents, rtol=1e-5, atol=1e-5)
