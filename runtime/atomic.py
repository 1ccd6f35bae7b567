"""Files and directories written whole or not at all: a temp sibling, then a rename (POSIX rename is atomic)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def write_atomic(path: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """``data`` (bytes, or a function writing to a binary file) into ``path``; a failure leaves ``path`` as it was."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_directory(tmp: Path, out: Path) -> None:
    """Move a finished directory ``tmp`` to ``out``, replacing a previous ``out`` (renamed aside, then removed)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
