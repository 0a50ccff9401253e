"""Loading HF checkpoints: every broken input is one PrunekitError naming the file, at once."""

import json
import time

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.io import paths
from prunekit.io.files import safetensors_header
from prunekit.io.hf import load_causal_lm, load_tokenizer
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "llama"
    tiny_llama().save_pretrained(folder)
    return folder


def _copy(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "copy")


def test_a_whole_checkpoint_loads(saved):
    model = load_causal_lm(saved)
    assert torch.equal(model.lm_head.weight, tiny_llama().lm_head.weight)


def test_truncated_safetensors_names_the_file(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(
        PrunekitError,
        match=r"model.safetensors' is truncated or corrupt \(\d+ bytes, its tensors "
        r"need \d+\); re-download",
    ):
        load_causal_lm(folder)
    with open(weights, "r+b") as f:
        f.truncate(5)
    with pytest.raises(PrunekitError, match="too short for the header"):
        safetensors_header(weights)


def test_missing_shard_names_it(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(PrunekitError, match="lacks model-00001-of-00002.safetensors and 1 more shards"):
        load_causal_lm(folder)


def test_weights_that_do_not_fit_the_config_name_the_tensor_and_file(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(
        PrunekitError,
        match=r"does not match its config.json: model.layers.0.mlp.\w+.weight is "
        r"\[\d+, \d+\] in model.safetensors but \[\d+, \d+\] per config.json "
        r"\(and 5 more\); fix config.json",
    ):
        load_causal_lm(folder)


@pytest.mark.parametrize("name", ["./missing", "runs/missing", "missing model", "~/no/such/dir"])
def test_a_missing_local_path_fails_at_once(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(paths, "hub_reachable", lambda timeout=3.0: pytest.fail("a local path never asks the hub"))
    with pytest.raises(PrunekitError, match=f"model path '{name}' does not exist; give a checkpoint directory"):
        load_causal_lm(name)
    with pytest.raises(PrunekitError, match=f"tokenizer path '{name}' does not exist"):
        load_tokenizer(name)


def test_a_folder_without_config_is_not_a_checkpoint(tmp_path):
    with pytest.raises(PrunekitError, match="has no config.json"):
        load_causal_lm(tmp_path)


def test_hub_ids_offline_or_unreachable_fail_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(PrunekitError, match="not in the Hugging Face cache, and HF_HUB_OFFLINE is set"):
        load_causal_lm("prunekit-test/no-such-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(paths, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(PrunekitError, match="hub cannot be reached"):
        load_causal_lm("prunekit-test/no-such-model")
    assert time.perf_counter() - start < 5
