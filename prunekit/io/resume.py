"""Runs that resume: the progress of a block-by-block run kept beside its output, so that a killed run continues
where it stopped and writes exactly what an uninterrupted run writes.

After each finished block the run keeps, in ``.NAME.resume`` beside ``--out`` (under the run's claim on ``--out``):

* ``progress.json``: the last finished block, each layer's target (an OWL allocation is not recomputed), what the
  run was started with (settings, inputs, versions, number of ranks) and, with ``--lazy``, the output shards
  written so far and the report's rows;
* the pruned blocks: in memory ``block-00003.safetensors``; with ``--lazy`` the output shards themselves, which
  are written here and moved into the output at the end;
* the next block's calibration inputs, one folder per rank (``inputs-00004-r000/``): each rank writes its own.

Every file is fsynced before ``progress.json`` names it, and ``progress.json`` is replaced atomically and last,
so a run killed at any moment leaves a state that is consistent (at worst one block behind). A new run on the
same ``--out`` resumes it when its settings, inputs (paths, sizes, modification times), versions and number of
ranks are the ones it started with, and says so; it refuses with one line naming the difference otherwise
(``--no-resume`` discards the state instead). The state is removed when the output is complete, and when a run
fails with an error rather than being interrupted (Ctrl-C, SIGTERM, SIGKILL): a failed run leaves nothing
behind, as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import distributed as dist
from ..errors import PrunekitError

log = logging.getLogger(__name__)

STATE_VERSION = 1
PROGRESS = "progress.json"
# Settings that do not change what a run computes: a resumed run may differ in them.
UNCHECKED = frozenset({"resume", "overwrite", "report_json", "dist_timeout"})
KEPT: Path | None = None  # the state a failed run leaves for the next one (the CLI names it)


def state_path(out: str | os.PathLike) -> Path:
    out = Path(os.path.realpath(Path(out).expanduser()))
    return out.parent / f".{out.name}.resume"


# ---------------------------------------------------------------- what a run was started with


def identity(value: Any) -> Any:
    """A comparable description of an input: a local file's size and modification time, a local folder's files'
    (recursively), a tensor's SHA-256, plain data as it is; anything else by its type alone."""
    if isinstance(value, (str, os.PathLike)) and Path(value).expanduser().exists():
        path = Path(value).expanduser()
        if path.is_file():
            stat = path.stat()
            return [stat.st_size, stat.st_mtime_ns]
        return {str(p.relative_to(path)): identity(p) for p in sorted(path.rglob("*")) if p.is_file()}
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        return (
            f"{data.dtype}{list(data.shape)}:{hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy()).hexdigest()}"
        )
    if isinstance(value, (list, tuple)):
        return [identity(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): identity(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return type(value).__name__


def fingerprint(settings: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
    """What must be the same for a run to continue another: settings (``UNCHECKED`` left out), inputs,
    versions and the number of ranks (each rank keeps the inputs of its own share of the calibration data)."""
    from ..api import versions

    known = {k: v for k, v in versions().items() if k != "python"}
    return json.loads(
        json.dumps(
            {
                "versions": known,
                "ranks": dist.world_size(),
                "settings": {k: v for k, v in settings.items() if k not in UNCHECKED},
                "inputs": {k: identity(v) for k, v in inputs.items() if v is not None},
            },
            default=str,
        )
    )


def differences(then: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words."""
    found = []
    if then.get("ranks") != now.get("ranks"):
        found.append(f"{then.get('ranks')} rank(s) then, {now.get('ranks')} now")
    for key in sorted(set(then.get("versions", {})) | set(now.get("versions", {}))):
        a, b = then.get("versions", {}).get(key), now.get("versions", {}).get(key)
        if a != b:
            found.append(f"{key} {a} then, {b} now")
    for key in sorted(set(then.get("settings", {})) | set(now.get("settings", {}))):
        a, b = then.get("settings", {}).get(key), now.get("settings", {}).get(key)
        if a != b:
            found.append(f"{key} was {a!r}, now {b!r}")
    for key in sorted(set(then.get("inputs", {})) | set(now.get("inputs", {}))):
        if then.get("inputs", {}).get(key) != now.get("inputs", {}).get(key):
            found.append(f"{key} changed since (or is another one)")
    return found


# ---------------------------------------------------------------- durable files


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable_json(path: Path, data: Any) -> None:
    """``path`` replaced atomically by ``data``, on disk before this returns (file and folder fsynced)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def save_hidden(folder: Path, tensors: list[torch.Tensor]) -> None:
    """Hidden states as raw files (any dtype, no copy of the whole set in memory) plus their shapes, fsynced."""
    shutil.rmtree(folder, ignore_errors=True)  # a half-written one from a run killed here
    folder.mkdir(parents=True)
    meta = []
    for j, tensor in enumerate(tensors):
        data = tensor.detach().to("cpu").contiguous()
        with open(folder / f"hidden-{j:06d}.bin", "wb") as f:
            f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
        meta.append({"shape": list(data.shape), "dtype": str(data.dtype).removeprefix("torch.")})
    write_durable_json(folder / "meta.json", meta)


def load_hidden(folder: Path) -> list[torch.Tensor]:
    meta = json.loads((folder / "meta.json").read_text())
    out = []
    for j, spec in enumerate(meta):
        dtype, shape = getattr(torch, spec["dtype"]), spec["shape"]
        numel = int(torch.tensor(shape).prod()) if shape else 1
        out.append(torch.from_file(str(folder / f"hidden-{j:06d}.bin"), size=numel, dtype=dtype).view(shape))
    return out


def save_block(path: Path, block: nn.Module) -> None:
    tensors = {k: v.detach().to("cpu").clone() for k, v in block.state_dict().items()}
    save_file(tensors, str(path))
    fsync(path)


# ---------------------------------------------------------------- the state of one run


class ResumeState:
    """The progress kept for one run on ``out`` (``path``), or none (``keep=False``). ``saved`` is what an
    interrupted run left (None: this run starts at block 0). Made on every rank by ``open``; rank 0 decides."""

    def __init__(self, path: Path | None, saved: dict | None, keep: bool, required: bool, check: dict):
        self.path, self.saved, self.keep, self.required, self.check = path, saved, keep, required, check

    @classmethod
    def open(cls, out: str | os.PathLike | None, mode: bool | None, check: dict) -> ResumeState:
        """Decide, on rank 0 and under the claim on ``out``, whether this run resumes an interrupted one (``mode``
        None: if there is one; True: there must be one; False: never, and an old state is discarded)."""
        if out is None:
            if mode:
                raise PrunekitError("--resume needs --out: the progress is kept beside the output")
            return cls(None, None, False, False, check)
        path = state_path(out)
        with dist.together():
            saved = _decide(path, mode, check) if dist.is_writer() else None
        saved = dist.broadcast_object(saved)
        return cls(path, saved or None, mode is not False, bool(mode), check)

    @property
    def first(self) -> int:
        return int(self.saved["done"]) + 1 if self.saved else 0

    def inputs_folder(self, block: int, rank: int | None = None) -> Path:
        return self.path / f"inputs-{block:05d}-r{dist.rank() if rank is None else rank:03d}"

    def commit(self, done: int, extra: Mapping[str, Any]) -> None:
        """Rank 0: block ``done`` and everything before it are finished (their files are on disk)."""
        global KEPT
        write_durable_json(
            self.path / PROGRESS, {"version": STATE_VERSION, "fingerprint": self.check, "done": done, **extra}
        )
        KEPT = self.path
        for folder in self.path.glob("inputs-*-r*"):
            if int(folder.name.split("-")[1]) <= done:  # older than block done + 1's inputs
                shutil.rmtree(folder, ignore_errors=True)

    def drop_progress(self) -> None:
        """Rank 0, before the output's files leave the state folder: it is no longer resumable."""
        if self.keep and self.path is not None and (self.path / PROGRESS).exists():
            (self.path / PROGRESS).unlink()
            fsync(self.path)

    def finish(self) -> None:
        """Rank 0, once the output is complete (or the run failed in a way a rerun would repeat)."""
        global KEPT
        if self.keep and self.path is not None and dist.is_writer():
            shutil.rmtree(self.path, ignore_errors=True)
            KEPT = None

    def failed(self, error: BaseException) -> None:
        """Keep the state after an interruption (Ctrl-C, SIGTERM: the CLI raises KeyboardInterrupt); a run that
        failed with an error leaves nothing behind."""
        if not isinstance(error, KeyboardInterrupt):
            self.finish()


def _decide(path: Path, mode: bool | None, check: dict) -> dict | None:
    progress = path / PROGRESS
    saved = json.loads(progress.read_text()) if progress.is_file() else None
    if mode is False or saved is None:
        if saved is not None:
            log.warning("discarding the progress of an interrupted run kept in %s (--no-resume)", path)
        if mode is True:
            raise PrunekitError(
                f"--resume: there is no interrupted run to resume for this --out (no {str(progress)!r}); "
                "drop --resume to start"
            )
        shutil.rmtree(path, ignore_errors=True)  # without progress.json it is a run that was finishing, or nothing
        return None
    found = differences(saved.get("fingerprint", {}), check) if saved.get("version") == STATE_VERSION else ["format"]
    if found:
        raise PrunekitError(
            f"{str(path)!r} holds the progress of an interrupted run on this --out that differs from this one "
            f"({'; '.join(found[:3])}); rerun it as it was to resume it, or pass --no-resume to discard it"
        )
    log.warning(
        "resuming the interrupted run kept in %s: blocks 0-%d are done, continuing from block %d",
        path,
        saved["done"],
        saved["done"] + 1,
    )
    return saved


# ---------------------------------------------------------------- the engine's progress (prunekit.engine.Progress)


def encode_targets(targets: Mapping[str, Any]) -> dict[str, list]:
    return {n: [t.sparsity, t.group, list(t.nm) if t.nm else None] for n, t in targets.items()}


def decode_targets(data: Mapping[str, list]) -> dict[str, Any]:
    from ..methods import Target

    return {n: Target(s, g, tuple(nm) if nm else None) for n, (s, g, nm) in data.items()}


class InMemoryResume:
    """In memory: each pruned block is kept in its own file (rank 0) and the next block's inputs by every rank."""

    def __init__(self, state: ResumeState):
        self.state = state
        self.first = state.first
        self.targets = decode_targets(state.saved["targets"]) if state.saved else None
        self.encoded: dict[str, list] = {}
        self.layers: Mapping[str, Any] = {}

    def bind(self, plan, resumable: bool) -> InMemoryResume | None:
        """This run's plan; None when it cannot be resumed block by block (then a --resume run is refused)."""
        if not resumable:
            if self.state.required or self.first:
                raise PrunekitError(
                    "--resume: this run has no single block list holding every selected layer (structured methods, "
                    "--no-sequential, a global group, several block lists), so it keeps no progress to resume"
                )
            return None
        self.encoded, self.layers = encode_targets(plan.targets), plan.layers
        return self if self.state.keep else None

    def expert_tokens(self) -> dict[str, int]:
        """Tokens routed to each selected MoE expert so far (the report's; the blocks done are not run again)."""
        from ..moe import expert_views

        return {n: v.routed_tokens for n, v in expert_views(self.layers) if v.routed_tokens is not None}

    def restore(self, blocks: nn.Module, acts) -> None:
        for i in range(min(self.first, len(blocks))):
            blocks[i].load_state_dict(load_file(str(self.state.path / block_file(i))))
        self.restore_inputs(acts)

    def restore_inputs(self, acts) -> None:
        for name, tokens in self.state.saved.get("experts", {}).items():
            self.layers[name].routed_tokens = tokens
        folder = self.state.inputs_folder(self.first)
        if acts is None or not folder.is_dir():
            return
        hidden = load_hidden(folder)
        if len(hidden) != len(acts):
            raise PrunekitError(
                f"the interrupted run kept {len(hidden)} calibration batches on this rank, not {len(acts)}"
            )
        for j, tensor in enumerate(hidden):
            acts.update(j, tensor)

    def done(self, index: int, blocks: nn.Module, acts, last: int) -> None:
        with dist.together():
            self.save_inputs(index, acts, last)
            if dist.is_writer():
                save_block(self.state.path / block_file(index), blocks[index])
        with dist.together():  # every rank's inputs are on disk: the block counts as done
            if dist.is_writer():
                self.state.commit(index, {"targets": self.encoded, "experts": self.expert_tokens()})

    def save_inputs(self, index: int, acts, last: int) -> None:
        if dist.is_writer():
            self.state.path.mkdir(exist_ok=True)
        if acts is not None and index < last:
            self.state.path.mkdir(exist_ok=True)  # shared file system: the writer may not have made it yet
            save_hidden(self.state.inputs_folder(index + 1), [acts.hidden_state(j) for j in range(len(acts))])


def block_file(index: int) -> str:
    return f"block-{index:05d}.safetensors"


class LazyResume(InMemoryResume):
    """``--lazy``: the pruned blocks are the output shards, written into the state folder by the writer thread;
    progress is committed on that thread after the block's shards are flushed and fsynced, with what the report
    has gathered so far (``report_so_far``, taken on the main thread when the block is done)."""

    def __init__(
        self, state: ResumeState, after_write: Callable[..., None] | None, writer, report_so_far: Callable | None = None
    ):
        super().__init__(state)
        self.after_write, self.writer, self.report_so_far = after_write, writer, report_so_far

    def restore(self, blocks: nn.Module, acts) -> None:
        self.restore_inputs(acts)

    def done(self, index: int, blocks: nn.Module, acts, last: int) -> None:
        with dist.together():
            self.save_inputs(index, acts, last)
        if dist.is_writer():
            report = json.loads(json.dumps(self.report_so_far() if self.report_so_far else {}, default=str))
            self.after_write(self._commit, index, {"report": report, "experts": self.expert_tokens()})

    def _commit(self, index: int, snapshot: dict) -> None:
        for path in self.writer.files():
            fsync(path)
        self.state.commit(index, {"targets": self.encoded, "writer": self.writer.state(), **snapshot})
