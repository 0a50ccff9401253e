"""Coupled structures for width pruning: which rows and columns of which Linear layers make up one attention
head (one KV group under grouped-query attention) or one MLP channel, and so must be removed together.

Torch-Pruning finds such couplings by tracing the graph; here a small table of adapters recognises the
module layouts we support, by their attributes (never by class name), and describes each one as a ``Group``:

* HF LLaMA-style attention (``q_proj/k_proj/v_proj/o_proj`` + ``head_dim``): a unit is one KV head with its
  ``n_rep`` query heads: q rows, k rows, v rows, o_proj columns. Removing a query head alone would break
  the fixed query-to-KV mapping of GQA, so whole KV groups go.
* HF gated MLP (``gate_proj/up_proj/down_proj``): a unit is one intermediate channel: gate and up rows,
  down_proj column.
* timm ``Attention`` (fused ``qkv`` + ``proj``): a unit is one head: its q, k and v rows of ``qkv`` (and of the
  optional sigmoid ``gate``), its ``proj`` columns.
* timm ``Mlp`` (``fc1`` -> activation -> ``fc2``): a unit is one hidden channel: fc1 row, fc2 column.

Removing a unit from every slot of its group is exact: the model equals the original with those weights zeroed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PrunekitError
from .common import slice_linear


@dataclass
class Slot:
    """Where the units of a group live in one Linear: rows (``dim=0``) or columns (``dim=1``) ``index[u]``."""

    name: str
    layer: nn.Linear
    dim: int
    index: torch.Tensor  # [units, per_unit] channel indices along ``dim``

    def params_per_unit(self) -> int:
        per = self.index.shape[1]
        if self.dim == 1:
            return per * self.layer.out_features
        return per * (self.layer.in_features + (1 if self.layer.bias is not None else 0))


@dataclass
class Group:
    """The units (heads / KV groups, or MLP channels) of one module, removed together from every slot.

    ``commit(kept)`` updates the owning module's own attributes (``num_heads`` ...) once its layers are cut;
    ``config(kept)`` gives the Hugging Face config values that keeping ``kept`` units implies ({} for timm).
    """

    name: str
    kind: str  # "heads" or "channels"
    slots: list[Slot]
    commit: Callable[[int], None] = field(default=lambda kept: None)
    config: Callable[[int], dict] = field(default=lambda kept: {})

    @property
    def units(self) -> int:
        return self.slots[0].index.shape[0]

    def params_per_unit(self) -> int:
        return sum(s.params_per_unit() for s in self.slots)

    def cut(self, keep: torch.Tensor) -> None:
        """Keep only units ``keep`` (sorted) in every slot, then update the owner's attributes."""
        for slot in self.slots:
            channels = slot.index[keep].flatten().sort().values
            slice_linear(slot.layer, channels, slot.dim)
        self.commit(keep.numel())


def _linears(module: nn.Module, names: tuple[str, ...]) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def _set_if_present(module: nn.Module, **values: int) -> None:
    for key, value in values.items():
        if hasattr(module, key):
            setattr(module, key, value)


def hf_attention(name: str, m: nn.Module) -> Group | None:
    if not _linears(m, ("q_proj", "k_proj", "v_proj", "o_proj")) or not isinstance(getattr(m, "head_dim", None), int):
        return None
    hd = m.head_dim
    kv, q_rows = m.k_proj.out_features // hd, m.q_proj.out_features
    if kv * hd != m.k_proj.out_features or q_rows % (kv * hd):
        raise PrunekitError(
            f"{name}: q/k projections ({q_rows}, {m.k_proj.out_features} rows) are not whole heads "
            f"of head_dim {hd}; cannot group query heads by KV head"
        )
    rep = q_rows // (kv * hd)
    q_index, kv_index = torch.arange(q_rows).view(kv, rep * hd), torch.arange(kv * hd).view(kv, hd)
    slots = [
        Slot(f"{name}.q_proj", m.q_proj, 0, q_index),
        Slot(f"{name}.k_proj", m.k_proj, 0, kv_index),
        Slot(f"{name}.v_proj", m.v_proj, 0, kv_index),
        Slot(f"{name}.o_proj", m.o_proj, 1, q_index),
    ]

    def commit(kept: int) -> None:  # older transformers versions keep head counts on the module
        _set_if_present(m, num_heads=kept * rep, num_key_value_heads=kept)

    def config(kept: int) -> dict:
        return {"num_attention_heads": kept * rep, "num_key_value_heads": kept, "head_dim": hd}

    return Group(name, "heads", slots, commit, config)


def hf_gated_mlp(name: str, m: nn.Module) -> Group | None:
    if not _linears(m, ("gate_proj", "up_proj", "down_proj")):
        return None
    index = torch.arange(m.gate_proj.out_features).view(-1, 1)
    slots = [
        Slot(f"{name}.gate_proj", m.gate_proj, 0, index),
        Slot(f"{name}.up_proj", m.up_proj, 0, index),
        Slot(f"{name}.down_proj", m.down_proj, 1, index),
    ]
    return Group(
        name,
        "channels",
        slots,
        lambda kept: _set_if_present(m, intermediate_size=kept),
        lambda kept: {"intermediate_size": kept},
    )


def _require_identity(name: str, module: nn.Module | None, what: str) -> None:
    if module is not None and not isinstance(module, nn.Identity):
        raise PrunekitError(
            f"{name}: a {what} over the pruned features is not invariant to removing some of them; "
            "width pruning supports this timm block only without it"
        )


def timm_attention(name: str, m: nn.Module) -> Group | None:
    if (
        not _linears(m, ("qkv", "proj"))
        or not isinstance(getattr(m, "num_heads", None), int)
        or not isinstance(getattr(m, "head_dim", None), int)
    ):
        return None
    heads, hd = m.num_heads, m.head_dim
    if m.qkv.out_features != 3 * heads * hd:
        return None
    if not hasattr(m, "attn_dim"):
        raise PrunekitError(
            f"{name}: this timm Attention reshapes its output to the input width, so heads cannot be "
            "removed; upgrade timm to a version whose Attention has `attn_dim`"
        )
    _require_identity(name, getattr(m, "norm", None), "scale norm")
    per_head = torch.arange(heads * hd).view(heads, hd)
    slots = [
        Slot(f"{name}.qkv", m.qkv, 0, torch.cat([per_head + i * heads * hd for i in range(3)], dim=1)),
        Slot(f"{name}.proj", m.proj, 1, per_head),
    ]
    if isinstance(getattr(m, "gate", None), nn.Linear):
        slots.append(Slot(f"{name}.gate", m.gate, 0, per_head))
    return Group(name, "heads", slots, lambda kept: _set_if_present(m, num_heads=kept, attn_dim=kept * hd))


def timm_mlp(name: str, m: nn.Module) -> Group | None:
    if not _linears(m, ("fc1", "fc2")) or m.fc1.out_features != m.fc2.in_features:
        return None
    _require_identity(name, getattr(m, "norm", None), "norm")
    index = torch.arange(m.fc1.out_features).view(-1, 1)
    return Group(name, "channels", [Slot(f"{name}.fc1", m.fc1, 0, index), Slot(f"{name}.fc2", m.fc2, 1, index)])


ADAPTERS: tuple[Callable[[str, nn.Module], Group | None], ...] = (hf_attention, hf_gated_mlp, timm_attention, timm_mlp)


def find_groups(prefix: str, blocks: nn.Module) -> list[Group]:
    """Every coupled group inside the blocks, in forward order."""
    groups = []
    for i, block in enumerate(blocks):
        for sub, module in block.named_modules():
            name = ".".join(p for p in (prefix, str(i), sub) if p)
            group = next((g for g in (a(name, module) for a in ADAPTERS) if g is not None), None)
            if group is not None:
                groups.append(group)
    if not groups:
        raise PrunekitError(
            "no attention or MLP layout that width pruning supports was found in the blocks (HF "
            "q/k/v/o_proj attention, gate/up/down_proj MLP; timm Attention with qkv/proj, Mlp fc1/fc2)"
        )
    return groups
