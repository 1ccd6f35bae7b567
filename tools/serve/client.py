"""``keystep request`` (also ``python -m keystep.tools.serve.client``): one call to a keystep Triton model, the images
written as PNGs — the example a user copies into their own client.

    keystep request --url 127.0.0.1:8000 --class 3 --seed 0 --out three.png
    keystep request --url 127.0.0.1:8000 --prompt "a handwritten 7" --steps 30 --out seven.png

A request of several classes or prompts is one request of several rows; row i uses seed S + i.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from keystep.runtime.errors import KeystepError


class ClientError(KeystepError, RuntimeError):
    """The server is unreachable, or it answered the request with an error."""


def build_inputs(http, *, prompts=None, negative_prompt=None, class_labels=None, seed=0, steps=None, guidance=None,
                 plan=None, height=None, width=None) -> list:
    """tritonclient InferInputs for one request (rows = prompts or class labels)."""
    rows = len(prompts) if prompts else len(class_labels or [])
    if rows == 0:
        raise ClientError("give --prompt or --class")
    values: dict[str, tuple[np.ndarray, str]] = {}

    def column(value, dtype):
        return np.array(value, dtype=dtype).reshape(rows, 1)

    if prompts:
        values["prompt"] = (column([p.encode() for p in prompts], np.object_), "BYTES")
        if negative_prompt is not None:
            values["negative_prompt"] = (column([negative_prompt.encode()] * rows, np.object_), "BYTES")
    else:
        values["class_label"] = (column(class_labels, np.int64), "INT64")
    values["seed"] = (column([seed + i for i in range(rows)], np.int64), "INT64")
    for name, value, dtype, triton in (("steps", steps, np.int32, "INT32"), ("guidance_scale", guidance, np.float32, "FP32"),
                                       ("height", height, np.int32, "INT32"), ("width", width, np.int32, "INT32")):
        if value is not None:
            values[name] = (column([value] * rows, dtype), triton)
    if plan is not None:
        values["plan"] = (column([plan.encode()] * rows, np.object_), "BYTES")
    inputs = []
    for name, (array, triton) in values.items():
        tensor = http.InferInput(name, list(array.shape), triton)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def request(url: str, model: str = "keystep", timeout: float = 600.0, latents: bool = False, **fields) -> dict:
    """Send one request; returns {"image": (B, H, W, C) uint8, "latents": ...} as the server answered."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    outputs = [http.InferRequestedOutput("image")] + ([http.InferRequestedOutput("latents")] if latents else [])
    try:
        client = http.InferenceServerClient(url, connection_timeout=min(timeout, 60.0), network_timeout=timeout)
    except Exception as exc:  # tritonclient raises several types for a bad URL
        raise ClientError(f"cannot use Triton URL {url!r}: {exc}") from None
    try:
        metadata = client.get_model_metadata(model)
        has_image = any(o["name"] == "image" for o in metadata["outputs"])
        if not has_image:
            outputs = [http.InferRequestedOutput("latents")]
        result = client.infer(model, build_inputs(http, **fields), outputs=outputs, timeout=int(timeout * 1e6))
    except InferenceServerException as exc:
        message = (exc.message() or str(exc)).removeprefix("keystep: ")
        raise ClientError(f"the server refused the request: {message}") from None
    except (ConnectionError, OSError) as exc:
        raise ClientError(f"cannot reach Triton at {url}: {exc}") from None
    finally:
        client.close()
    return {o.name(): result.as_numpy(o.name()) for o in outputs}


def write_pngs(images: np.ndarray, out: Path) -> list[Path]:
    from keystep.tools.cli.generate import image_format, image_paths, write_file
    from PIL import Image

    paths = image_paths(out, len(images))
    for path, image in zip(paths, images):
        picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        write_file(path, lambda f, p=picture, q=path: p.save(f, format=image_format(q)))
    return paths


def add_request_arguments(p, list_flag) -> None:
    p.add_argument("--url", default="127.0.0.1:8000", help="Triton's HTTP endpoint (host:port)")
    p.add_argument("--model", default="keystep", help="the orchestrator model's name")
    list_flag(p, "--prompt", help="prompt(s) (text-to-image); repeatable")
    p.add_argument("--negative-prompt")
    list_flag(p, "--class", dest="class_labels", type=int, help="class label(s) (class-conditional); repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (row i: seed + i)")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--plan", help="all, default, uniform:6, 0,1,2,5, deep0:uniform:3, ...")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--out", default="keystep-request.png", help="image file; several images: NAME-i.png")
    p.add_argument("--save-latents", help="also ask for the latents and write them (.npy)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before the call gives up")


def cmd_request(args) -> int:
    from keystep.tools.cli.generate import check_writable, image_format, write_file

    out = Path(args.out)
    check_writable(out, "--out")
    image_format(out)
    result = request(args.url, args.model, args.timeout, latents=bool(args.save_latents), prompts=args.prompt,
                     negative_prompt=args.negative_prompt, class_labels=args.class_labels, seed=args.seed,
                     steps=args.steps, guidance=args.guidance, plan=args.plan, height=args.height, width=args.width)
    if "image" in result:
        for path in write_pngs(result["image"], out):
            print(f"wrote {path}")
    if args.save_latents:
        write_file(Path(args.save_latents), lambda f: np.save(f, result["latents"]))
        print(f"wrote latents {args.save_latents}")
    return 0


def main(argv=None) -> int:
    from keystep.tools.cli.args import Parser, list_flag

    parser = Parser(prog="python -m keystep.tools.serve.client", description=__doc__.split("\n\n")[0])
    add_request_arguments(parser, list_flag)
    args = parser.parse_args(argv)
    try:
        return cmd_request(args)
    except KeystepError as exc:
        print(f"keystep: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
