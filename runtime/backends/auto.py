"""``--backend auto``: the fastest CPU backend and precision for the CPU this process runs on.

The choice follows what docs/benchmarks.md measured ("Which CPU backend"): on a CPU with native bf16 arithmetic
(``amx_bf16`` or ``avx512_bf16`` in /proc/cpuinfo, and OpenVINO's CPU plugin reporting ``BF16``), OpenVINO with bf16
inference precision is 2x (Zen 4) to 3.5x (AMX Xeon) faster than any fp32 backend; without it, OpenVINO f32 was the
faster fp32 backend in every row measured (1.0-1.2x ONNX Runtime), and ONNX Runtime (always installed) is the
fallback when OpenVINO is not. bf16 is never chosen where the CPU would emulate it. GPU backends are never chosen automatically:
they need engines built for the GPU first (``keystep engines``) — name them.

``KEYSTEP_BACKEND`` (e.g. ``onnxruntime``, ``openvino``, ``auto``) replaces ``auto`` as the default backend of every
entry point (CLI, ``keystep.load``, Triton models) for a deployment that pins one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# CPU flags (Linux /proc/cpuinfo names) of native bf16 dot products: AMX tiles (Sapphire Rapids+) and AVX512-BF16
# (Cooper Lake, Zen 4+). OpenVINO's CPU plugin also lists BF16 on some CPUs without them (emulated), hence both checks.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
ENVIRONMENT = "KEYSTEP_BACKEND"


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # a registered backend name
    precision: str | None  # openvino's inference precision; None for backends that run the graph's own types
    reason: str  # one line: why this one, for `keystep inspect` / `profile`

    def describe(self) -> str:
        return f"{self.backend}{' ' + self.precision if self.precision else ''} ({self.reason})"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is unreadable, e.g. not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def choose_cpu_backend(flags: set[str], openvino_capabilities: list[str] | None,
                       precision: str | None = None) -> BackendChoice:
    """The choice for a CPU with these ``flags`` and OpenVINO CPU capabilities (None: openvino not installed).
    ``precision="f32"`` restricts it to fp32; ``"bf16"`` demands bf16 (OpenVINO then refuses a CPU without it)."""
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if openvino_capabilities is None:
        if precision == "bf16":
            return BackendChoice("openvino", "bf16", "bf16 asked for")  # the backend says openvino is missing
        why = "openvino is not installed (pip install 'keystep[openvino]')"
        return BackendChoice("onnxruntime", None, why + (f"; this CPU has native bf16 ({native[0]})" if native else ""))
    has_bf16 = bool(native) and "BF16" in openvino_capabilities
    if precision == "bf16" or (precision is None and has_bf16):
        return BackendChoice("openvino", "bf16", f"native bf16: {native[0]}" if has_bf16 else "bf16 asked for")
    if precision == "f32":
        return BackendChoice("openvino", "f32", "fp32 asked for")
    return BackendChoice("openvino", "f32", "no native bf16 on this CPU (no amx_bf16/avx512_bf16): the faster "
                         "fp32 backend")


def auto_choice(precision: str | None = None) -> BackendChoice:
    """The choice for this machine."""
    from .openvino import openvino_capabilities

    return choose_cpu_backend(cpu_flags(), openvino_capabilities(), precision)


def default_backend_name() -> str:
    """What a caller who names no backend gets: ``$KEYSTEP_BACKEND`` or ``auto``."""
    return os.environ.get(ENVIRONMENT, "").strip() or "auto"
