"""Lazy (block-by-block from safetensors) pruning must write exactly what the in-memory path writes."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prunekit
from prunekit.activations import Activations, choose_offload
from prunekit.errors import PrunekitError
from prunekit.io.compact import load_compact
from prunekit.io.lazy import LazyModel, prune_lazy
from tests.conftest import tiny_llama


def _state(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _assert_identical(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert set(ref) == set(got)
    for name in ref:
        assert ref[name].dtype == got[name].dtype, name
        assert torch.equal(ref[name].view(torch.uint8), got[name].view(torch.uint8)), name


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A random 2-block LLaMA saved in several small shards (exercises the index)."""
    path = tmp_path_factory.mktemp("lazy") / "src"
    tiny_llama(seed=3).save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").exists()
    return path


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))


def _in_memory(source: Path, out: Path, **kwargs) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source)
    prunekit.prune(model, batch_size=3, **kwargs)
    model.save_pretrained(out)
    return _state(out)


@pytest.mark.parametrize("mode", ["device", "cpu", "disk"])
def test_lazy_equals_in_memory_wanda(source, tokens, tmp_path, mode):
    before = _digest(source)
    ref = _in_memory(source, tmp_path / "ref", method="wanda", sparsity=0.5, calib=tokens)
    report = prune_lazy(
        source,
        tmp_path / "lazy",
        "wanda",
        0.5,
        calib=tokens,
        batch_size=3,
        offload_activations=mode,
        max_shard_size="20KB",
    )
    _assert_identical(ref, _state(tmp_path / "lazy"))
    assert report.metrics["offload_activations"] == mode
    assert report.sparsity == pytest.approx(0.5)
    assert len(report.layers) == 14 and report.settings["blocks"] == "model.layers"
    index = json.loads((tmp_path / "lazy" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ref)
    assert (tmp_path / "lazy" / "config.json").exists() and (tmp_path / "lazy" / "generation_config.json").exists()
    assert _digest(source) == before  # the input checkpoint is never written to


def test_lazy_output_loads_with_from_pretrained(source, tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    prune_lazy(source, tmp_path / "lazy", "wanda", 0.5, pattern="2:4", calib=tokens)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lazy")
    weight = model.model.layers[1].mlp.down_proj.weight
    assert (weight.reshape(-1, 4) != 0).sum(dim=1).max() <= 2
    assert model.lm_head.weight.count_nonzero() == model.lm_head.weight.numel()


def test_lazy_equals_in_memory_single_file_magnitude(tmp_path):
    """A single model.safetensors (no index), and a method that needs no calibration data."""
    tiny_llama(seed=4).save_pretrained(tmp_path / "src")
    ref = _in_memory(tmp_path / "src", tmp_path / "ref", method="magnitude", sparsity=0.6)
    prune_lazy(tmp_path / "src", tmp_path / "lazy", "magnitude", 0.6)
    _assert_identical(ref, _state(tmp_path / "lazy"))
    shards = sorted(p.name for p in (tmp_path / "lazy").glob("*.safetensors"))
    assert shards == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]  # one per block + the rest


def test_lazy_equals_in_memory_hessian_method(source, tokens, tmp_path):
    if "sparsegpt" not in prunekit.METHODS:
        pytest.skip("sparsegpt is not registered")
    ref = _in_memory(source, tmp_path / "ref", method="sparsegpt", sparsity=0.5, calib=tokens)
    prune_lazy(source, tmp_path / "lazy", "sparsegpt", 0.5, calib=tokens, batch_size=3, offload_activations="disk")
    _assert_identical(ref, _state(tmp_path / "lazy"))


def test_lazy_compact_output_restores_the_dense_result(source, tokens, tmp_path):
    ref = _in_memory(source, tmp_path / "ref", method="wanda", sparsity=0.5, calib=tokens)
    prune_lazy(source, tmp_path / "lazy", "wanda", 0.5, calib=tokens, batch_size=3, save_format="compact")
    restored = load_compact(tmp_path / "lazy")
    assert set(restored) == set(ref) and all(torch.equal(ref[k], restored[k]) for k in ref)


def test_lazy_rejects_bad_settings_before_writing(source, tokens, tmp_path):
    with pytest.raises(ValueError, match="overlaps the input"):
        prune_lazy(source, source / "out", "wanda", 0.5, calib=tokens)
    with pytest.raises(ValueError, match="in memory otherwise"):
        prune_lazy(source, tmp_path / "out", "magnitude", 0.5, group="global")
    with pytest.raises(ValueError, match="offload_activations"):
        prune_lazy(source, tmp_path / "out", "wanda", 0.5, calib=tokens, offload_activations="gpu")
    assert not (tmp_path / "out").exists()


def test_skeleton_holds_no_weights_and_onload_offload_round_trip(source):
    lazy = LazyModel.open(source, device="cpu")
    assert all(p.device.type == "meta" for p in lazy.model.parameters())
    names = lazy.block_names("model.layers", 1)
    lazy.onload(names)
    assert lazy.tensor("model.layers.1.mlp.up_proj.weight").device.type == "cpu"
    lazy.offload(names)
    assert all(p.device.type == "meta" for p in lazy.model.parameters())
    assert "lm_head.weight" not in lazy.input_names("model.layers")
    assert set(lazy.outside_names("model.layers")) == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    }


def test_choose_offload():
    cpu = torch.device("cpu")
    assert choose_offload("disk", 1, cpu) == "disk" and choose_offload("cpu", 1 << 60, cpu) == "cpu"
    assert choose_offload("auto", 1 << 10, cpu) == "device"
    assert choose_offload("auto", 1 << 60, cpu) == "disk"
    with pytest.raises(ValueError, match="choose from"):
        choose_offload("ram", 1, cpu)


def test_disk_activations_round_trip(tmp_path):
    acts = Activations("disk", torch.device("cpu"), tmp_path)
    hidden, cos = torch.randn(2, 3, 4), torch.randn(2, 3, 8)
    acts.append((hidden,), {"position_embeddings": (cos, cos), "attention_mask": None})
    args, kwargs = acts.call(0)
    assert torch.equal(args[0], hidden) and torch.equal(kwargs["position_embeddings"][0], cos)
    acts.update(0, hidden * 2)
    assert torch.equal(acts.call(0)[0][0], hidden * 2)
    assert len(list(tmp_path.glob("hidden-*.bin"))) == 1 and acts.nbytes() == hidden.numel() * 4


# ---------------------------------------------------------------- overlapped reading and writing (issue 18)


@pytest.fixture(scope="module")
def deep_source(tmp_path_factory) -> Path:
    """Five blocks, so that reading ahead, pruning and writing behind all overlap several times."""
    path = tmp_path_factory.mktemp("lazy-deep") / "src"
    tiny_llama(layers=5, seed=5).save_pretrained(path, max_shard_size="20KB")
    return path


def _block_of(names) -> int:
    return int(next(iter(names)).split(".")[2])


def test_overlapped_equals_serial_and_in_memory_and_holds_at_most_three_blocks(deep_source, tokens, tmp_path):
    from prunekit.io import lazy as lazy_module

    events, load, write_block = [], lazy_module.LazyModel.load, lazy_module.StreamedBlocks._write_block

    def logged_load(self, names):
        events.append(("read", _block_of(names)))
        return load(self, names)

    def logged_write(self, index, tensors):
        time.sleep(0.1)  # a slow disk: a read that did not wait for the write shows up out of order
        write_block(self, index, tensors)
        events.append(("written", index))

    ref = _in_memory(deep_source, tmp_path / "ref", method="wanda", sparsity=0.5, calib=tokens)
    serial = prune_lazy(deep_source, tmp_path / "serial", "wanda", 0.5, calib=tokens, batch_size=3, overlap=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lazy_module.LazyModel, "load", logged_load)
        patch.setattr(lazy_module.StreamedBlocks, "_write_block", logged_write)
        report = prune_lazy(deep_source, tmp_path / "overlap", "wanda", 0.5, calib=tokens, batch_size=3)
    _assert_identical(ref, _state(tmp_path / "serial"))
    _assert_identical(ref, _state(tmp_path / "overlap"))
    assert report.layers == serial.layers and report.timings["read_s"] > 0 and report.timings["write_s"] > 0
    assert sorted(i for kind, i in events if kind == "read") == list(range(5))
    for k, (kind, i) in enumerate(events):  # reading block i starts only once block i-3 is written and freed
        assert kind != "read" or ("written", i - 3) in events[:k] or i < 3


@pytest.mark.parametrize(
    "method,overlap,threaded", [("wanda", None, True), ("sparsegpt", None, False), ("sparsegpt", True, True)]
)
def test_hessian_methods_read_and_write_on_the_main_thread_unless_asked(
    deep_source, tokens, tmp_path, monkeypatch, method, overlap, threaded
):
    """Their per-layer Hessians beside two extra resident blocks broke the memory budget, for IO that their
    solve dwarfs: by default they run serially; ``overlap=True`` still overlaps them."""
    from prunekit.io import overlap as overlap_module

    stages, init = [], overlap_module.Stage.__init__

    def logged(self, name, threaded, *args):
        stages.append(threaded)
        init(self, name, threaded, *args)

    monkeypatch.setattr(overlap_module.Stage, "__init__", logged)
    report = prune_lazy(deep_source, tmp_path / "out", method, 0.5, calib=tokens, batch_size=3, overlap=overlap)
    assert stages == [threaded, threaded] and report.metrics["io_overlap"] is threaded


@pytest.mark.parametrize("stage", ["read", "write"])
def test_an_error_in_the_reader_or_writer_thread_is_raised_as_is_and_leaves_no_output(
    deep_source, tokens, tmp_path, monkeypatch, stage
):
    import threading

    from prunekit.io import compact
    from prunekit.io import lazy as lazy_module

    err = OSError(28, f"No space left on device (injected in the {stage} thread)")
    calls = {"n": 0}

    def failing(real):
        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise err
            return real(*args, **kwargs)

        return call

    if stage == "read":
        monkeypatch.setattr(lazy_module.LazyModel, "load", failing(lazy_module.LazyModel.load))
    else:
        monkeypatch.setattr(compact, "save_file", failing(compact.save_file))
    out = tmp_path / "out"
    with pytest.raises(OSError) as raised:
        prune_lazy(deep_source, out, "wanda", 0.5, calib=tokens, batch_size=3, max_shard_size="20KB")
    assert raised.value is err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary, no lock
    assert not [t for t in threading.enumerate() if t.name.startswith("prunekit-")]
    prune_lazy(deep_source, out, "wanda", 0.5, calib=tokens, batch_size=3)  # the claim is free again


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings from /proc")
def test_disk_activations_map_a_file_only_while_it_is_used(tmp_path):
    """Files kept mapped would count every page touched in the resident size: the disk would save nothing."""
    acts = Activations("disk", torch.device("cpu"), tmp_path)
    for j in range(3):
        acts.append((torch.full((2, 3, 4), float(j)),), {})
    args, _ = acts.call(1)
    assert str(tmp_path / "hidden-000001.bin") in Path("/proc/self/maps").read_text()
    del args
    acts.update(2, acts.call(2)[0][0] + 1)
    assert str(tmp_path) not in Path("/proc/self/maps").read_text()
    assert [float(acts.call(j)[0][0].mean()) for j in range(3)] == [0.0, 1.0, 3.0]


def test_lazy_writes_in_the_checkpoints_own_dtype(tokens, tmp_path):
    """A bfloat16 checkpoint comes out bfloat16 (statistics in float32 inside), as the in-memory path writes it."""
    from transformers import AutoModelForCausalLM

    tiny_llama(layers=3, seed=6).to(torch.bfloat16).save_pretrained(tmp_path / "src", max_shard_size="20KB")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.bfloat16)
    prunekit.prune(model, "wanda", 0.5, calib=tokens, batch_size=3)
    model.save_pretrained(tmp_path / "ref")
    prune_lazy(tmp_path / "src", tmp_path / "lazy", "wanda", 0.5, calib=tokens, batch_size=3)
    got = _state(tmp_path / "lazy")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    _assert_identical(_state(tmp_path / "ref"), got)


@pytest.mark.parametrize("name", ["gemma3", "gemma2"])
def test_lazy_gives_each_block_its_own_arguments(name, tmp_path):
    """Gemma's sliding-window and full-attention blocks get other masks and rotary tables than block 0: the lazy
    path records them without loading any block and prunes exactly like the in-memory path."""
    from tests.zoo import build, token_ids

    build(name).save_pretrained(tmp_path / "src", max_shard_size="40KB")
    calib = token_ids(6, 24, seed=2)
    ref = _in_memory(tmp_path / "src", tmp_path / "ref", method="wanda", sparsity=0.5, calib=calib)
    prune_lazy(tmp_path / "src", tmp_path / "lazy", "wanda", 0.5, calib=calib, batch_size=3)
    _assert_identical(ref, _state(tmp_path / "lazy"))


def test_the_lazy_report_has_the_in_memory_reports_coverage(source, tokens, tmp_path):
    """Issue 28 item 4: the lazy path's report had no coverage and no experts section (two report builders)."""
    from transformers import AutoModelForCausalLM

    lazy = prune_lazy(source, tmp_path / "lazy", "wanda", 0.5, calib=tokens, batch_size=3, exclude=["*.o_proj"])
    model = AutoModelForCausalLM.from_pretrained(source)
    memory = prunekit.prune(model, "wanda", 0.5, calib=tokens, batch_size=3, exclude=["*.o_proj"])
    assert lazy.coverage == memory.coverage and len(lazy.coverage["left_dense"]) == 2  # the two o_proj
    assert lazy.experts is None and memory.experts is None
    assert lazy.settings["seqlen"] == memory.settings["seqlen"] == 16
    assert {k: v for k, v in lazy.settings.items() if k not in ("source", "out", "lazy")} == memory.settings


def test_a_checkpoint_whose_names_are_not_the_modules_is_refused_before_anything_is_written(tmp_path):
    """transformers 5 saves MoE experts under other names than its modules use: one line, no output."""
    from tests.zoo import build

    build("mixtral").save_pretrained(tmp_path / "src")
    with pytest.raises(PrunekitError, match="prune it in memory") as err:
        prune_lazy(tmp_path / "src", tmp_path / "lazy", "magnitude", 0.5)
    assert "\n" not in str(err.value) and not (tmp_path / "lazy").exists()


def test_a_lazy_compact_output_says_how_to_load_it(source, tokens, tmp_path):
    """Issue 28 item 15: ``from_pretrained`` on a compact output fails with "no file named model.safetensors"; the
    output's README says to use prunekit.load or prunekit convert, and the generation config is there."""
    prune_lazy(source, tmp_path / "lazy", "wanda", 0.5, calib=tokens, save_format="compact")
    notice = (tmp_path / "lazy" / "README.md").read_text()
    assert "prunekit.load" in notice and "prunekit convert" in notice
    assert (tmp_path / "lazy" / "generation_config.json").exists()
