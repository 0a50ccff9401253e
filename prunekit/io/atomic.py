"""Outputs are exclusive and atomic, and never touch an input.

A run claims its output directory at the start (``claim_output``): a lock file beside it,
``.NAME.lock``, holds the run's pid, host, start time and command line until the final rename, so a
second run on the same ``out`` fails at once and names the first. The run writes into
``.NAME.tmp-PID-RANDOM`` and renames it into place at the end, only if ``out`` is still what it was at
the claim: at any moment ``out`` is absent, the complete previous output or the complete new one, and
never someone else's directory. Temporaries of a killed run are recognised by name and removed by the
next run that claims the same ``out``.

Liveness comes from ``flock`` (the kernel drops it when the holder dies, whatever happened to its pid);
where the file system has no ``flock``, from the pid in the lock file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PrunekitError
from .paths import PathLike, check_dir_writable, check_free_space, check_paths

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: liveness from the pid in the lock file
    fcntl = None

log = logging.getLogger(__name__)

FRESH_LOCK_S = 10.0  # an empty lock file younger than this is a run writing its details right now


# ------------------------------------------------------------------ names next to the output


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def temp_path(out: Path) -> Path:
    """A new temporary's name: recognisably ours (``.NAME.tmp-PID-RANDOM``), unique, beside ``out``."""
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def stale_temps(out: Path) -> list[Path]:
    """The temporaries of earlier runs on ``out`` (any pid but ours): under the lock none is being written."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.tmp-(\d+)-[0-9a-f]+")
    if not out.parent.is_dir():
        return []
    found = (pattern.fullmatch(p.name) for p in out.parent.iterdir())
    return [out.parent / m.group(0) for m in found if m and int(m.group(1)) != os.getpid()]


def _identity(path: Path) -> tuple[int, int, int, bool] | None:
    """What ``path`` is now (device, inode, mtime, is-dir), None when absent: a later rename may replace
    ``out`` only if this is unchanged since the claim."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, os.path.isdir(path) and not os.path.islink(path)


# ------------------------------------------------------------------ who holds a lock


@dataclass(frozen=True)
class Holder:
    """The run named in a lock file."""

    pid: int = 0
    host: str = ""
    started: str = ""
    command: str = ""

    @classmethod
    def me(cls) -> Holder:
        return cls(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S"), " ".join(sys.argv)[:500])

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            data = json.loads(text)
            return cls(int(data["pid"]), str(data["host"]), str(data["started"]), str(data.get("command", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}" + (f": {self.command}" if self.command else "")

    def alive(self) -> bool:
        """Whether the run may still be going: another host's pids cannot be checked, so they count as alive."""
        return self.host != socket.gethostname() or pid_alive(self.pid)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


# ------------------------------------------------------------------ taking and releasing the lock


def _flock(fd: int, wait: bool = False) -> bool | None:
    """Try an exclusive flock: True taken, False held by a live process, None when unsupported here."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return False
        return None  # ENOLCK / EOPNOTSUPP / ENOSYS: e.g. Lustre without -o flock


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 65536).decode("utf-8", "replace")


def _write(fd: int, holder: Holder) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(asdict(holder)) + "\n").encode())


def _stale(fd: int, locked: bool | None) -> tuple[bool, Holder | None]:
    """Whether the lock file open at ``fd`` belongs to a run that is gone, and that run (None if unnamed)."""
    holder = Holder.parse(_read(fd))
    if holder is None:  # being written this instant, or its writer died at once
        return time.time() - os.fstat(fd).st_mtime > FRESH_LOCK_S, None
    if holder.host != socket.gethostname():
        return False, holder  # flock may not reach across hosts: never take another host's lock
    return (True if locked else not holder.alive()), holder


def _busy(out: Path, lock: Path, holder: Holder | None, name: str) -> PrunekitError:
    who = holder.describe() if holder else "a run that is starting now"
    gone = "" if holder is None or holder.host == socket.gethostname() else f"; if it is gone, delete {str(lock)!r}"
    return PrunekitError(
        f"{name} {str(out)!r} is being written by another prunekit run ({who}); wait for it or "
        f"choose another {name}{gone}"
    )


def _create(lock: Path, me: Holder) -> int | None:
    """Create the lock file, lock it and write ``me`` into it; None when it exists already."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    _flock(fd, wait=True)  # others only peek at a new file (and see it empty, so busy): this is brief
    _write(fd, me)
    return fd


def acquire_lock(out: Path, name: str = "--out") -> int:
    """An open fd that holds the lock on ``out``; a lock left by a dead run is taken over with a warning.
    Raises ``PrunekitError`` naming the holder when a live run has it."""
    lock, me = lock_path(out), Holder.me()
    for _ in range(50):  # more than one round only while other runs release or take over at the same time
        fd = _create(lock, me)
        if fd is None:
            fd = _take_over(out, lock, me, name)
        if fd is not None:
            return fd
    raise PrunekitError(f"could not lock {name} {str(out)!r}: other runs keep taking it; try again")


def _take_over(out: Path, lock: Path, me: Holder, name: str) -> int | None:
    """The lock file exists: raise if its run is alive, take it over if gone, None to try again."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return None  # released meanwhile
    try:
        locked = _flock(fd)
        if locked is not False and not _same_file(fd, lock):
            return None  # we locked a file another run just released or replaced
        stale, holder = _stale(fd, locked) if locked is not False else (False, Holder.parse(_read(fd)))
        if not stale:
            raise _busy(out, lock, holder, name)
        log.warning(
            "taking over the lock on %s from a prunekit run that is gone (%s)",
            out,
            holder.describe() if holder else "unnamed",
        )
        lock.unlink(missing_ok=True)  # while holding the old file's flock, so no third run can decide the same
        return _create(lock, me)
    finally:
        os.close(fd)


def release_lock(out: Path, fd: int) -> None:
    """Remove the lock file (only if it is still ours) and drop the lock."""
    try:
        if _same_file(fd, lock_path(out)):
            os.unlink(lock_path(out))
    finally:
        os.close(fd)


# ------------------------------------------------------------------ the claim


@dataclass
class OutputClaim:
    """``out`` held exclusively by this run, and what it was when claimed (its identity, None if absent).

    ``staging()`` yields a temporary directory that replaces ``out`` on success, only if ``out`` is
    unchanged since the claim."""

    out: Path
    fd: int
    identity: tuple | None
    name: str = "--out"
    temps: list[Path] = field(default_factory=list)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh ``.NAME.tmp-PID-RANDOM`` directory: renamed onto ``out`` on success, removed on error."""
        tmp = temp_path(self.out)
        tmp.mkdir(mode=0o700)
        self.temps.append(tmp)
        try:
            yield tmp
            _as_if_created_tree(tmp)
            self.commit(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful commit

    def commit(self, tmp: Path) -> None:
        """Rename ``tmp`` onto ``out``; the previous ``out`` (if claimed) is removed only after that.
        If ``out`` changed since the claim, keep ``tmp`` as a sibling and raise."""
        if _identity(self.out) != self.identity:
            kept = _keep(tmp, self.out)
            raise PrunekitError(
                f"{self.name} {str(self.out)!r} was created or changed by something else while this "
                f"run held it; the new output is kept in {str(kept)!r}: move it where you want it"
            )
        backup = None
        if self.identity is not None:
            backup = temp_path(self.out)  # a recognisable name: removed by a later run if we die right here
            os.rename(self.out, backup)
        try:
            os.rename(tmp, self.out)
        except OSError as err:
            kept = _keep(tmp, self.out)
            raise PrunekitError(
                f"could not move the new output into {str(self.out)!r} ({err.strerror}); it is "
                f"kept in {str(kept)!r}" + (f", the previous one in {str(_keep(backup, self.out))!r}" if backup else "")
            ) from err
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


def _keep(path: Path, out: Path) -> Path:
    """Move ``path`` to a visible sibling of ``out`` that no cleanup removes, and return it."""
    kept = out.parent / f"{out.name}.prunekit-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(2)}"
    os.rename(path, kept)
    return kept


def _check_out_state(out: Path, overwrite: bool, name: str) -> None:
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"{name} {str(out)!r} is a file; give a directory path for {name}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PrunekitError(
            f"{name} {str(out)!r} is not empty; pass --overwrite (it is replaced at the end, "
            f"atomically) or choose another {name}"
        )


def _remove_stale_temps(out: Path) -> None:
    for path in stale_temps(out):
        log.warning("removing %s, left behind by an interrupted run", path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextmanager
def claim_output(
    out: PathLike,
    inputs: Mapping[str, PathLike | None] | None = None,
    overwrite: bool = False,
    expected_bytes: int | None = None,
    name: str = "--out",
) -> Iterator[OutputClaim]:
    """Claim output directory ``out`` for the length of the block, before any loading or work.

    Checks (``PrunekitError``): ``out`` overlaps no input (``inputs``: flag -> path, see ``check_paths``),
    its folder is writable, it is not a file, and it is empty unless ``overwrite``; no live run holds it.
    Warns when the disk has less than ``expected_bytes`` free. Removes temporaries of dead runs. Use
    ``claim.staging()`` (or ``atomic_dir(out, claim)``) to write the output at the end."""
    check_paths({name: out}, dict(inputs or {}))
    path = check_dir_writable(out, name)
    if path == path.parent:
        raise PrunekitError(f"{name} {str(out)!r} is a file system root; give a directory inside it")
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path, expected_bytes, name)
    fd = acquire_lock(path, name)
    try:
        _check_out_state(path, overwrite, name)
        _remove_stale_temps(path)
        yield OutputClaim(path, fd, _identity(path), name)
    finally:
        release_lock(path, fd)


@contextmanager
def claim_on_writer(
    out: PathLike,
    inputs: Mapping[str, PathLike | None] | None = None,
    overwrite: bool = False,
    expected_bytes: int | None = None,
    name: str = "--out",
) -> Iterator[OutputClaim | None]:
    """``claim_output`` on the one rank that writes (rank 0 of a torch.distributed run; the only process otherwise).
    The other ranks get None, never touch ``out``, and stop with the writer when its claim fails."""
    from .. import distributed as dist

    if not dist.is_writer():
        dist.agree()
        yield None
        return
    with ExitStack() as stack:
        with dist.together():
            claim = stack.enter_context(claim_output(out, inputs, overwrite, expected_bytes, name))
        yield claim


def check_output_dir(out: PathLike, inputs: list[PathLike] = (), overwrite: bool = False) -> Path:
    """Validate an output directory before any work: not an input, writable, empty unless ``overwrite``.
    (``claim_output`` does this and holds ``out`` until the end; prefer it.)"""
    check_paths({"--out": out}, {str(p): p for p in inputs if p is not None})
    path = check_dir_writable(out)
    _check_out_state(path, overwrite, "--out")
    return path


# ------------------------------------------------------------------ permissions and writing


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
def atomic_dir(out: PathLike, claim: OutputClaim | None = None) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success it replaces ``out``, on error it is removed.

    With the ``claim`` taken at the start of the run, ``out`` is replaced only if unchanged since then.
    Without one, ``out`` is claimed here (other runs are kept out from now on) and whatever is there now
    is replaced, as callers that checked it with ``check_output_dir`` expect."""
    if claim is not None:
        if Path(os.path.realpath(Path(str(out)).expanduser())) != claim.out:
            raise ValueError(f"atomic_dir({str(out)!r}) was given the claim on {str(claim.out)!r}")
        with claim.staging() as tmp:
            yield tmp
        return
    with claim_output(out, overwrite=True) as own, own.staging() as tmp:
        yield tmp


def write_text(path: PathLike, text: str) -> None:
    """Write a text file atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        _as_if_created(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: PathLike, data: Any) -> None:
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
