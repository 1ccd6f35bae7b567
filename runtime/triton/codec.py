"""The ``keystep`` model's contract with its clients, and how requests become sampling runs.

Inputs (each request is B rows = B images; every input has the batch dimension first, as Triton gives it with
``max_batch_size > 0``; all but the first are optional):

==================  =======  ==========================================================================
name                type     meaning
==================  =======  ==========================================================================
prompt              BYTES    text-to-image bundles: the prompt of each row (UTF-8)
negative_prompt     BYTES    per row; default empty (the unconditional text)
class_label         INT64    class-conditional bundles: the class of each row
seed                INT64    per row: z_T = default_rng(seed).standard_normal((1, C, h, w)); default 0
steps               INT32    num_inference_steps (the same for every row of a request)
guidance_scale      FP32     classifier-free guidance scale
plan                BYTES    "all", "default", "uniform:6", "0,1,2,5", "deep0:uniform:3", "default+deep0:..."
height, width       INT32    image size in pixels (UNets)
num_frames          INT32    text-to-video bundles: frames per video
==================  =======  ==========================================================================

Outputs: ``image`` UINT8 (B, H, W, C) — text-to-video (B, F, H, W, C) — and ``latents`` FP32 (B, C, [F,] h, w).

A row's image depends only on its own inputs (its seed draws its own z_T, and DDPM's per-step noise comes from
``default_rng(seed + 1)`` per row), so merging requests into one run, which Triton's dynamic batcher makes
possible, gives each row what a run of that row alone gives: the CLI's ``keystep generate --seed S`` image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np

from ..errors import KeystepError
from ..pipeline import Pipeline
from ..request import MAX_SEED, TEXT_FAMILIES, GenerationRequest, RequestError, check_int
from ..sampler import SamplingOptions

# name -> (Triton data type, numpy dtype, per-request scalar: the same for all rows)
INPUTS = {
    "prompt": ("TYPE_STRING", np.object_, False),
    "negative_prompt": ("TYPE_STRING", np.object_, False),
    "class_label": ("TYPE_INT64", np.int64, False),
    "seed": ("TYPE_INT64", np.int64, False),
    "steps": ("TYPE_INT32", np.int32, True),
    "guidance_scale": ("TYPE_FP32", np.float32, True),
    "plan": ("TYPE_STRING", np.object_, True),
    "height": ("TYPE_INT32", np.int32, True),
    "width": ("TYPE_INT32", np.int32, True),
    "num_frames": ("TYPE_INT32", np.int32, True),  # text-to-video bundles
}
OUTPUTS = {"image": ("TYPE_UINT8", np.uint8), "latents": ("TYPE_FP32", np.float32)}


@dataclass(frozen=True)
class RowRequest:
    """One client request after validation: its rows, their seeds, and the validated sampling request."""

    request: GenerationRequest
    seeds: tuple[int, ...]
    want_latents: bool

    @property
    def rows(self) -> int:
        return self.request.images

    def group_key(self) -> str:
        """Requests with equal keys run as one sampling run (same plan, steps, guidance, size)."""
        r = self.request
        # without a negative prompt SDXL's negative half is zeros, not the encoded "": such rows run on their own
        return json.dumps([vars(r.options), r.height, r.width, r.num_frames, r.negative_prompts is None],
                          sort_keys=True, default=str)


def _rows(name: str, value: np.ndarray, rows: int | None) -> np.ndarray:
    value = np.asarray(value)
    if value.ndim == 0:
        value = value.reshape(1)
    if value.ndim > 1:
        if any(d != 1 for d in value.shape[1:]):
            raise RequestError(name, f"one value per row expected, got shape {value.shape}")
        value = value.reshape(len(value))
    if rows is not None and len(value) != rows:
        raise RequestError(name, f"{len(value)} rows, but the request has {rows}")
    return value


def _text(name: str, values: np.ndarray) -> list[str]:
    out = []
    for v in values:
        try:
            out.append(v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v))
        except UnicodeDecodeError:
            raise RequestError(name, "is not UTF-8 text") from None
    return out


def _scalar(name: str, values: np.ndarray):
    first = values[0]
    if any(v != first for v in values[1:]):
        raise RequestError(name, "must be the same for every row of a request (send rows with other values as "
                           "their own request)")
    return first.decode("utf-8") if isinstance(first, (bytes, np.bytes_)) else first.item()


def decode_request(pipe: Pipeline, inputs: dict[str, np.ndarray], requested: set[str] | None = None) -> RowRequest:
    """A client's input tensors -> a validated request (the Python API's validation layer, names and all)."""
    unknown = set(inputs) - set(INPUTS)
    if unknown:
        raise RequestError(sorted(unknown)[0], f"is not an input of this model (inputs: {', '.join(INPUTS)})")
    text = pipe.family in TEXT_FAMILIES
    main = "prompt" if text else "class_label"
    if main not in inputs:
        other = "class_label" if text else "prompt"
        hint = f" ({other} is for {'class-conditional' if text else 'text-to-image'} bundles)" if other in inputs else ""
        raise RequestError(main, f"this bundle needs the {main!r} input{hint}")
    rows = len(_rows(main, inputs[main], None))
    if rows == 0:
        raise RequestError(main, "the request has no rows")
    values = {name: _rows(name, v, rows) for name, v in inputs.items()}
    arguments: dict = {"num_images_per_prompt": 1}
    if text:
        arguments["prompt"] = _text("prompt", values["prompt"])
        if "negative_prompt" in values:
            arguments["negative_prompt"] = _text("negative_prompt", values["negative_prompt"])
        if "class_label" in values:
            arguments["class_labels"] = values["class_label"].tolist()
    else:
        arguments["class_labels"] = values["class_label"].tolist()
        if "prompt" in values or "negative_prompt" in values:
            arguments["prompt"] = _text("prompt", values.get("prompt", values.get("negative_prompt")))
    seeds = [check_int("seed", s, 0, MAX_SEED) for s in values["seed"].tolist()] if "seed" in values else [0] * rows
    for name, argument in (("steps", "num_inference_steps"), ("guidance_scale", "guidance_scale"),
                           ("height", "height"), ("width", "width"), ("num_frames", "num_frames")):
        if name in values:
            arguments[argument] = _scalar(name, values[name])
    if "plan" in values:  # key-step spec vocabulary, as --key-steps/--cache: "default" is the family's default rule
        options = SamplingOptions().with_plan(_scalar("plan", values["plan"]))
        arguments.update(key_steps=options.key_steps, cache=options.cache or "none")
    request = pipe.validate(**arguments, seed=seeds[0], output_type="latent")
    if requested is not None and "image" in requested and not pipe.can_decode:
        raise RequestError("image", "this bundle makes latents, not images: ask for the 'latents' output only")
    return RowRequest(request, tuple(seeds), requested is None or "latents" in requested)


class RowGenerators:
    """Stochastic schedulers' per-step noise drawn per row from each row's own generator (``default_rng(seed+1)``,
    as a single run of that row draws it), so merged runs give every row its own run's result."""

    def __init__(self, seeds: list[int]):
        self.generators = [np.random.default_rng(s + 1) for s in seeds]

    def standard_normal(self, shape, dtype=np.float64):
        rows = shape[0]
        if rows % len(self.generators):
            raise ValueError(f"noise of {rows} rows for {len(self.generators)} generators")
        per = rows // len(self.generators)
        return np.concatenate([g.standard_normal((per, *shape[1:]), dtype=dtype) for g in self.generators])


def merged_request(parts: list[RowRequest], latent_shape) -> GenerationRequest:
    """One sampling request for requests of one group: rows concatenated, each row's z_T from its own seed."""
    first = parts[0].request
    seeds = [s for p in parts for s in p.seeds]
    noise = np.concatenate([np.random.default_rng(s).standard_normal((1, *latent_shape), dtype=np.float32)
                            for s in seeds])
    prompts = labels = negatives = None
    if first.prompts is not None:
        prompts = [p for part in parts for p in part.request.prompts]
        if first.negative_prompts is not None:  # then every part has them (group_key)
            negatives = [n for part in parts for n in part.request.negative_prompts]
    if first.class_labels is not None:
        labels = [c for part in parts for c in part.request.class_labels]
    return replace(first, images=len(seeds), prompts=prompts, negative_prompts=negatives, class_labels=labels,
                   latents=noise, generator=RowGenerators(seeds), seed=seeds[0])


def latent_shape(pipe: Pipeline, request: GenerationRequest) -> tuple[int, ...]:
    cfg = pipe.bundle.model_config
    if pipe.family in TEXT_FAMILIES:
        f = cfg["vae_scale_factor"]
        frames = (request.num_frames,) if request.num_frames else ()
        return cfg["in_channels"], *frames, request.height // f, request.width // f
    return cfg["in_channels"], cfg["input_size"], cfg["input_size"]


def run_group(pipe: Pipeline, parts: list[RowRequest]) -> list[dict[str, np.ndarray]]:
    """Run a group of compatible requests as one sampling run; split the outputs back per request."""
    request = merged_request(parts, latent_shape(pipe, parts[0].request))
    latents = pipe.run(request).latents
    images = pipe.sampler.decode(latents) if pipe.can_decode else None  # uint8 (N, H, W, C)
    results, at = [], 0
    for part in parts:
        rows = slice(at, at + part.rows)
        at += part.rows
        result = {} if images is None else {"image": images[rows]}
        if part.want_latents or images is None:
            result["latents"] = latents[rows].astype(np.float32)
        results.append(result)
    return results


def group_requests(parts: list[RowRequest | Exception], max_rows: int) -> list[list[int]]:
    """Indices of the valid requests, grouped by compatibility, each group at most ``max_rows`` rows."""
    groups: dict[str, list[list[int]]] = {}
    for i, part in enumerate(parts):
        if isinstance(part, Exception):
            continue
        chunks = groups.setdefault(part.group_key(), [[]])
        rows = sum(parts[j].rows for j in chunks[-1])
        if chunks[-1] and rows + part.rows > max_rows:
            chunks.append([])
        chunks[-1].append(i)
    return [chunk for chunks in groups.values() for chunk in chunks]


# the API's argument names (RequestError.field) -> this model's input names
INPUT_OF_ARGUMENT = {"class_labels": "class_label", "num_inference_steps": "steps", "key_steps": "plan",
                     "cache": "plan", "scheduler": "plan", "num_images_per_prompt": "prompt", "output_type": "image"}


def error_message(exc: BaseException) -> str:
    """What a client sees for a failed request: keystep's one line (a RequestError names the input)."""
    if isinstance(exc, RequestError):
        return f"keystep: {INPUT_OF_ARGUMENT.get(exc.field, exc.field)}: {exc.message}"
    if isinstance(exc, KeystepError):
        return f"keystep: {exc}"
    return f"keystep: internal error: {type(exc).__name__}: {exc}"
