from pathlib import Path

import pytest

from prunekit.errors import PrunekitError
from prunekit.eval.zeroshot import format_table, mean_metrics, parse_tasks, task_metrics, zeroshot
from tests.conftest import fixture_path, tiny_llama

TASK_DIR = Path(__file__).resolve().parents[1] / "data" / "zeroshot_task"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_zeroshot_runs_a_local_task_end_to_end_on_an_in_memory_model(offline):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fixture_path("kjv-llama-5m"))
    model = tiny_llama(vocab=len(tokenizer)).train()
    result = zeroshot(model, tokenizer, "kjv_cloze", batch_size=4, limit=6, include_path=TASK_DIR)
    row = result["tasks"]["kjv_cloze"]
    assert row["n"] == 6
    assert 0 <= row["acc"] <= 1 and 0 <= row["acc_norm"] <= 1
    assert {k * 6 for k in (row["acc"], row["acc_norm"])} <= set(range(7))  # whole documents right
    assert result["mean"] == {"acc": row["acc"], "acc_norm": row["acc_norm"]}
    assert model.training  # the caller's mode is restored
    table = format_table(result)
    assert "| kjv_cloze |" in table and "**mean**" in table


def test_task_metrics_reads_lm_eval_keys():
    row = {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25, "acc_norm_stderr,none": "N/A"}
    assert task_metrics(row, {"original": 10, "effective": 4}) == {
        "acc": 0.5,
        "acc_stderr": 0.1,
        "acc_norm": 0.25,
        "n": 4,
    }


def test_mean_metrics_only_over_metrics_every_task_has():
    per_task = {"a": {"acc": 0.5, "acc_norm": 0.75}, "b": {"acc": 0.25}}
    assert mean_metrics(per_task) == {"acc": 0.375}


def test_format_table_fractions_and_missing_metrics():
    """Accuracy as a fraction with 4 decimals, as the README and docs give it (not a percentage)."""
    table = format_table({"tasks": {"b": {"acc": 0.25, "acc_stderr": 0.05, "n": 8}}, "mean": {"acc": 0.25}})
    assert "| b | 0.2500 ± 0.0500 | – | 8 |" in table
    assert "| **mean** | 0.2500 | – | |" in table


def test_parse_tasks_and_errors(tmp_path):
    assert parse_tasks("boolq, piqa,") == ["boolq", "piqa"]
    with pytest.raises(ValueError, match="no zero-shot tasks"):
        parse_tasks(" , ")
    with pytest.raises(PrunekitError, match="include-path"):
        zeroshot(tiny_llama(), None, "kjv_cloze", include_path=tmp_path / "missing")
