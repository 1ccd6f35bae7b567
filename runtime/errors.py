"""The base of every error keystep raises for bad input or an unusable environment.

Each subclass (BundleError, PlanError, SamplingError, RequestError, BackendError, ...) carries a one-line message that
names the problem and, where there is one, the file and field or the argument. The CLI prints it as
``keystep: error: ...`` (exit 2), the Python API raises it, the Triton model answers the request with it and keeps
serving. Anything else that escapes is a keystep bug.
"""


class KeystepError(Exception):
    """Bad input or an unusable environment, with a message meant for the user."""
