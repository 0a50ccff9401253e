"""The compact sparse format restores the exact dense tensors and is smaller than dense."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import prunekit
from prunekit.errors import PrunekitError
from prunekit.io.compact import (
    Checkpoint,
    ShardWriter,
    choose_format,
    convert,
    decode_2_4,
    decode_bitmask,
    encode_2_4,
    encode_bitmask,
    is_2_4,
    is_compact,
    load_compact,
    packbits,
    parse_size,
    save_compact,
    unpackbits,
)
from tests.conftest import tiny_llama


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical after writing both zeros as +0.0 (the format drops the sign of a zero)."""
    a, b = a.masked_fill(a == 0, 0), b.masked_fill(b == 0, 0)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _assert_exact(ref: dict, got: dict) -> None:
    assert list(got) == list(ref)
    assert all(_same_bits(ref[k].contiguous(), got[k]) for k in ref)


def test_packbits_matches_numpy_and_inverts():
    bits = torch.rand(83, generator=torch.Generator().manual_seed(0)) < 0.4
    packed = packbits(bits)
    assert packed.dtype == torch.uint8 and packed.tolist() == np.packbits(bits.numpy()).tolist()
    assert torch.equal(unpackbits(packed, 83), bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bitmask_round_trip_is_bit_exact(dtype):
    t = torch.tensor([[0.0, -0.0, 1.5, 0.0], [float("nan"), 0.0, float("-inf"), 2.0], [0.0] * 4], dtype=dtype)
    parts = encode_bitmask(t)
    assert parts["values"].numel() == 4  # zeros of both signs are dropped, NaN and inf kept
    assert parts["mask"].tolist() == [0b00101011, 0b00000000]
    restored = decode_bitmask(parts, [3, 4], dtype)
    assert _same_bits(restored, t) and restored[0, 1].item() == 0.0
    assert not _same_bits(restored, t.masked_fill(t.isinf(), 1.0))  # the comparison can fail


def test_2_4_layout_by_hand():
    t = torch.tensor([[0.0, 5.0, 0.0, 7.0, 1.0, 0.0, 0.0, 0.0]])
    parts = encode_2_4(t)
    assert parts["values"].tolist() == [[5.0, 7.0, 1.0, 0.0]]
    # group 0 keeps positions (1, 3) -> 1 | 3 << 2 = 13; group 1 keeps (0, 1 padded) -> 0 | 1 << 2 = 4
    assert parts["index"].tolist() == [13 | 4 << 4]
    assert _same_bits(decode_2_4(parts, [1, 8], torch.float32), t)


def test_2_4_round_trip_odd_group_count_and_negative_zero():
    t = torch.tensor([[0.0, -0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, -1.0]], dtype=torch.float16)
    assert is_2_4(t) and not is_2_4(torch.tensor([[1.0, 0.0, -2.0, 3.0]]))
    assert _same_bits(decode_2_4(encode_2_4(t), [3, 4], torch.float16), t)


def test_choose_format():
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(8, 16, generator=gen)
    half = dense * (torch.rand(8, 16, generator=gen) < 0.5)
    two_four = dense.clone().reshape(-1, 4)
    two_four[:, :2] = 0
    assert choose_format(dense) == "dense" and choose_format(dense[0] * 0) == "dense"  # 1-D stays dense
    assert choose_format(torch.zeros(8, 16, dtype=torch.int64)) == "dense"
    assert choose_format(half) == "bitmask"
    assert choose_format(two_four.reshape(8, 16)) == "2:4"
    very_sparse = torch.zeros(8, 16)
    very_sparse[0, 0] = 1.0  # 2:4-compatible but far sparser: the bitmask is much smaller
    assert choose_format(very_sparse) == "bitmask"


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_save_load_pruned_model_exact_and_smaller(tmp_path, token_batch, pattern):
    model = tiny_llama(hidden=64, intermediate=128)
    prunekit.prune(model, "wanda", 0.5, pattern=pattern, calib=token_batch)
    formats = save_compact(model, tmp_path / "m.safetensors")
    assert formats["2:4" if pattern else "bitmask"] == 14
    save_compact(model, tmp_path / "sharded", max_shard_size="30KB")
    assert (tmp_path / "sharded" / "model.compact.safetensors.index.json").exists()
    for path in (tmp_path / "m.safetensors", tmp_path / "sharded"):
        _assert_exact(model.state_dict(), load_compact(path))
        assert is_compact(path)
    layer_bytes = sum(m.weight.numel() * 4 for m in prunekit.select_layers(model).values())
    dense_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    saved = (tmp_path / "m.safetensors").stat().st_size
    assert saved < dense_bytes - layer_bytes * (0.5 - 1 / 32) + 64 * 1024  # header slack


def test_tied_state_dict_round_trip(tmp_path):
    weight = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    state = {"a": weight, "b": weight, "bias": torch.ones(2)}
    save_compact(state, tmp_path / "t.safetensors")
    _assert_exact(state, load_compact(tmp_path / "t.safetensors"))


def test_convert_dense_compact_dense(tmp_path, token_batch):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    prunekit.prune(model, "wanda", 0.5, pattern="2:4", calib=token_batch)
    model.save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    convert(tmp_path / "dense", tmp_path / "compact", to="compact")
    assert is_compact(tmp_path / "compact") and (tmp_path / "compact" / "config.json").exists()
    convert(tmp_path / "compact", tmp_path / "back", to="dense", max_shard_size="40KB")
    state = {k: v for k, v in model.state_dict().items()}
    back = Checkpoint(tmp_path / "back")
    assert set(back.names()) == set(state)
    assert all(_same_bits(state[n], back.read([n])[n]) for n in state)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in state.items())


def test_errors_name_the_problem(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "dense.safetensors"))
    with pytest.raises(ValueError, match="not a prunekit compact file"):
        load_compact(tmp_path / "dense.safetensors")
    with pytest.raises(ValueError, match="dense or compact"):
        convert(tmp_path, tmp_path / "out", to="sparse")
    with pytest.raises(PrunekitError, match="safetensors"):
        Checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="cannot read the size"):
        parse_size("lots")


def test_parse_size_and_shard_names(tmp_path):
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64KiB") == 65536 and parse_size(123) == 123
    writer = ShardWriter(tmp_path, max_shard_size=100)
    for k in range(3):
        writer.add({f"t{k}": torch.zeros(20)})  # 80 bytes each: one per shard
    weight_map = writer.close()
    assert weight_map == {f"t{k}": f"model-0000{k + 1}-of-00003.safetensors" for k in range(3)}
    assert sorted(p.name for p in tmp_path.iterdir())[-1] == "model.safetensors.index.json"
