"""A real ``tritonserver`` process on a model repository: find the binary, prepare its Python backend, start it,
wait until it is ready, stop it.

Where the binary comes from, in order: ``--tritonserver PATH``, ``$TRITONSERVER``, the ``nvidia-pytriton`` wheel
(``pip install --no-deps nvidia-pytriton==0.7.0``: server 2.51 with its Python backend and a stub per Python
version), or ``tritonserver`` on PATH (the NGC container: ``/opt/tritonserver``).

The Python backend's stub links ``libpython3.X.so`` by soname; with a pyenv (or any non-system) interpreter the
dynamic loader would find the system's libpython first and the stub fails at import. ``LD_LIBRARY_PATH`` therefore
starts with the running interpreter's ``LIBDIR``, then the wheel's bundled libraries.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

from keystep.runtime.errors import KeystepError

STUB = "triton_python_backend_stub"


class ServerError(KeystepError, RuntimeError):
    """No usable tritonserver here, or it failed to start."""


@dataclass(frozen=True)
class TritonBinary:
    server: Path
    python_backend: Path  # the directory holding libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # the Python-backend stub for this interpreter's Python version
    libraries: tuple[Path, ...] = ()  # more LD_LIBRARY_PATH entries (the wheel's bundled shared libraries)
    source: str = ""

    def describe(self) -> str:
        return f"{self.server} ({self.source}); Python backend {self.python_backend}; stub {self.stub}"


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _from_pytriton() -> TritonBinary | None:
    spec = find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    stub = root / "python_backend_stubs" / _python_version() / STUB
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return TritonBinary(root / "bin" / "tritonserver", root / "backends" / "python", stub,
                        (libs,) if libs.is_dir() else (), "nvidia-pytriton wheel")


def _from_install(server: Path, source: str) -> TritonBinary:
    """A standard Triton install: bin/tritonserver next to backends/python (its stub built for its Python)."""
    root = server.resolve().parent.parent
    backend = root / "backends" / "python"
    return TritonBinary(server, backend, backend / STUB, (), source)


def find_tritonserver(explicit: str | None = None) -> TritonBinary:
    """The binary to run, or a ServerError that says what was looked for and how to get one."""
    tried = []
    candidates = []
    if explicit:
        candidates.append(lambda: _from_install(Path(explicit), "--tritonserver"))
    elif os.environ.get("TRITONSERVER"):
        candidates.append(lambda: _from_install(Path(os.environ["TRITONSERVER"]), "$TRITONSERVER"))
    else:
        candidates.append(_from_pytriton)
        which = shutil.which("tritonserver")
        if which:
            candidates.append(lambda: _from_install(Path(which), "PATH"))
    for make in candidates:
        binary = make()
        if binary is None:
            tried.append("the nvidia-pytriton wheel: not installed")
            continue
        problems = [f"{p} is missing" for p in (binary.server, binary.python_backend / "libtriton_python.so",
                                                  binary.stub) if not p.exists()]
        if not problems:
            return binary
        tried.append(f"{binary.source}: " + "; ".join(problems))
    if not candidates or (not explicit and not os.environ.get("TRITONSERVER") and len(tried) == 1):
        tried.append("tritonserver on PATH: not found")
    raise ServerError("no usable tritonserver: " + "; ".join(tried) + ". Install one with "
                      "`pip install --no-deps nvidia-pytriton==0.7.0`, or give --tritonserver PATH / $TRITONSERVER "
                      "(e.g. /opt/tritonserver/bin/tritonserver in the NGC container)")


def cache_dir() -> Path:
    return Path(os.environ.get("KEYSTEP_CACHE") or Path.home() / ".cache" / "keystep")


def stub_predates_numpy2(binary: TritonBinary) -> bool:
    """The stub's pybind11 imports ``numpy.core.multiarray`` (pybind11 < 2.12, python_backend < r24.11): it misreads
    NumPy 2 arrays (0-byte tensors, inputs read as their first element), silently."""
    data = binary.stub.read_bytes()
    return b"numpy.core.multiarray" in data and b"numpy._core.multiarray" not in data


def stub_environment(binary: TritonBinary, progress=print) -> Path | None:
    """None when the stub works with this interpreter's NumPy; otherwise a venv of this Python with ``numpy<2``
    (its other packages from the base interpreter's site-packages, keystep's from the models' ``site_dirs``) for
    the Python backend's EXECUTION_ENV_PATH, made once under the cache directory."""
    import numpy

    if not stub_predates_numpy2(binary) or int(numpy.__version__.split(".")[0]) < 2:
        return None
    env = cache_dir() / f"triton-stub-env-py{_python_version()}-numpy1"
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(env.parent / f".{env.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one maker at a time; the others then find it complete
        if (env / ".complete").is_file():
            return env
        progress(f"the Triton Python backend here predates NumPy 2: making its environment (numpy<2) in {env}")
        shutil.rmtree(env, ignore_errors=True)
        try:
            for command in ([sys.executable, "-m", "venv", "--system-site-packages", str(env)],
                            [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "numpy<2"]):
                subprocess.run(command, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            shutil.rmtree(env, ignore_errors=True)
            raise ServerError(f"cannot make the stub environment {env}: "
                              f"{(exc.stderr or exc.stdout or '').strip()[-300:]}") from None
        (env / ".complete").write_text("numpy<2 for the Triton Python-backend stub\n")
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def library_path(binary: TritonBinary) -> str:
    """The interpreter's libpython first (see the module docstring), then the binary's own libraries."""
    parts = [sysconfig.get_config_var("LIBDIR") or "", *map(str, binary.libraries),
             os.environ.get("LD_LIBRARY_PATH", "")]
    return ":".join(p for p in parts if p)


@dataclass
class TritonServer:
    """``with TritonServer(repo) as server: ...`` — a tritonserver on 127.0.0.1 with free ports, stopped on exit."""

    repository: Path
    binary: TritonBinary | None = None
    host: str = "127.0.0.1"
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    log_path: Path | None = None
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen | None = field(default=None, init=False)
    _workdir: Path | None = field(default=None, init=False)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, backend_dir: Path) -> list[str]:
        return [str(self.binary.server), f"--model-repository={self.repository}", f"--backend-directory={backend_dir}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                "--disable-auto-complete-config", "--exit-on-error=true", "--strict-readiness=true",
                "--exit-timeout-secs=10",
                *self.extra_args]

    def start(self, timeout: float = 180.0) -> "TritonServer":
        self.binary = self.binary or find_tritonserver()
        for name in ("http_port", "grpc_port", "metrics_port"):
            if not getattr(self, name):
                setattr(self, name, free_port(self.host))
        self._workdir = Path(tempfile.mkdtemp(prefix="keystep-triton-"))
        backend_dir = self._workdir / "backends"
        # the Python backend as Triton expects it: libtriton_python.so, its utils and the stub in one directory
        shutil.copytree(self.binary.python_backend, backend_dir / "python",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(self.binary.stub, backend_dir / "python" / STUB)
        self.log_path = self.log_path or self._workdir / "tritonserver.log"
        env = {**os.environ, "LD_LIBRARY_PATH": library_path(self.binary)}
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(self.command(backend_dir), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        self.wait_ready(timeout)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting: "
                                  f"{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 8) -> str:
        if not self.log_path or not self.log_path.is_file():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        wanted = [line for line in text if "E1" in line[:3] or "error" in line.lower()] or text
        return " | ".join(wanted[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGINT (Triton's graceful shutdown: in-flight requests finish), then SIGKILL after ``timeout``."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGINT)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        if self._workdir is not None:  # the backend copy; the log stays for whoever wants to read it
            shutil.rmtree(self._workdir / "backends", ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def check_report(explicit: str | None = None) -> tuple[bool, str]:
    """``keystep serve --check``: whether a server binary is usable here, and why not."""
    try:
        binary = find_tritonserver(explicit)
    except ServerError as exc:
        return False, str(exc)
    try:
        from tritonclient.grpc import model_config_pb2  # noqa: F401
    except ImportError:
        return False, f"tritonserver found ({binary.describe()}) but tritonclient is missing: pip install " \
                      f"'tritonclient[http,grpc]'"
    return True, f"tritonserver: {binary.describe()}; LD_LIBRARY_PATH for the stub: {library_path(binary)}"
