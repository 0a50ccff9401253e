"""Paths the user gives us: is it local or a hub name, does it exist, may we write there, and do the
outputs stay clear of the inputs. Every check raises ``PrunekitError`` before any loading, so a typo
costs a second, not a model load or a minute of hub retries."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from ..errors import PrunekitError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
# Hub repo ids: ``name`` or ``org/name`` of letters, digits, ``-``, ``_``, ``.`` (no ``--`` or ``..``).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
# Suffixes of files, never of hub ids: ``calib.txt`` is a missing file, not a dataset name.
FILE_SUFFIXES = {
    ".txt",
    ".json",
    ".jsonl",
    ".csv",
    ".parquet",
    ".arrow",
    ".yaml",
    ".yml",
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".gz",
    ".bz2",
    ".xz",
    ".zst",
    ".zip",
    ".tar",
    ".jpg",
    ".jpeg",
    ".png",
}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_DATASETS_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


# ------------------------------------------------------------------ local or hub


def is_hub_id(text: str) -> bool:
    """Whether ``text`` could name a hub repo (``gpt2``, ``org/name``); a ``:config`` suffix is ignored."""
    name = text.partition(":")[0]
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and "--" not in name


def looks_local(source: PathLike) -> bool:
    """Whether the user means a file or directory rather than a hub name: it exists, it is written like a
    path (``./``, ``/``, ``~``, a file suffix, more than one ``/``), it cannot be a hub id, or its folder
    exists here (``runs/pruned`` beside an existing ``runs/``)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists() or text.startswith((".", "/", "~")) or path.suffix.lower() in FILE_SUFFIXES:
        return True
    if not is_hub_id(text):
        return True
    return "/" in text and path.parent.is_dir()


def require_local(path: PathLike, what: str, fix: str = "") -> Path:
    """``path`` (user home expanded) when it exists; else one line naming ``what`` is missing and the fix."""
    resolved = Path(str(path)).expanduser()
    if not resolved.exists():
        hint = f"; {fix}" if fix else ""
        raise PrunekitError(f"{what} {str(path)!r} does not exist{hint}")
    return resolved


# ------------------------------------------------------------------ the hub, offline and unreachable


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline(datasets: bool = False) -> bool:
    """Whether the user switched the hub off (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, or for
    datasets ``HF_DATASETS_OFFLINE``), read now rather than at import like the HF libraries do."""
    return any(_env_true(v) for v in (_DATASETS_OFFLINE_VARS if datasets else _OFFLINE_VARS))


def _hub_address() -> tuple[str, int]:
    """Where a download would connect first: the HTTPS proxy when one is set, else the hub endpoint."""
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(var):
            url = urlparse(os.environ[var] if "://" in os.environ[var] else f"http://{os.environ[var]}")
            return url.hostname or "", url.port or 80
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub (or proxy) within ``timeout`` seconds: a lost network is reported at
    once instead of after the HF libraries' minute of retries. Runs in a thread, as DNS has no timeout."""
    host, port = _hub_address()
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def require_hub(name: str, what: str, cached: bool, datasets: bool = False) -> bool:
    """Check that hub name ``name`` can be had now; return True when it must be read from the cache only.

    Offline (``HF_HUB_OFFLINE`` ...) and not cached, or the hub unreachable and not cached, is one line
    at once. Reachable: False (download or refresh as usual)."""
    var = "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE" if datasets else "HF_HUB_OFFLINE"
    if hub_offline(datasets):
        if not cached:
            raise PrunekitError(
                f"{what} {name!r} is not a local path and not in the Hugging Face cache, and {var} "
                f"is set; give an existing local path, or unset {var} to download it"
            )
        return True
    if hub_reachable():
        return False
    if cached:
        log.warning(
            "%s cannot be reached; using the cached %s %r (set %s=1 to skip this check)",
            "{}:{}".format(*_hub_address()),
            what,
            name,
            var.split("/")[0],
        )
        return True
    raise PrunekitError(
        f"{what} {name!r} is not a local path, and the Hugging Face hub cannot be reached to "
        "download it (no network?); give an existing local path, or download it first"
    )


# ------------------------------------------------------------------ inputs are sacred


def _real(path: PathLike) -> Path:
    return Path(os.path.realpath(Path(str(path)).expanduser()))


def _relation(out: Path, inp: Path) -> str | None:
    """How resolved output ``out`` overlaps resolved input ``inp``, or None when it does not."""
    if out == inp or (out.exists() and os.path.samefile(out, inp)):
        return "is"
    if inp.is_relative_to(out):
        return "contains"
    if out.is_relative_to(inp):
        return "is inside"
    return None


def check_paths(outputs: Mapping[str, PathLike | None], inputs: Mapping[str, PathLike | None]) -> None:
    """No output equals, contains or sits inside an existing input (symlinks followed), and no output sits
    inside or equals another: an overwrite can then never delete or change what the run reads. Keys are
    the flags (``--out``, ``--json``, ``--model``, ``--calib-data``) the messages name; None values are
    skipped, and inputs that do not exist (hub names) cannot overlap."""
    outs = {name: _real(p) for name, p in outputs.items() if p is not None and str(p) != ""}
    ins = {name: _real(p) for name, p in inputs.items() if p is not None and str(p) != "" and _real(p).exists()}
    for out_name, out in outs.items():
        for in_name, inp in ins.items():
            relation = _relation(out, inp)
            if relation:
                raise PrunekitError(
                    f"{out_name} {str(out)!r} overlaps the input {in_name} (it {relation} "
                    f"{str(inp)!r}); choose another {out_name}: prunekit never writes over its inputs"
                )
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            _check_two_outputs(a, outs[a], b, outs[b])


def _check_two_outputs(a: str, path_a: Path, b: str, path_b: Path) -> None:
    if path_a == path_b:
        raise PrunekitError(f"{a} and {b} are the same path {str(path_a)!r}; give them different paths")
    for inner_name, inner, outer_name, outer in ((a, path_a, b, path_b), (b, path_b, a, path_a)):
        if inner.is_relative_to(outer):
            raise PrunekitError(
                f"{inner_name} {str(inner)!r} is inside {outer_name} {str(outer)!r}, which is "
                f"replaced as a whole at the end; put {inner_name} outside it"
            )


# ------------------------------------------------------------------ writable before any work


def _existing_ancestor(path: Path) -> Path:
    """The nearest part of ``path`` (itself included) that exists: where a write would create the rest."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _can_write_in(folder: Path) -> bool:
    """``os.access`` semantics (root passes unless the file system is read-only): create entries in ``folder``."""
    return os.access(folder, os.W_OK | os.X_OK)


def check_dir_writable(path: PathLike, name: str = "--out") -> Path:
    """The output directory ``path`` can be created or replaced: it is not a file, and the folder it goes
    in is (or can be created inside) a writable directory. Returns the resolved path."""
    out = _real(path)
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"{name} {str(path)!r} is a file; give a directory path for {name}")
    _check_parent(out, path, name)
    return out


def check_file_writable(path: PathLike, name: str = "--json") -> Path:
    """The output file ``path`` can be (re)written by a rename into its folder: not a directory, and its
    folder is (or can be created inside) a writable directory. Returns the resolved path."""
    out = _real(path)
    if out.is_dir():
        raise PrunekitError(
            f"{name} {str(path)!r} is a directory; give a file path for {name}, e.g. "
            f"{str(Path(str(path)) / 'report.json')!r}"
        )
    _check_parent(out, path, name)
    return out


def _check_parent(out: Path, given: PathLike, name: str) -> None:
    base = _existing_ancestor(out.parent)
    if not base.is_dir():
        raise PrunekitError(
            f"{name} {str(given)!r} cannot be created: {str(base)!r} is a file, not a directory; choose another {name}"
        )
    if not _can_write_in(base):
        raise PrunekitError(
            f"{name} {str(given)!r} cannot be written: {str(base)!r} is not writable (read-only "
            f"or no permission); choose another {name}"
        )


def check_free_space(path: PathLike, expected_bytes: int | None, name: str = "--out") -> bool:
    """Warn (not fail: estimates are rough) when the disk ``path`` goes on has less free space than
    ``expected_bytes``; True when it fits or nothing is expected."""
    if not expected_bytes:
        return True
    base = _existing_ancestor(_real(path))
    free = shutil.disk_usage(base).free
    if free >= expected_bytes:
        return True
    log.warning(
        "%s %s: about %.2f GB free on its disk, the output needs about %.2f GB; free some space or choose another %s",
        name,
        path,
        free / 1e9,
        expected_bytes / 1e9,
        name,
    )
    return False


def checkpoint_bytes(path: PathLike) -> int | None:
    """The size of the weight files in a local checkpoint directory (a pruned dense copy needs as much),
    or None for hub names and paths without weight files."""
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        return None
    sizes = [f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    return sum(sizes) or None


def local_path(source: str | os.PathLike) -> Path | None:
    """The local directory a model source reads from (``local-dir:PATH`` or ``PATH``), for the check that an
    output directory never overlaps its input; None for registry, hub and torchvision names."""
    text = str(source)
    if text.startswith("local-dir:"):
        return Path(text[len("local-dir:") :]).expanduser()
    if text.startswith(("timm:", "torchvision:", "hf-hub:")):
        return None
    return Path(text).expanduser()
