"""The embedded runtime: ``keystep.load(BUNDLE)`` and a call in diffusers' vocabulary.

>>> import keystep
>>> pipe = keystep.load("digits-sd-bundle")                       # backend="auto" by default
>>> out = pipe(prompt="a handwritten 7", num_inference_steps=50, guidance_scale=2.0, seed=0)
>>> out.images[0].save("seven.png")                              # PIL images; output_type="np" | "latent" too
>>> pipe = keystep.load("digits-dit-bundle")
>>> out = pipe(class_labels=[3, 7], seed=0, key_steps="uniform:6")  # class-conditional DiTs

Torch-free (numpy + the backend). Every argument goes through :func:`keystep.runtime.request.validate_request`
before a stage runs, the same layer the CLI and the Triton model use; bad input raises
:class:`keystep.KeystepError` (a :class:`~keystep.runtime.request.RequestError` naming the argument).

Threads: one pipeline may be called from many threads at once and gives each call exactly what a serial call gives.
Each call has its own scheduler, noise and plan state; stage sessions are loaded once under a lock and shared where
the backend's runner is thread-safe (ONNX Runtime CPU sessions; OpenVINO runners keep one infer request per
thread) and serialised by a lock where it is not (the GPU backends' preallocated buffers and CUDA graphs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends.auto import default_backend_name
from .backends.base import Backend, BackendError, get_backend
from .bundle import Bundle
from .plan import PlanError
from .request import GenerationRequest, RequestArguments, RequestError, check_threads, validate_request
from .sampler import SampleResult
from .samplers import sampler_for
from .signature import with_keywords

GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda", "onnxruntime-tensorrt")


@dataclass
class PipelineOutput:
    """``images``: PIL images (``output_type="pil"``; text-to-video: a list of frames per video), float
    (N, H, W, C) in [0, 1] (``"np"``; videos (N, F, H, W, C)) or the latents (``"latent"``). ``latents``: the final latents (N, C, h, w) float32, always. ``timing``: seconds per part."""

    images: Any
    latents: np.ndarray
    timing: dict[str, float] = field(default_factory=dict)
    plan: str = ""  # what ran, e.g. "uniform:6: 9 key steps of 50, 59 stage calls"

    def __iter__(self):  # ``images, = pipe(..., return_dict=False)`` as in diffusers
        return iter((self.images,))


def make_backend(name: str | None = None, threads: int | None = None, precision: str | None = None,
                 device: int = 0, cuda_graphs: bool = True) -> Backend:
    """A backend by name with the options it understands (threads; OpenVINO precision; GPU device and graphs).
    No name: ``$KEYSTEP_BACKEND`` or ``auto`` — the fastest CPU backend/precision for this CPU
    (:mod:`keystep.runtime.backends.auto`; with ``precision`` "f32" or "bf16", the fastest at that precision)."""
    name = name or default_backend_name()
    options: dict[str, Any] = {"threads": check_threads(threads)}
    if precision is not None:
        if name not in ("openvino", "auto"):
            raise BackendError("precision applies to the openvino backend (ONNX Runtime runs the graph's own types; "
                               "build a bf16/fp16 bundle with keystep build --precision)")
        options["precision"] = precision
    if name in GPU_BACKENDS:
        options.update(device_id=device, cuda_graphs=cuda_graphs)
    return get_backend(name, **options)


def load(bundle: str | Path | Bundle, backend: str | Backend | None = None, *, threads: int | None = None,
         precision: str | None = None, device: int = 0, cuda_graphs: bool = True, verify: bool = True) -> "Pipeline":
    """Load a bundle (verifying its manifest and file hashes) onto a backend: ``auto`` (the default: the fastest CPU
    backend/precision for this CPU — OpenVINO bf16 where the CPU has native bf16; ``$KEYSTEP_BACKEND`` replaces the
    default), ``onnxruntime``, ``openvino`` (``precision="bf16"`` where the CPU has it), ``tensorrt``,
    ``onnxruntime-cuda``, ... Stage sessions load on first use."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle, verify=verify)
    if backend is None or isinstance(backend, str):
        backend = make_backend(backend, threads, precision, device, cuda_graphs)
    return Pipeline(bundle, backend)


class Pipeline:
    def __init__(self, bundle: Bundle, backend: Backend):
        self.bundle = bundle
        self.backend = backend
        self.sampler = sampler_for(bundle, backend)

    @property
    def family(self) -> str:
        return self.bundle.family

    @property
    def can_decode(self) -> bool:
        """Whether the bundle makes images (a VAE stage, or a pixel-space model) rather than only latents."""
        return self.sampler.can_decode

    @with_keywords(RequestArguments)
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 return_dict: bool = True, **arguments: Any) -> PipelineOutput:
        """Generate. The keyword arguments are :class:`~keystep.runtime.request.RequestArguments`' fields (diffusers'
        names: ``num_inference_steps``, ``guidance_scale``, ``height``, ``output_type``, ...). Unset plan arguments
        (steps, guidance, key steps, cache, scheduler) take the bundle's default plan. ``seed`` (an int, or a numpy
        Generator) or ``generator`` draws the initial noise, unless ``latents`` gives it. ``key_steps``: "all"
        (baseline), "default", "uniform:M" or a list of step indices.

        SDXL bundles: ``prompt_2``, ``negative_prompt_2`` and the size/crop conditioning, as
        StableDiffusionXLPipeline. DeepFloyd-IF cascades run every diffusion stage in order (IFPipeline, then
        IFSuperResolutionPipeline) and return the last stage's images; ``height``/``width`` are stage I's, plan
        arguments apply to every stage and ``stage_plans={"stage_2": {"key_steps": "all"}}`` to one;
        ``noise_level`` is the super-resolution stages'."""
        request = self.validate(prompt=prompt, negative_prompt=negative_prompt, **arguments)
        out = self.run(request)
        return out if return_dict else tuple(out)

    def validate(self, **arguments: Any) -> GenerationRequest:
        """The request these ``__call__`` arguments make, validated (its plan prepared too: a step no width engine
        covers is refused here), without running it."""
        request = validate_request(self.bundle, RequestArguments(**arguments), can_decode=self.can_decode)
        runs = (zip(self.sampler.stages, request.stage_options) if self.family == "cascade"
                else [(self.sampler, request.options)])
        for sampler, options in runs:
            try:
                sampler.prepare(options, request.images)
            except PlanError as exc:
                raise RequestError("key_steps", str(exc)) from None
        return request

    def run(self, request: GenerationRequest) -> PipelineOutput:
        """Run a validated request: sample, then decode to the asked output type."""
        start = time.perf_counter()
        results = self._sample(request)
        result = results[-1]  # a cascade: its last stage makes the images
        sampled = time.perf_counter()
        images = result.latents
        if request.output_type != "latent":
            pixels = self.decode(result.latents)
            if request.output_type == "np":
                images = pixels.astype(np.float32) / 255.0
            else:  # PIL images; for videos a list of frames per video, as diffusers' video pipelines return
                images = [to_pil(v) for v in pixels] if pixels.ndim == 5 else to_pil(pixels)
        end = time.perf_counter()
        sampling = sum(r.total_seconds for r in results)
        timing = {"total_s": end - start, "sampling_s": sampling,
                  "stage_calls_s": sum(sum(r.call_seconds) for r in results),
                  "host_s": sum(r.host_seconds for r in results), "decode_s": end - sampled,
                  "conditioning_s": sampled - start - sampling}
        if self.family == "cascade":
            described = "; ".join(f"{name} {'x'.join(map(str, r.latents.shape[2:]))}: {describe_run(r)}"
                                  for name, r in zip(self.sampler.stage_names, results))
        else:
            described = describe_run(result)
        return PipelineOutput(images, result.latents, timing, described)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Final latents -> uint8 images (N, H, W, C), or frames (N, F, H, W, C) for text-to-video bundles."""
        if not self.can_decode:
            raise RequestError("output_type", "this bundle makes latents, not images (no vae_decoder stage)")
        return self.sampler.decode(latents)

    def _sample(self, r: GenerationRequest) -> list[SampleResult]:
        """The sampling run(s): one per diffusion stage (one, except for cascades)."""
        if self.family == "cascade":
            return self.sampler.sample(r.prompts, list(r.stage_options), negative_prompt=r.negative_prompts,
                                       height=r.height, width=r.width, seed=r.seed, noise_level=r.noise_level,
                                       generator=r.generator)
        text = dict(negative_prompt=r.negative_prompts, height=r.height, width=r.width, init_noise=r.latents,
                    seed=r.seed, generator=r.generator)
        if self.family == "unet3d":
            return [self.sampler.sample(r.prompts, r.options, num_frames=r.num_frames, **text)]
        if self.family == "if":
            return [self.sampler.sample(r.prompts, r.options, noise_level=r.noise_level, **text)]
        if self.family == "unet":
            return [self.sampler.sample(r.prompts, r.options, control_image=r.control_image,
                                        control_scale=r.control_scale, prompt_2=r.prompts_2,
                                        negative_prompt_2=r.negative_prompts_2,
                                        size_conditioning=r.size_conditioning, **text)]
        return [self.sampler.sample(r.class_labels, r.options, init_noise=r.latents, seed=r.seed,
                                    generator=r.generator)]


def describe_run(result: SampleResult) -> str:
    plan = result.prepared.plan
    kind = "baseline" if plan.baseline else f"{len(plan.key_steps)} key steps of {plan.num_steps}"
    if result.prepared.cache is not None:
        kind += f", cache {result.prepared.cache.spec}"
    return f"{plan.spec or 'default'}: {kind}, {len(result.prepared.calls)} stage calls"


def to_pil(pixels: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]


__all__ = ["Pipeline", "PipelineOutput", "RequestError", "load", "make_backend"]
