"""Outputs are written to a temporary sibling directory and renamed into place: a crash leaves no
half-written checkpoint, and the input checkpoint is never overwritten."""
from __future__ import annotations
from ..errors import PrunekitError

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def check_output_dir(out: str | os.PathLike, inputs: list[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    """Validate an output directory before any work: not an input, and empty unless ``overwrite``."""
    out = Path(out).expanduser().resolve()
    for src in inputs:
        src_path = Path(str(src)).expanduser()
        if src_path.exists() and (src_path.resolve() == out or src_path.resolve() in out.parents
                                  or out in src_path.resolve().parents):
            raise PrunekitError(f"output directory {str(out)!r} overlaps the input {str(src)!r}; "
                             "choose another --out (prunekit never overwrites its input)")
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"output path {str(out)!r} is a file; give a directory for --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PrunekitError(f"output directory {str(out)!r} is not empty; pass --overwrite or choose another --out")
    return out


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it, then restore it at once
    os.umask(mask)
    return mask


def _as_if_created(path: Path, mode: int, umask: int | None = None) -> None:
    """``mkdtemp``/``mkstemp`` (and safetensors' writer) create owner-only (0700/0600) entries; give the final
    output the permissions a plain ``mkdir``/``open`` would have (``mode`` less the umask), so others can read a
    shared checkpoint."""
    os.chmod(path, mode & ~(_umask() if umask is None else umask))


def _as_if_created_tree(root: Path) -> None:
    """``_as_if_created`` for a directory we just wrote and everything in it."""
    umask = _umask()
    for folder, _, files in os.walk(root):
        _as_if_created(Path(folder), 0o777, umask)
        for name in files:
            _as_if_created(Path(folder) / name, 0o666, umask)


@contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success it replaces ``out``, on error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _as_if_created_tree(tmp)
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(backup / "old")
            tmp.rename(out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
        _as_if_created(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
