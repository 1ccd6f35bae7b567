"""Serving (issue 15): the Python API, Triton model repositories of three flavours, and a real tritonserver.

The references are independent of the serving code: the CLI's `keystep generate` images (which the API also must
give), diffusers-free plain arithmetic for the plan-derived batch sizes, Triton's own ModelConfig protobuf parser,
and tritonclient against the real `tritonserver` binary (nvidia-pytriton's server 2.51).
"""

import json
import site
import sys
import threading
import types

import numpy as np
import pytest
from PIL import Image

import keystep
from keystep.tools.cli import main


def cli_image(bundle, tmp_path, *args) -> np.ndarray:
    out = tmp_path / f"cli-{abs(hash(args))}.png"
    assert main(["generate", str(bundle), *args, "--out", str(out)]) == 0
    image = np.asarray(Image.open(out))
    return image[..., None] if image.ndim == 2 else image


# --- the Python API -------------------------------------------------------------------------------------------


def test_api_equals_cli_for_dit_and_unet(digits_dit_bundle, sd_bundle_dir, tmp_path):
    pipe = keystep.load(digits_dit_bundle)
    out = pipe(class_labels=[3], seed=4, num_inference_steps=12, key_steps="uniform:3")
    assert out.images[0].size == (16, 16) and out.latents.shape == (1, 1, 16, 16)
    expected = cli_image(digits_dit_bundle, tmp_path, "--class", "3", "--seed", "4", "--steps", "12", "--key-steps",
                         "uniform:3")
    assert np.array_equal(np.asarray(out.images[0])[..., None], expected)
    pipe = keystep.load(sd_bundle_dir)
    out = pipe(prompt="a photo of a cat", negative_prompt="blurry", seed=2, num_inference_steps=4, height=32, width=32,
               output_type="np")
    expected = cli_image(sd_bundle_dir, tmp_path, "--prompt", "a photo of a cat", "--negative-prompt", "blurry",
                         "--seed", "2", "--steps", "4", "--height", "32", "--width", "32")
    assert out.images.shape == (1, 32, 32, 3) and out.images.dtype == np.float32
    assert np.array_equal(np.round(out.images[0] * 255).astype(np.uint8), expected)
    latent = pipe(prompt="a photo of a cat", seed=2, num_inference_steps=4, height=32, width=32, output_type="latent")
    assert latent.images is latent.latents and latent.latents.shape == (1, 4, 4, 4)
    assert set(out.timing) >= {"total_s", "sampling_s", "decode_s"} and out.plan


def test_api_bad_input_raises_keystep_error_naming_the_argument(digits_dit_bundle):
    pipe = keystep.load(digits_dit_bundle)
    cases = [(dict(class_labels=[10]), "class_labels: unknown class 10"),
             (dict(class_labels=[1], num_inference_steps=0), "num_inference_steps: must be at least 1"),
             (dict(class_labels=[1], guidance_scale=float("nan")), "guidance_scale: must be a finite number"),
             (dict(class_labels=[1], seed=-5), "seed: must be in 0.."),
             (dict(class_labels=[1], output_type="jpeg"), "output_type: must be one of pil, np, latent"),
             (dict(prompt="a cat"), "prompt: this is a class-conditional bundle"),
             (dict(class_labels=[True]), "class_labels: class labels are integers")]
    for kwargs, message in cases:
        with pytest.raises(keystep.KeystepError, match=message):
            pipe(**kwargs)
    with pytest.raises(keystep.KeystepError, match="threads: must be in 1..1024"):
        keystep.load(digits_dit_bundle, threads=0)


def test_api_generator_and_seed_give_the_same_noise(digits_dit_bundle):
    pipe = keystep.load(digits_dit_bundle)
    a = pipe(class_labels=[2], seed=9, num_inference_steps=5, output_type="latent").latents
    b = pipe(class_labels=[2], generator=np.random.default_rng(9), num_inference_steps=5, output_type="latent").latents
    assert np.array_equal(a, b)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_one_pipeline_eight_threads_equals_serial(digits_dit_bundle, backend):
    """Eight threads calling one pipeline at once (sessions shared; OpenVINO one request per thread) give exactly
    what serial calls give."""
    pipe = keystep.load(digits_dit_bundle, backend=backend)
    jobs = [dict(class_labels=[c % 10], seed=c, num_inference_steps=8, output_type="latent",
                 key_steps=["all", "uniform:2"][c % 2]) for c in range(16)]
    serial = [pipe(**job).latents for job in jobs]
    results = [None] * len(jobs)
    barrier = threading.Barrier(8)

    def worker(k):
        barrier.wait()
        for i in range(k, len(jobs), 8):
            results[i] = pipe(**jobs[i]).latents

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(np.array_equal(a, b) for a, b in zip(serial, results))


# --- repositories: every config.pbtxt is a Triton ModelConfig -------------------------------------------------


def parse_configs(repo):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    configs = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        configs[path.parent.name] = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return configs


def dit_default_key_steps(n):  # DiT-FasterDiffusion's rule, written out here
    return [i for i in range(n) if i == 0 or i >= 0.92 * n or i % 10 >= 6]


def write_fake_engines(bundle):
    """engines/index.json + engine files as `keystep engines` leaves them (contents are not read here)."""
    from keystep.runtime.engine_plan import EngineEntry, EngineIndex, EngineTargets, profiles_from_calls
    from keystep.runtime.bundle import Bundle

    b = Bundle.load(bundle)
    engines = {}
    for stage, profile in profiles_from_calls(EngineTargets(("default", "all"), (1, 2)).call_list(b)).items():
        name = f"{stage}.0123456789abcdef.plan"
        (bundle / "engines").mkdir(exist_ok=True)
        (bundle / "engines" / name).write_bytes(b"engine")
        engines[stage] = EngineEntry(stage, name, "k" * 64, b.manifest["stages"][stage]["files"][0]["sha256"],
                                     profile.to_dict(), {})
    EngineIndex("11.4.0", "NVIDIA L4", {}, {"plans": ["default", "all"], "images": [1, 2]}, engines).save(bundle)


@pytest.mark.parametrize("flavour", ["python", "onnxruntime", "tensorrt"])
def test_repository_configs_parse_back_as_model_config(tiny_bundle, tmp_path, flavour):
    import shutil

    from keystep.tools.serve.repository import RepositoryOptions, write_repository

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    if flavour == "tensorrt":
        write_fake_engines(bundle)
    options = RepositoryOptions(stage_backend=flavour, stage_calls="bls", max_batch=2, ort_tensorrt=True,
                                stage_instances=2)
    repo = write_repository(bundle, tmp_path / "repo", options)
    configs = parse_configs(repo)
    assert set(configs) == {"keystep", "keystep_encoder", "keystep_decoder", "keystep_full"}
    orchestrator = configs["keystep"]
    assert orchestrator.backend == "python" and orchestrator.max_batch_size == 2
    assert [i.name for i in orchestrator.input][:1] == ["class_label"] and not orchestrator.input[0].optional
    assert {o.name for o in orchestrator.output} == {"latents"}  # a latent DiT without a VAE makes no image
    assert json.loads(orchestrator.parameters["stage_models"].string_value)["decoder"] == "keystep_decoder"
    # the largest decoder call of the key-step plan at 2 images with CFG: its longest group, x2 rows, x2 images
    keys = dit_default_key_steps(10) + [10]
    longest = max(b - a for a, b in zip(keys, keys[1:]))
    decoder, full = configs["keystep_decoder"], configs["keystep_full"]
    assert decoder.max_batch_size == longest * 2 * 2 and full.max_batch_size == 2 * 2
    assert decoder.dynamic_batching.max_queue_delay_microseconds == options.stage_queue_delay_us
    assert [d for d in decoder.input[0].dims] == [16, 64]  # hidden (tokens, width) without the batch axis
    timestep = next(i for i in decoder.input if i.name == "timestep")
    assert list(timestep.dims) == [1] and timestep.HasField("reshape") and list(timestep.reshape.shape) == []
    assert decoder.instance_group[0].count == 2
    model_dir = repo / "keystep_decoder" / "1"
    if flavour == "python":
        assert decoder.backend == "python" and (model_dir / "model.py").is_file()
        assert decoder.parameters["stage"].string_value == "decoder"
    elif flavour == "onnxruntime":
        assert decoder.platform == "onnxruntime_onnx" and (model_dir / "model.onnx").is_file()
        accelerator = decoder.optimization.execution_accelerators.gpu_execution_accelerator[0]
        assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    else:
        assert decoder.platform == "tensorrt_plan" and (model_dir / "model.plan").read_bytes() == b"engine"
    assert "nvcr.io/nvidia/tritonserver" in (repo / "README.md").read_text()


def test_repository_refuses_what_it_cannot_write(tiny_bundle, tmp_path, capsys):
    assert main(["triton", str(tiny_bundle), "--out", str(tmp_path / "r"), "--stage-backend", "tensorrt"]) == 2
    assert "no TensorRT engines" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main(["triton", str(tiny_bundle), "--out", str(tmp_path / "r"), "--stage-backend", "onnxruntime",
                 "--stage-calls", "in-process"]) == 2
    assert "called through BLS" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    assert main(["triton", str(tiny_bundle), "--out", str(tmp_path / "other")]) == 2
    assert "not a keystep Triton repository" in capsys.readouterr().err


# --- the orchestrator's control flow against a fake Triton Python API -----------------------------------------


class FakeTensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class FakeRequest:
    def __init__(self, inputs, outputs=()):
        self._inputs = [FakeTensor(k, v) for k, v in inputs.items()]
        self._outputs = list(outputs)

    def inputs(self):
        return self._inputs

    def requested_output_names(self):
        return self._outputs


def fake_pb_utils():
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = FakeTensor
    pb.TritonError = lambda message: message

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
            self.error = error

    pb.InferenceResponse = InferenceResponse
    return pb


def test_orchestrator_over_bls_runs_the_plan_unchanged(digits_dit_bundle, tmp_path, monkeypatch):
    """The Triton model with BLS stage calls (here answered by plain ONNX Runtime sessions, recorded): valid
    requests equal the API's images, a bad one gets its own error, compatible requests merge into one run."""
    import onnxruntime as ort

    from keystep.runtime.triton.orchestrator import TritonPythonModel
    from keystep.tools.serve.repository import RepositoryOptions, write_repository

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    repo = write_repository(digits_dit_bundle, tmp_path / "repo", RepositoryOptions(stage_calls="bls", max_batch=4))
    sessions, calls = {}, []

    def bls(model, feeds, outputs):
        calls.append((model, len(next(iter(feeds.values())))))
        if model not in sessions:
            sessions[model] = ort.InferenceSession(str(repo / "keystep" / "1" / "bundle" / f"{model[8:]}.onnx"))
        feeds = {k: v.reshape(-1) if v.ndim == 2 and v.shape[1] == 1 and k in ("timestep", "class_label") else v
                 for k, v in feeds.items()}
        return dict(zip(outputs, sessions[model].run(outputs, feeds)))

    monkeypatch.setattr("keystep.runtime.triton.bls.pb_utils_caller", lambda: bls)
    model = TritonPythonModel()
    config = (repo / "keystep" / "config.pbtxt").read_text()
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    as_json = json_format.MessageToJson(text_format.Parse(config, model_config_pb2.ModelConfig()),
                                        preserving_proto_field_name=True)
    model.initialize({"model_config": as_json, "model_repository": str(repo / "keystep"), "model_version": "1"})
    requests = [FakeRequest({"class_label": [[3]], "seed": [[0]], "steps": [[10]]}),
                FakeRequest({"class_label": [[11]], "seed": [[0]], "steps": [[10]]}),
                FakeRequest({"class_label": [[7], [1]], "seed": [[5], [6]], "steps": [[10], [10]]}, ["image"])]
    responses = model.execute(requests)
    assert "class_label: unknown class 11" in responses[1].error
    pipe = keystep.load(digits_dit_bundle)
    for response, labels, seeds in ((responses[0], [3], [0]), (responses[2], [7, 1], [5, 6])):
        assert response.error is None
        for row, (label, seed) in enumerate(zip(labels, seeds)):
            expected = pipe(class_labels=[label], seed=seed, num_inference_steps=10, output_type="np").images[0]
            assert np.array_equal(response.outputs["image"][row], np.round(expected * 255).astype(np.uint8))
    assert "latents" not in responses[2].outputs and responses[0].outputs["latents"].shape == (1, 1, 16, 16)
    # one merged run of 3 images: the full/encoder calls carry 3 images x CFG rows
    assert {rows for _, rows in calls} == {6}


# --- a real tritonserver ----------------------------------------------------------------------------------------


def served(bundle, directory, **options):
    """A fixture's Triton server for the repository written for ``bundle`` in ``directory`` (``options``:
    RepositoryOptions); stopped, its process gone, when the fixture ends."""
    from keystep.tools.serve.repository import write_repository
    from keystep.tools.serve.server import TritonServer, find_tritonserver

    repo = write_repository(bundle, directory, serving_options(**options))
    server = TritonServer(repo, find_tritonserver()).start()
    yield server
    server.stop()
    assert server.process.poll() is not None


def serving_options(**kwargs):
    from keystep.tools.serve.repository import RepositoryOptions
    from keystep.tools.serve.server import find_tritonserver, stub_environment

    env = stub_environment(find_tritonserver())
    return RepositoryOptions(site_dirs=tuple(site.getsitepackages()), execution_env=str(env) if env else None,
                             **kwargs)


def infer(server, inputs: dict, outputs=("image",), timeout=120):
    import tritonclient.http as http

    types_ = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32",
              np.dtype(object): "BYTES"}
    client = http.InferenceServerClient(server.http_url, network_timeout=timeout, connection_timeout=10)
    try:
        tensors = []
        for name, value in inputs.items():
            array = np.asarray(value)
            tensor = http.InferInput(name, list(array.shape), types_[array.dtype])
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = client.infer("keystep", tensors, outputs=[http.InferRequestedOutput(o) for o in outputs])
        return {o: result.as_numpy(o) for o in outputs}
    finally:
        client.close()


@pytest.fixture(scope="module")
def dit_server(digits_dit_bundle, tmp_path_factory):
    """digits-dit behind Triton: python stage models, BLS stage calls, dynamic batching."""
    yield from served(digits_dit_bundle, tmp_path_factory.mktemp("triton") / "dit", stage_calls="bls", max_batch=4)


def test_triton_dit_images_equal_the_cli(dit_server, digits_dit_bundle, tmp_path):
    for label, seed, plan in ((3, 0, "default"), (7, 11, "all"), (5, 2, "uniform:3")):
        got = infer(dit_server, {"class_label": np.array([[label]], np.int64), "seed": np.array([[seed]], np.int64),
                                 "plan": np.array([[plan.encode()]], object), "steps": np.array([[20]], np.int32)})
        expected = cli_image(digits_dit_bundle, tmp_path, "--class", str(label), "--seed", str(seed), "--key-steps",
                             plan, "--steps", "20")
        assert np.array_equal(got["image"][0], expected), (label, seed, plan)


def test_triton_concurrent_requests_are_neither_lost_nor_mixed(dit_server, digits_dit_bundle):
    pipe = keystep.load(digits_dit_bundle)
    jobs = [(c, 100 + c) for c in range(8)]
    results = {}

    def client(job):
        label, seed = job
        results[job] = infer(dit_server, {"class_label": np.array([[label]], np.int64),
                                          "seed": np.array([[seed]], np.int64), "steps": np.array([[10]], np.int32)})
    threads = [threading.Thread(target=client, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert set(results) == set(jobs)
    for label, seed in jobs:
        expected = pipe(class_labels=[label], seed=seed, num_inference_steps=10, output_type="np").images[0]
        assert np.array_equal(results[(label, seed)]["image"][0], np.round(expected * 255).astype(np.uint8))


@pytest.mark.parametrize("inputs,message", [
    ({"class_label": np.array([[10]], np.int64)}, "keystep: class_label: unknown class 10"),
    ({"class_label": np.array([[1]], np.int64), "steps": np.array([[0]], np.int32)}, "keystep: steps: must be at least 1"),
    ({"class_label": np.array([[1]], np.int64), "plan": np.array([[b"1,2"]], object)}, "step 0 must be a key step"),
    ({"class_label": np.array([[1]], np.int64), "seed": np.array([[-1]], np.int64)}, "keystep: seed: must be in"),
    ({"class_label": np.array([[1.5]], np.float32)}, "class_label"),  # wrong dtype: Triton's own check names it
])
def test_triton_bad_requests_get_an_error_and_the_server_keeps_serving(dit_server, inputs, message):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as error:
        infer(dit_server, inputs)
    assert message in error.value.message() and "\n" not in error.value.message().strip()
    ok = infer(dit_server, {"class_label": np.array([[4]], np.int64), "steps": np.array([[4]], np.int32)})
    assert ok["image"].shape == (1, 16, 16, 1)


@pytest.fixture(scope="module")
def sd_server(sd_bundle_dir, tmp_path_factory):
    """The tiny SD bundle (VAE, latent space) behind Triton, stage calls in-process."""
    yield from served(sd_bundle_dir, tmp_path_factory.mktemp("triton") / "sd", stage_calls="in-process", max_batch=2)


def test_triton_text_to_image_equals_the_cli(sd_server, sd_bundle_dir, tmp_path):
    from tritonclient.utils import InferenceServerException

    for prompt, seed, plan in (("a photo of a cat", 1, "all"), ("two dogs", 3, "default")):
        got = infer(sd_server, {"prompt": np.array([[prompt.encode()]], object), "seed": np.array([[seed]], np.int64),
                                "plan": np.array([[plan.encode()]], object), "steps": np.array([[5]], np.int32),
                                "height": np.array([[32]], np.int32), "width": np.array([[32]], np.int32)})
        expected = cli_image(sd_bundle_dir, tmp_path, "--prompt", prompt, "--seed", str(seed), "--key-steps", plan,
                             "--steps", "5", "--height", "32", "--width", "32")
        assert np.array_equal(got["image"][0], expected), (prompt, plan)
    with pytest.raises(InferenceServerException, match="keystep: prompt: is empty"):
        infer(sd_server, {"prompt": np.array([[b"  "]], object)})
    with pytest.raises(InferenceServerException, match="keystep: height: must be a multiple of"):
        infer(sd_server, {"prompt": np.array([[b"a cat"]], object), "height": np.array([[36]], np.int32)})


def test_serve_check_and_request_command(dit_server, tmp_path, capsys):
    assert main(["serve", "--check"]) == 0
    assert "tritonserver" in capsys.readouterr().out
    out = tmp_path / "req.png"
    assert main(["request", "--url", dit_server.http_url, "--class", "3", "--seed", "0", "--steps", "6",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == (16, 16)
    assert main(["request", "--url", dit_server.http_url, "--class", "12", "--out", str(out)]) == 2
    assert "the server refused the request: class_label: unknown class 12" in capsys.readouterr().err
    assert main(["request", "--url", "127.0.0.1:1", "--class", "1", "--out", str(out), "--timeout", "5"]) == 2
    assert "cannot reach Triton" in capsys.readouterr().err


def test_triton_faults_end_without_hangs(digits_dit_bundle, tmp_path):
    """A client that gives up mid-request, a stage model's stub killed, the server restarted between requests: no
    wrong image ever, every call bounded by its timeout, the server alive where it should be."""
    from keystep.tools.bench.serve import Workload, faults

    work = Workload(digits_dit_bundle, steps=10, count=1)
    disconnect, killed, restart = faults(digits_dit_bundle, tmp_path, work)
    assert disconnect["next request"] == "correct image" and disconnect["server alive"]
    assert killed["next requests"] and all(r == "correct image" or r.startswith("error:")
                                           for r in killed["next requests"])
    assert restart["after restart"] == "correct image" and restart["while stopped"].startswith("refused")


@pytest.mark.slow
def test_triton_load_and_soak(tmp_path):
    """The load/soak run of docs/benchmarks.md, small: nothing lost or mixed up, RSS growth under 5 %."""
    from keystep.tools.bench.serve import main as bench

    out = tmp_path / "serve.md"
    assert bench(["--clients", "1", "4", "--requests", "16", "--soak", "100", "--steps", "20",
                  "--stage-calls", "in-process", "--markdown", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| in-process")]
    assert len(rows) == 4 and all(line.split("|")[5].strip() == "0" for line in rows)  # no wrong images
    assert "0 wrong images" in text


def test_keystep_serve_command_starts_answers_and_stops_on_ctrl_c(digits_dit_bundle, tmp_path):
    """`keystep serve` as a user runs it: endpoints printed, a request answered, Ctrl-C stops Triton cleanly."""
    import re
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, "-m", "keystep.tools.cli", "serve", str(digits_dit_bundle), "--port", "0",
                             "--grpc-port", "0", "--metrics-port", "0", "--repository", str(tmp_path / "repo")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, lines, deadline = None, [], time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"HTTP\s+http://(\S+)", line)
            url = match.group(1) if match else None
        assert url, "".join(lines)
        out = tmp_path / "seven.png"
        assert main(["request", "--url", url, "--class", "7", "--steps", "5", "--out", str(out), "--timeout", "60"]) == 0
        assert Image.open(out).size == (16, 16)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "tritonserver stopped (exit code 0)" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_orchestrator_refuses_a_step_count_no_width_profile_covers(dydit_bundle):
    """An uncovered width profile is a request error (before any stage runs); the next request is served."""
    from keystep.runtime.triton.orchestrator import OrchestratorCore

    pipe = keystep.load(dydit_bundle)
    core = OrchestratorCore(pipe, max_rows=4)

    def request(steps):
        return {"class_label": np.array([[1]], np.int64), "steps": np.array([[steps]], np.int32)}, None

    refused = []
    for steps in range(2, 40):
        out = core.execute([request(steps)])[0]
        if isinstance(out, str) and "engine of this bundle covers" in out:
            refused.append((steps, out))
    assert refused, "every step count is covered: this bundle cannot show the error"
    steps, message = refused[0]
    assert message.startswith("keystep: plan: no ") and "rebuild the bundle" in message
    built = pipe.bundle.default_plan["num_steps"]
    ok = core.execute([request(built), request(steps)])
    assert ok[0]["latents"].shape[0] == 1 and isinstance(ok[1], str)  # a latent DiT: latents only
