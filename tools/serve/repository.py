"""``keystep triton BUNDLE --out REPO``: a Triton Inference Server model repository for a bundle.

    REPO/README.md                      how to run it (NGC container, or `keystep serve`), what the clients send
    REPO/<name>/config.pbtxt            the orchestrator: Python backend, keystep's plan executor
    REPO/<name>/1/model.py              a shim that imports keystep.runtime.triton.orchestrator
    REPO/<name>/1/bundle/               the bundle (hard links where the filesystem allows)
    REPO/<name>_<stage>/config.pbtxt    one model per stage the plans call (with --stage-calls bls):
    REPO/<name>_<stage>/1/model.plan      tensorrt:    platform tensorrt_plan, the engine `keystep engines` built
    REPO/<name>_<stage>/1/model.onnx      onnxruntime: platform onnxruntime_onnx (TensorRT accelerator optional)
    REPO/<name>_<stage>/1/model.py        python:      keystep's CPU backend in a Python-backend model

Every config is a ``ModelConfig`` protobuf (tritonclient's ``model_config_pb2``) written with protobuf's
``text_format``; batch sizes come from the same plan-derived profiles as the TensorRT engines
(:mod:`keystep.runtime.engine_plan`): a stage model's ``max_batch_size`` is the largest call the target plans make
at ``--max-batch`` images, its preferred batch sizes the calls they make, so Triton's dynamic batcher merges the
calls of concurrent requests up to what a profile covers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from keystep.runtime.atomic import publish_directory
from keystep.runtime.backends.auto import default_backend_name
from keystep.runtime.bundle import Bundle, StageSpec
from keystep.runtime.engine_plan import ENGINE_DIR, EngineIndex, EngineTargets, profiles_from_calls
from keystep.runtime.errors import KeystepError
from keystep.runtime.request import TEXT_FAMILIES
from keystep.runtime.triton.codec import INPUTS

STAGE_FLAVOURS = ("python", "onnxruntime", "tensorrt")
STAGE_CALLS = ("in-process", "bls")


class RepositoryError(KeystepError, ValueError):
    """The repository cannot be written as asked (a missing engine, a bad option)."""


def model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # pragma: no cover - the serve extra is missing
        raise RepositoryError("writing a Triton repository needs tritonclient: pip install 'keystep[serve]'") from exc
    return model_config_pb2


@dataclass(frozen=True)
class RepositoryOptions:
    stage_backend: str = "python"  # the stage models' flavour
    stage_calls: str = "in-process"  # where the orchestrator's stage calls go
    name: str = "keystep"
    instances: int = 1  # orchestrator instances (each a Python stub process with its own sessions)
    stage_instances: int = 1
    max_batch: int = 4  # images one orchestrator run (and one stage call's profile) may merge
    dynamic_batching: bool = True
    queue_delay_us: int = 10_000  # how long Triton may hold a request to merge it with the next ones
    stage_queue_delay_us: int = 500  # the same for a stage call (many per request)
    # keystep's CPU backend for in-process and python-flavour stages; "auto" resolves in the server's process, on
    # the CPU it serves from
    backend: str = field(default_factory=default_backend_name)
    threads: int | None = None
    ort_tensorrt: bool = False  # onnxruntime flavour: TensorRT execution accelerator (fp16)
    gpu: bool = True  # tensorrt/onnxruntime stage models on GPUs (KIND_GPU); python stages are always CPU
    plans: tuple[str, ...] = ("default", "all")  # the plans the stage models must serve
    site_dirs: tuple[str, ...] = ()  # added to the stubs' sys.path (keystep and its dependencies)
    execution_env: str | None = None  # the Python backend's EXECUTION_ENV_PATH (a venv dir or conda-pack tarball)

    def check(self) -> None:
        if self.stage_backend not in STAGE_FLAVOURS:
            raise RepositoryError(f"--stage-backend must be one of {', '.join(STAGE_FLAVOURS)}")
        if self.stage_calls not in STAGE_CALLS:
            raise RepositoryError(f"--stage-calls must be one of {', '.join(STAGE_CALLS)}")
        if self.stage_calls == "in-process" and self.stage_backend != "python":
            raise RepositoryError(f"{self.stage_backend} stage models are called through BLS: use --stage-calls bls")
        for flag, value in (("--instances", self.instances), ("--stage-instances", self.stage_instances),
                            ("--max-batch", self.max_batch)):
            if value < 1:
                raise RepositoryError(f"{flag} must be at least 1, got {value}")
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise RepositoryError(f"--name {self.name!r}: letters, digits, '-' and '_' only")


TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}


def stage_model_name(name: str, stage: str) -> str:
    return f"{name}_{stage.replace('.', '_')}"


def batchable(spec: StageSpec) -> bool:
    """Triton's batching needs the batch axis first in every input and output (``mlp_tokens`` and ControlNet's
    ``conditioning_scale`` have none)."""
    return all(io.shape and io.shape[0] == "batch" for io in spec.inputs + spec.outputs)


def tensor_dims(shape: tuple, batched: bool, axes: dict[str, int] | None = None) -> list[int]:
    """Triton dims: without the batch axis when Triton batches; symbolic axes -1, or their pinned size (engines)."""
    dims = shape[1:] if batched else shape
    out = []
    for d in dims:
        if isinstance(d, int):
            out.append(d)
        elif axes is not None and "*" not in d and d in axes:
            out.append(axes[d])
        elif axes is not None and "*" in d:
            factor, _, name = d.partition("*")
            out.append(int(factor) * axes[name.strip()] if name.strip() in axes else -1)
        else:
            out.append(-1)
    return out


def stage_config(spec: StageSpec, options: RepositoryOptions, bundle_rel: str, max_rows: int,
                 engine=None, axes: dict[str, int] | None = None):
    """The ModelConfig of one stage model."""
    mc = model_config_pb2()
    name = stage_model_name(options.name, spec.name)
    batched = batchable(spec)
    config = mc.ModelConfig(name=name)
    if options.stage_backend == "tensorrt":
        config.platform = "tensorrt_plan"
        config.default_model_filename = "model.plan"
        top = engine.profile["max"]  # the engine's optimisation profile bounds what Triton may merge
    else:
        top = max_rows
        if options.stage_backend == "onnxruntime":
            config.platform = "onnxruntime_onnx"
            config.default_model_filename = "model.onnx"
            if options.ort_tensorrt:
                accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add()
                accelerator.name = "tensorrt"
                accelerator.parameters["precision_mode"] = "FP16"
                # no workspace limit is set: the TensorRT memory pool defaults to the whole device
        else:
            config.backend = "python"
            python_parameters(config, options, {"bundle": bundle_rel, "stage": spec.name, "backend": options.backend,
                                                "threads": str(options.threads or "")})
    config.max_batch_size = top if batched else 0
    pinned = axes if options.stage_backend == "tensorrt" else None
    for io, target in [(io, config.input) for io in spec.inputs] + [(io, config.output) for io in spec.outputs]:
        entry = target.add(name=io.name, data_type=getattr(mc, TRITON_TYPES[io.dtype]))
        dims = tensor_dims(io.shape, batched, pinned)
        if not dims:  # a per-row scalar (timestep, class label): Triton needs dims; clients send (rows, 1)
            dims = [1]
            entry.reshape.SetInParent()  # the model sees (rows,)
        entry.dims.extend(dims)
    if batched and options.dynamic_batching:
        # stage calls of concurrent requests arrive together: a short wait merges them (no preferred sizes: the
        # calls' batches vary with the plan, and Triton then sends the largest batch it has)
        config.dynamic_batching.max_queue_delay_microseconds = options.stage_queue_delay_us
    group = config.instance_group.add(count=options.stage_instances)
    group.kind = mc.ModelInstanceGroup.KIND_GPU if options.stage_backend != "python" and options.gpu \
        else mc.ModelInstanceGroup.KIND_CPU
    return config


def orchestrator_config(bundle: Bundle, options: RepositoryOptions, stage_models: dict[str, str], can_decode: bool):
    mc = model_config_pb2()
    config = mc.ModelConfig(name=options.name, backend="python", max_batch_size=options.max_batch)
    text = bundle.family in TEXT_FAMILIES
    video = bundle.family == "unet3d"
    wanted = ["prompt", "negative_prompt", "seed", "steps", "guidance_scale", "plan", "height", "width"] if text \
        else ["class_label", "seed", "steps", "guidance_scale", "plan"]
    wanted += ["num_frames"] if video else []
    for name in wanted:
        entry = config.input.add(name=name, data_type=getattr(mc, INPUTS[name][0]), optional=name not in
                                 ("prompt", "class_label"))
        entry.dims.append(1)
    channels = bundle.stage("vae_decoder").outputs[0].shape[1] if "vae_decoder" in bundle.stages \
        else bundle.model_config["in_channels"]
    frames = [-1] if video else []  # text-to-video: (frames, H, W, C) per row
    if can_decode:
        config.output.add(name="image", data_type=mc.TYPE_UINT8, dims=[*frames, -1, -1, channels])
    config.output.add(name="latents", data_type=mc.TYPE_FP32,
                      dims=[bundle.model_config["in_channels"], *frames, -1, -1])
    if options.dynamic_batching:
        config.dynamic_batching.max_queue_delay_microseconds = options.queue_delay_us
    config.instance_group.add(count=options.instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    python_parameters(config, options, {"bundle": "bundle", "stage_calls": options.stage_calls,
                                        "stage_models": json.dumps(stage_models), "backend": options.backend,
                                        "threads": str(options.threads or ""),
                                        "batch_decoders": str(options.stage_backend != "python").lower()})
    return config


def python_parameters(config, options: RepositoryOptions, values: dict[str, str]) -> None:
    """A Python-backend model's parameters: its own, where keystep is installed, and its execution environment."""
    values = {**values, "site_dirs": json.dumps(list(options.site_dirs))}
    if options.execution_env:
        values["EXECUTION_ENV_PATH"] = options.execution_env
    for key, value in values.items():
        config.parameters[key].string_value = value


SHIM = '''"""Written by `keystep triton`: Triton's Python-backend entry point for keystep's {what}.
The implementation is {module}; `site_dirs` in config.pbtxt (if any) is where keystep is installed."""

import json
import site


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {{}})
        for directory in json.loads(parameters.get("site_dirs", {{}}).get("string_value") or "[]"):
            site.addsitedir(directory)
        from {module} import TritonPythonModel as Implementation

        self.impl = Implementation()
        self.impl.initialize(args)

    def execute(self, requests):
        return self.impl.execute(requests)

    def finalize(self):
        if hasattr(self.impl, "finalize"):
            self.impl.finalize()
'''


def write_config(model_dir: Path, config) -> None:
    from google.protobuf import text_format

    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))


def link_tree(src: Path, dst: Path) -> None:
    """Copy a directory, with hard links where the filesystem allows (bundles are large; they never change)."""
    def link_or_copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy)


def stage_max_rows(bundle: Bundle, options: RepositoryOptions) -> dict[str, int]:
    """Per stage the plans call, the rows of its largest call at up to ``max_batch`` images (the profile's max)."""
    targets = EngineTargets(tuple(options.plans), tuple(range(1, options.max_batch + 1)))
    return {stage: p.max for stage, p in profiles_from_calls(targets.call_list(bundle)).items()}


def write_repository(bundle_dir: str | Path, out: str | Path, options: RepositoryOptions = RepositoryOptions()) -> Path:
    """Write the repository into a temp dir next to ``out``, then rename it into place (never half-written)."""
    options.check()
    bundle = Bundle.load(bundle_dir)
    if bundle.family in ("cascade", "if"):
        raise RepositoryError("DeepFloyd-IF cascades (and their diffusion stages) are not served by keystep triton yet "
                              "(several stages with their own plans and noise per request): run them with "
                              "keystep.load(...) or keystep generate")
    can_decode = bundle.pixel_space or "vae_decoder" in bundle.stages
    out = Path(out).resolve()
    if out.exists() and not (out / "README.md").is_file():
        raise RepositoryError(f"{out} exists and is not a keystep Triton repository; refusing to replace it")
    stages: dict[str, StageSpec] = {}
    max_rows: dict[str, int] = {}
    if options.stage_calls == "bls":
        max_rows = stage_max_rows(bundle, options)
        stages = {name: bundle.stage(name) for name in max_rows}
    index = EngineIndex.load(bundle.root) if options.stage_backend == "tensorrt" and stages else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        orch = tmp / options.name
        (orch / "1").mkdir(parents=True)
        link_tree(bundle.root, orch / "1" / "bundle")
        (orch / "1" / "model.py").write_text(SHIM.format(what="orchestrator (the plan executor)",
                                                         module="keystep.runtime.triton.orchestrator"))
        stage_models = {name: stage_model_name(options.name, name) for name in stages}
        write_config(orch, orchestrator_config(bundle, options, stage_models, can_decode))
        for name, spec in stages.items():
            model_dir = tmp / stage_models[name]
            (model_dir / "1").mkdir(parents=True)
            engine = index.entry(name) if index else None
            write_config(model_dir, stage_config(spec, options, f"../{options.name}/1/bundle", max_rows[name], engine,
                                                 index.axes if index else None))
            if options.stage_backend == "tensorrt":
                link_file(bundle.root / ENGINE_DIR / engine.file, model_dir / "1" / "model.plan")
            elif options.stage_backend == "onnxruntime":
                link_file(spec.path, model_dir / "1" / "model.onnx")
                for extra in spec.path.parent.glob(spec.path.name + ".data"):  # external weights keep their name
                    link_file(extra, model_dir / "1" / extra.name)
            else:
                (model_dir / "1" / "model.py").write_text(SHIM.format(what=f"stage {name!r}",
                                                                      module="keystep.runtime.triton.stage"))
        (tmp / "README.md").write_text(repository_readme(bundle, options, stage_models, can_decode))
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def link_file(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def repository_readme(bundle: Bundle, options: RepositoryOptions, stage_models: dict[str, str], can_decode: bool) -> str:
    text = bundle.family in TEXT_FAMILIES
    example_input = ('"prompt": [["a handwritten 7"]]' if text else '"class_label": [[3]]')
    stages = "\n".join(f"| `{m}` | stage `{s}` | {options.stage_backend} |" for s, m in stage_models.items())
    calls = ("in-process: the orchestrator runs every stage itself with keystep's "
             f"`{options.backend}` backend" if options.stage_calls == "in-process" else
             "BLS: the orchestrator sends each stage call to the stage model below")
    gpu_note = ""
    if options.stage_backend == "tensorrt":
        gpu_note = ("The TensorRT engines are specific to the GPU and TensorRT version `keystep engines` built them "
                    "with (see `1/bundle/engines/index.json`); run the container whose TensorRT matches.\n")
    return f"""# Triton model repository for a keystep bundle

Written by `keystep triton`. Bundle family: `{bundle.family}`; source: `{(bundle.manifest.get('source') or {}).get('path')}`.

| model | what | flavour |
|---|---|---|
| `{options.name}` | orchestrator: keystep's plan executor (Python backend); stage calls {calls} | python |
{stages}

## Run it

With the NGC container (GPU or CPU; the Python backend needs keystep's runtime in the container's Python):

```bash
docker run --rm --gpus all -p8000:8000 -p8001:8001 -p8002:8002 -v $PWD:/models nvcr.io/nvidia/tritonserver:24.10-py3 \\
  bash -c "pip install numpy pydantic pillow onnxruntime /path/to/keystep --no-deps && \\
           tritonserver --model-repository=/models"
```

The orchestrator needs these Python packages: `numpy`, `pydantic`, `pillow` and keystep itself (its runtime
imports neither torch nor diffusers); in-process or `python` stages also need `onnxruntime` (or `openvino` with
the `openvino` backend). {gpu_note}On one machine, `keystep serve BUNDLE` writes this repository and starts Triton
on it. Endpoints: HTTP 8000, gRPC 8001, Prometheus metrics 8002 (`/metrics`).

## Call it

Inputs (batch dimension first; a request of B rows makes B images): {', '.join(
        ('prompt (BYTES, required), negative_prompt (BYTES)' if text else 'class_label (INT64, required)').split(', ')
        + ['seed (INT64)', 'steps (INT32)', 'guidance_scale (FP32)', 'plan (BYTES: "all", "default", "uniform:6", ...)']
        + (['height, width (INT32)'] if text else []))}.
Outputs: {'`image` UINT8 (B, H, W, C), ' if can_decode else ''}`latents` FP32 (B, C, h, w).

```python
import numpy as np
import tritonclient.http as http

client = http.InferenceServerClient("localhost:8000")
inputs = []
for name, value in {{{example_input}, "seed": [[0]]}}.items():
    array = np.array(value, dtype=object if name.endswith("prompt") else np.int64).reshape(1, 1)
    tensor = http.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else "INT64")
    tensor.set_data_from_numpy(array)
    inputs.append(tensor)
result = client.infer("{options.name}", inputs)
{'image = result.as_numpy("image")[0]  # (H, W, C) uint8' if can_decode else 'latents = result.as_numpy("latents")[0]'}
```

`keystep request --url localhost:8000 {'--prompt "a handwritten 7"' if text else '--class 3'} --out out.png` is that call,
written for you. A bad request (unknown class, empty prompt, steps <= 0, a plan the bundle cannot run) is answered
with an error naming the input; the server keeps serving.

Batching: {'Triton queues requests up to ' + str(options.queue_delay_us) + ' us and keystep runs compatible ones (same plan, steps, guidance, size) as one sampling run of up to ' + str(options.max_batch) + ' images; every image is still the one its own seed gives.' if options.dynamic_batching else 'off (each request runs alone).'}
"""
