"""Coupled structures for width pruning: which rows and columns of which Linear layers make up one attention
head (one KV group under grouped-query attention) or one MLP channel, and so must be removed together.

Torch-Pruning finds such couplings by tracing the graph; here a small table of adapters recognises the
module layouts we support, by their attributes (never by class name), and describes each one as a ``Group``:

* HF LLaMA-style attention (``q_proj/k_proj/v_proj/o_proj`` + ``head_dim``): a unit is one KV head with its
  ``n_rep`` query heads: q rows, k rows, v rows, o_proj columns. Removing a query head alone would break
  the fixed query-to-KV mapping of GQA, so whole KV groups go. Per-head q/k norms (Qwen 3, Gemma 2/3) do not
  care; a q/k norm over the whole projection (OLMo 2) mixes all heads, so there the heads are ``fixed``.
* Phi-3's fused attention (``qkv_proj`` + ``o_proj``): the same units, their q, k and v rows inside ``qkv_proj``.
* HF gated MLP (``gate_proj/up_proj/down_proj``, or Phi-3's fused ``gate_up_proj``): a unit is one
  intermediate channel: its gate and up rows, its down_proj column.
* Plain MLPs (``fc1/fc2``: OPT, timm; ``c_fc/c_proj``: GPT-2 (HF ``Conv1D``), StarCoder 2;
  ``dense_h_to_4h/dense_4h_to_h``: Falcon, GPT-NeoX; ``intermediate.dense/output.dense``: BERT; ``wi/wo``: T5):
  a unit is one hidden channel: its reader row, its writer column.
* timm ``Attention`` (fused ``qkv`` + ``proj``): a unit is one head: its q, k and v rows of ``qkv`` (and of the
  optional sigmoid ``gate``), its ``proj`` columns.

Removing a unit from every slot of its group is exact: the model equals the original with those weights zeroed.
Attention with ``head_dim = hidden_size / num_heads`` fixed by the config (GPT-2, OPT, BERT, Falcon, GPT-NeoX)
has no adapter: its head count cannot change without changing the residual width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..architectures import PLAIN_MLPS
from ..errors import PrunekitError
from ..graph import HFConv1D, weight_matrix
from .common import slice_linear


@dataclass
class Slot:
    """Where the units of a group live in one Linear: rows (``dim=0``) or columns (``dim=1``) ``index[u]``."""

    name: str
    layer: nn.Module  # nn.Linear or HF Conv1D; ``dim`` counts in the ``[out, in]`` view
    dim: int
    index: torch.Tensor  # [units, per_unit] channel indices along ``dim``

    def params_per_unit(self) -> int:
        per = self.index.shape[1]
        out_features, in_features = weight_matrix(self.layer).shape
        if self.dim == 1:
            return per * out_features
        return per * (in_features + (1 if self.layer.bias is not None else 0))


@dataclass
class Group:
    """The units (heads / KV groups, or MLP channels) of one module, removed together from every slot.

    ``commit(kept)`` updates the owning module's own attributes (``num_heads`` ...) once its layers are cut;
    ``config(kept)`` gives the Hugging Face config values that keeping ``kept`` units implies ({} for timm).
    ``fixed`` says why no unit may go (empty when they may); ``block`` is the index of the block it sits in.
    """

    name: str
    kind: str  # "heads" or "channels"
    slots: list[Slot]
    commit: Callable[[int], None] = field(default=lambda kept: None)
    config: Callable[[int], dict] = field(default=lambda kept: {})
    fixed: str = ""
    block: int = -1

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


def _layer(module: nn.Module, path: str) -> nn.Module | None:
    """The Linear / HF Conv1D at ``path`` (dotted) below ``module``, or None."""
    for part in path.split("."):
        module = getattr(module, part, None)
    return module if isinstance(module, (nn.Linear, HFConv1D)) else None


def _linears(module: nn.Module, names: tuple[str, ...]) -> bool:
    return all(_layer(module, n) is not None for n in names)


def _set_if_present(module: nn.Module, **values: int) -> None:
    for key, value in values.items():
        if hasattr(module, key):
            setattr(module, key, value)


def _kv_groups(name: str, q_rows: int, kv_rows: int, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices ``[kv_heads, rep * hd]`` of each KV group's query heads and ``[kv_heads, hd]`` of its k / v."""
    kv = kv_rows // hd
    if kv * hd != kv_rows or kv == 0 or q_rows % kv_rows:
        raise PrunekitError(
            f"{name}: q/k projections ({q_rows}, {kv_rows} rows) are not whole heads of head_dim {hd}; "
            "cannot group query heads by KV head"
        )
    return torch.arange(q_rows).view(kv, -1), torch.arange(kv_rows).view(kv, hd)


def _whole_projection_norm(m: nn.Module) -> str:
    """Why heads are fixed when a q/k norm spans the whole projection (OLMo 2), else ''."""
    for key in ("q_norm", "k_norm"):
        weight = getattr(getattr(m, key, None), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.numel() > 1 and weight.numel() != getattr(m, "head_dim", 0):
            return f"its {key} normalises all heads together, so removing a head would change the others"
    return ""


def _attention_group(name: str, m: nn.Module, slots: list[Slot], rep: int) -> Group:
    def commit(kept: int) -> None:  # older transformers versions keep head counts on the module
        _set_if_present(m, num_heads=kept * rep, num_key_value_heads=kept)

    def config(kept: int) -> dict:
        return {"num_attention_heads": kept * rep, "num_key_value_heads": kept, "head_dim": m.head_dim}

    return Group(name, "heads", slots, commit, config, _whole_projection_norm(m))


def hf_attention(name: str, m: nn.Module, mlp_key: str | None) -> Group | None:
    if not _linears(m, ("q_proj", "k_proj", "v_proj", "o_proj")) or not isinstance(getattr(m, "head_dim", None), int):
        return None
    q_index, kv_index = _kv_groups(name, m.q_proj.out_features, m.k_proj.out_features, m.head_dim)
    slots = [
        Slot(f"{name}.q_proj", m.q_proj, 0, q_index),
        Slot(f"{name}.k_proj", m.k_proj, 0, kv_index),
        Slot(f"{name}.v_proj", m.v_proj, 0, kv_index),
        Slot(f"{name}.o_proj", m.o_proj, 1, q_index),
    ]
    return _attention_group(name, m, slots, q_index.shape[1] // m.head_dim)


def fused_attention(name: str, m: nn.Module, mlp_key: str | None) -> Group | None:
    """Phi-3: ``qkv_proj`` rows are all query heads, then the k heads, then the v heads."""
    if not _linears(m, ("qkv_proj", "o_proj")) or not isinstance(getattr(m, "head_dim", None), int):
        return None
    q_rows = m.o_proj.in_features
    kv_rows = (m.qkv_proj.out_features - q_rows) // 2
    q_index, kv_index = _kv_groups(name, q_rows, kv_rows, m.head_dim)
    qkv_index = torch.cat([q_index, kv_index + q_rows, kv_index + q_rows + kv_rows], dim=1)
    slots = [Slot(f"{name}.qkv_proj", m.qkv_proj, 0, qkv_index), Slot(f"{name}.o_proj", m.o_proj, 1, q_index)]
    return _attention_group(name, m, slots, q_index.shape[1] // m.head_dim)


def _channel_group(name: str, m: nn.Module, slots: list[Slot], mlp_key: str | None) -> Group:
    return Group(
        name,
        "channels",
        slots,
        lambda kept: _set_if_present(m, intermediate_size=kept),
        lambda kept: {mlp_key: kept} if mlp_key else {},
    )


def hf_gated_mlp(name: str, m: nn.Module, mlp_key: str | None) -> Group | None:
    if _linears(m, ("gate_up_proj", "down_proj")):  # Phi-3: gate rows, then up rows
        index = torch.arange(m.down_proj.in_features).view(-1, 1)
        slots = [
            Slot(f"{name}.gate_up_proj", m.gate_up_proj, 0, torch.cat([index, index + index.shape[0]], dim=1)),
            Slot(f"{name}.down_proj", m.down_proj, 1, index),
        ]
        return _channel_group(name, m, slots, mlp_key)
    if not _linears(m, ("gate_proj", "up_proj", "down_proj")):
        return None
    index = torch.arange(m.gate_proj.out_features).view(-1, 1)
    slots = [
        Slot(f"{name}.gate_proj", m.gate_proj, 0, index),
        Slot(f"{name}.up_proj", m.up_proj, 0, index),
        Slot(f"{name}.down_proj", m.down_proj, 1, index),
    ]
    return _channel_group(name, m, slots, mlp_key)


def _require_identity(name: str, module: nn.Module | None, what: str) -> None:
    if module is not None and not isinstance(module, nn.Identity):
        raise PrunekitError(
            f"{name}: a {what} over the pruned features is not invariant to removing some of them; "
            "width pruning supports this block only without it"
        )


def timm_attention(name: str, m: nn.Module, mlp_key: str | None) -> Group | None:
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


def plain_mlp(name: str, m: nn.Module, mlp_key: str | None) -> Group | None:
    pair = next((p for p in PLAIN_MLPS if _linears(m, p)), None)
    if pair is None:
        return None
    reader, writer = _layer(m, pair[0]), _layer(m, pair[1])
    channels = weight_matrix(reader).shape[0]
    if weight_matrix(writer).shape[1] != channels:
        return None
    _require_identity(name, getattr(m, "norm", None), "norm")
    index = torch.arange(channels).view(-1, 1)
    slots = [Slot(f"{name}.{pair[0]}", reader, 0, index), Slot(f"{name}.{pair[1]}", writer, 1, index)]
    return _channel_group(name, m, slots, mlp_key)


Adapter = Callable[[str, nn.Module, "str | None"], "Group | None"]
ADAPTERS: tuple[Adapter, ...] = (hf_attention, fused_attention, hf_gated_mlp, timm_attention, plain_mlp)


def find_groups(prefix: str, blocks: nn.Module, mlp_key: str | None = "intermediate_size") -> list[Group]:
    """Every coupled group inside the blocks, in forward order; ``mlp_key`` is the config entry that holds
    the MLP width (``intermediate_size``; ``ffn_dim`` for OPT ...; None for models without an HF config)."""
    groups = []
    for i, block in enumerate(blocks):
        for sub, module in block.named_modules():
            name = ".".join(p for p in (prefix, str(i), sub) if p)
            group = next((g for g in (a(name, module, mlp_key) for a in ADAPTERS) if g is not None), None)
            if group is not None:
                group.block = i
                groups.append(group)
    if not groups:
        raise PrunekitError(
            "no attention or MLP layout that width pruning supports was found in the blocks (HF "
            "q/k/v/o_proj or qkv_proj attention, gate/up/down_proj MLP, fc1/fc2-style MLP; timm Attention)"
        )
    return groups
