"""What runs inside a Triton Inference Server (Python backend): numpy + keystep's runtime, no torch.

* :mod:`.codec` — the request/response contract tritonclient users see (input and output tensor names and types),
  decoding into the Python API's validated requests, and merging compatible requests into one sampling run.
* :mod:`.orchestrator` — the ``keystep`` model: runs the bundle's plan executor unchanged, with its stage calls either
  in-process (keystep's ONNX Runtime / OpenVINO backend) or as BLS requests to the repository's stage models.
* :mod:`.stage` — a Python-backend stage model (the ``python`` flavour): one bundle stage, with Triton's dynamic
  batching merging concurrent requests' calls into one run.

``keystep triton BUNDLE --out REPO`` writes the repository (:mod:`keystep.tools.serve.repository`).
"""
