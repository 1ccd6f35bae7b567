"""keystep: a deployment compiler for diffusion models.

The embedded runtime (numpy + a backend; no torch)::

    import keystep
    pipe = keystep.load("BUNDLE")                                  # backend="onnxruntime" | "openvino" | "tensorrt" ...
    out = pipe(prompt="a handwritten 7", num_inference_steps=50)   # text-to-image bundles
    out = pipe(class_labels=[3], seed=0, key_steps="uniform:6")    # class-conditional DiT bundles
    out.images[0].save("out.png")

Bad input raises :class:`keystep.KeystepError` with a one-line message naming the argument or the file and field.
"""

from keystep.runtime.errors import KeystepError


def load(bundle, backend="onnxruntime", **options):
    """Load a bundle onto a backend; returns a :class:`keystep.runtime.pipeline.Pipeline` (see its ``__call__``)."""
    from keystep.runtime.pipeline import load as _load

    return _load(bundle, backend, **options)


def __getattr__(name):  # Pipeline / PipelineOutput without importing numpy and the backends at ``import keystep``
    if name in ("Pipeline", "PipelineOutput"):
        from keystep.runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'keystep' has no attribute {name!r}")


__all__ = ["KeystepError", "load", "Pipeline", "PipelineOutput"]
