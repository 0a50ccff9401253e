"""Several processes, one result: data- and layer-parallel pruning on ``torch.distributed``.

Launched by torchrun (``torchrun --nproc-per-node N -m prunekit prune ...``, where the CLI initialises the process
group: gloo on CPU, NCCL for CUDA tensors) or inside a process group the caller initialised, every rank runs the
same calibration loop:

* **data parallel**: each rank calibrates on its own contiguous share of the calibration batches (``shard``) and
  keeps its own activations block by block; every statistic a mask, update, allocation or structured score is
  computed from is summed over the ranks before it is used (``reduce_stats``, ``sum_over_ranks``), so the result
  does not depend on the number of ranks (up to the order of floating-point additions);
* **layer parallel**: the layers of a block are shared out among the ranks (``layer_owners``, the costliest
  first), each rank prunes its own and the pruned weights are broadcast (``share_weights``);
* **one writer**: rank 0 (``is_writer``) claims and writes the output;
* **errors stop every rank**: work that can fail on one rank alone runs in ``together()``, which ends with a small
  collective in which the ranks tell each other whether they failed; a rank whose peer failed raises ``PeerError``
  naming that rank and its problem. Collectives happen only after such an agreement, so no rank waits forever
  in one that a failed peer will never reach (and the process group's timeout bounds every wait).

Everything here is a no-op in one process (no process group, or a group of one).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .collect import LayerStats
from .errors import PrunekitError

log = logging.getLogger(__name__)

_MESSAGE_BYTES = 1024  # what one rank tells the others about its failure (utf-8, cut to fit)
AGREED = "prunekit_agreed"  # attribute set on an exception every rank knows about
_STOPPING = False  # a failure every rank knows of was raised: the ranks are on their way out


class PeerError(PrunekitError):
    """Another rank failed; this one stops too (its own work was fine)."""

    def __init__(self, rank: int, message: str):
        super().__init__(f"rank {rank}: {message}")
        self.rank = rank
        setattr(self, AGREED, True)


# ---------------------------------------------------------------- who and where


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_writer() -> bool:
    """Rank 0 claims and writes outputs; the other ranks never write them."""
    return rank() == 0


def launched_ranks() -> int:
    """How many processes the launcher (torchrun) started, from its environment (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def check_launch() -> None:
    """A torchrun launch of several processes without a process group would have every process prune (and write)
    alone: say so before any work."""
    if launched_ranks() > 1 and not (dist.is_available() and dist.is_initialized()):
        raise PrunekitError(
            f"launched as {launched_ranks()} processes (WORLD_SIZE) but no torch.distributed process group is "
            "initialised: call torch.distributed.init_process_group() before prunekit.prune / prune_lazy "
            "(the prunekit command does it itself)"
        )


def rank_device(device: torch.device | str | None) -> torch.device | None:
    """This rank's compute device: with several ranks, ``cuda`` (no index) means ``cuda:LOCAL_RANK``."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and active():
        return torch.device("cuda", local_rank())
    return device


def check_device(device: str | None) -> None:
    """With several ranks on a node each takes its own GPU: an explicit ``cuda:N`` would put them all on one."""
    if device is not None and launched_ranks() > 1 and torch.device(device).index is not None:
        raise PrunekitError(
            f"--device {device} names one GPU, but every rank would use it; with torchrun each rank takes "
            "cuda:LOCAL_RANK: pass --device cuda"
        )


@contextmanager
def process_group(device: str | None, timeout_s: float) -> Iterator[None]:
    """The process group of a torchrun launch for the length of the block: gloo for CPU tensors, NCCL for CUDA
    ones (each rank on ``cuda:LOCAL_RANK``). Nothing to do in one process or when the caller initialised one.
    The group is destroyed on a normal exit only (after a failure the process ends anyway, and a collective
    that a dead peer never joins must not be waited for here)."""
    if launched_ranks() <= 1 or dist.is_initialized():
        yield
        return
    check_device(device)
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if cuda:
        torch.cuda.set_device(local_rank())
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    yield
    dist.destroy_process_group()


def _collective_device() -> torch.device:
    """Where small tensors of our own go for a collective: the CPU when the group has gloo, else this GPU."""
    return (
        torch.device("cpu") if "gloo" in str(dist.get_backend()) else torch.device("cuda", torch.cuda.current_device())
    )


@contextmanager
def _reachable(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """``tensor``, or a copy on the GPU when the group has no CPU backend (an NCCL-only group the caller made),
    copied back after the collective."""
    if tensor.device.type != "cpu" or "gloo" in str(dist.get_backend()):
        yield tensor
        return
    moved = tensor.to(_collective_device())
    yield moved
    tensor.copy_(moved)


# ---------------------------------------------------------------- agreeing on failures


def _encode(error: BaseException | None) -> torch.Tensor:
    out = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    if error is not None:
        text = str(error) if isinstance(error, PrunekitError) else f"{type(error).__name__}: {error}"
        data = text.encode("utf-8", "replace")[: _MESSAGE_BYTES - 1]
        out[0] = 1
        out[1 : 1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out.to(_collective_device())


def _decode(buffer: torch.Tensor) -> str:
    return bytes(buffer[1:].cpu().tolist()).rstrip(b"\0").decode("utf-8", "replace")


def agree(error: BaseException | None = None) -> None:
    """Tell every rank whether this one failed (``error``) and learn whether any other did: the failed rank
    raises its own error, the others ``PeerError`` for the lowest failed rank. Every rank must call it."""
    if not active():
        if error is not None:
            raise error
        return
    global _STOPPING
    mine = _encode(error)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    if error is not None:
        _STOPPING = True
        setattr(error, AGREED, True)
        raise error
    failed = [(r, _decode(t)) for r, t in enumerate(gathered) if int(t[0])]
    if failed:
        _STOPPING = True
        raise PeerError(*failed[0])


def stopping() -> bool:
    """Whether this rank is on its way out after a failure every rank knows of (a SIGTERM from the launcher
    then must not interrupt the cleanup)."""
    return _STOPPING


def agreed(error: BaseException) -> bool:
    """Whether every rank knows about ``error`` (it went through ``agree``)."""
    return bool(getattr(error, AGREED, False))


@contextmanager
def together() -> Iterator[None]:
    """Local work (no collectives inside) that may fail on some ranks only: afterwards every rank knows whether
    any failed, and all raise (see ``agree``). A no-op in one process."""
    try:
        yield
    except Exception as err:
        if active() and not agreed(err):
            agree(err)
        raise
    agree()


@contextmanager
def entered(context) -> Iterator[Any]:
    """``context`` (a claim's staging folder, a block's turn) entered, and on success exited, as local work the
    ranks agree on, around a body that may hold collectives. After a failure in the body it is exited as usual
    and the failure propagates (the body's own agreements, or a lost peer, tell the other ranks)."""
    stack = ExitStack()
    with together():
        value = stack.enter_context(context)
    try:
        yield value
    except BaseException as err:
        stack.__exit__(type(err), err, err.__traceback__)
        raise
    with together():
        stack.close()


# ---------------------------------------------------------------- data parallel


def shard(batches: Sequence[Any]) -> list[Any]:
    """This rank's share of the calibration batches: a contiguous run of the global order (rank 0 the first),
    so the batches are the ones a single process would use and only the order of the sums changes."""
    batches = list(batches)
    if not active():
        return batches
    world = dist.get_world_size()
    if len(batches) < world:
        raise PrunekitError(
            f"{len(batches)} calibration batches cannot be shared by {world} ranks; use a smaller --batch-size "
            "or more --nsamples (at least one batch per rank)"
        )
    bounds = [len(batches) * r // world for r in range(world + 1)]
    return batches[bounds[rank()] : bounds[rank() + 1]]


def sum_over_ranks(*tensors: torch.Tensor) -> None:
    """Sum ``tensors`` over the ranks in place, with the same bits on every rank (rank 0 adds them up and sends
    the sums back). The one reduction for statistics that scores are computed from (column norms and sums,
    structured scores, token counts): call it on every rank, with the same tensors in the same order, after the
    local forward passes (``together``). Tensors of one device and dtype travel as one buffer."""
    if not active():
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for members in groups.values():
        flat = torch.cat([t.reshape(-1) for t in members])
        with _reachable(flat) as moved:
            dist.reduce(moved, dst=0)
            dist.broadcast(moved, src=0)
        offset = 0
        for t in members:
            t.copy_(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()


def reduce_stats(stats: Mapping[str, LayerStats], owners: Mapping[str, int] | None = None) -> None:
    """Sum every rank's layer statistics in place. Column sums and counts end the same on every rank; ``X^T X``
    (cols x cols) goes only to the rank that prunes the layer (``owners``) and is dropped elsewhere, or to
    every rank without ``owners``."""
    if not active():
        return
    sum_over_ranks(*[t for s in stats.values() for t in (s.sq_sum, s.col_sum) if t is not None])
    device = next(iter(stats.values())).sq_sum.device if stats else torch.device("cpu")
    counts = torch.tensor([[s.nsamples, s.ntokens] for s in stats.values()], dtype=torch.int64, device=device)
    sum_over_ranks(counts)
    for (name, s), (nsamples, ntokens) in zip(stats.items(), counts.tolist()):
        s.nsamples, s.ntokens = nsamples, ntokens
        if s.xtx is None:
            continue
        owner = None if owners is None else owners[name]
        if owner is None:
            sum_over_ranks(s.xtx)
        else:
            with _reachable(s.xtx) as moved:
                dist.reduce(moved, dst=owner)
            if rank() != owner:
                s.xtx = None  # only the owner solves this layer


def sum_expert_tokens(layers: Mapping[str, Any]) -> None:
    """The tokens routed to each selected MoE expert (``ExpertWeight.routed_tokens``), over all ranks."""
    from .moe import expert_views

    views = [view for _, view in expert_views(layers) if view.routed_tokens is not None]
    if not active() or not views:
        return
    counts = torch.tensor([view.routed_tokens for view in views], dtype=torch.int64)
    sum_over_ranks(counts)
    for view, count in zip(views, counts.tolist()):
        view.routed_tokens = count


# ---------------------------------------------------------------- layer parallel


def layer_cost(module: nn.Module, hessian: bool) -> float:
    """Relative work of pruning one layer: a Hessian solve is ``cols^3`` (factorisation) plus ``rows * cols^2``
    (the sweep) per group; a score and a selection are ``rows * cols``."""
    from .graph import num_groups, weight_matrix

    rows, cols = weight_matrix(module).shape
    groups = num_groups(module)
    rows //= groups
    return float(groups * (cols**3 + rows * cols**2 if hessian else rows * cols))


def layer_owners(layers: Mapping[str, nn.Module], hessian: bool, world: int | None = None) -> dict[str, int]:
    """Which rank prunes each layer: the costliest first, each to the least loaded rank so far (ties: the lower
    rank, then the earlier layer). The same on every rank: it depends only on the shapes."""
    world = world or world_size()
    order = {name: i for i, name in enumerate(layers)}
    cost = {name: layer_cost(m, hessian) for name, m in layers.items()}
    loads = [0.0] * world
    owners: dict[str, int] = {}
    for name in sorted(layers, key=lambda n: (-cost[n], order[n])):
        owner = min(range(world), key=lambda r: (loads[r], r))
        owners[name] = owner
        loads[owner] += cost[name]
    return {name: owners[name] for name in layers}


@torch.no_grad()
def share_weights(layers: Mapping[str, nn.Module], owners: Mapping[str, int]) -> None:
    """Every layer's pruned weight from the rank that pruned it to all others (as bytes: any dtype)."""
    if not active():
        return
    from .graph import set_weight_matrix, weight_matrix

    for name, module in layers.items():  # the same order on every rank
        matrix = weight_matrix(module)
        mine = owners[name] == rank()
        buffer = matrix.contiguous() if mine else torch.empty(matrix.shape, dtype=matrix.dtype, device=matrix.device)
        with _reachable(buffer.reshape(-1).view(torch.uint8)) as moved:
            dist.broadcast(moved, src=owners[name])
        if not mine:
            set_weight_matrix(module, buffer)


# ---------------------------------------------------------------- small exchanges


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` as rank ``src`` has it, on every rank (a decision rank 0 made: resume or not)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def gather_ints(values: Sequence[int]) -> list[list[int]]:
    """Every rank's ``values`` (the same length everywhere), by rank: peak memory per rank for the report."""
    if not active():
        return [list(values)]
    mine = torch.tensor(list(values), dtype=torch.int64, device=_collective_device())
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [t.tolist() for t in gathered]
