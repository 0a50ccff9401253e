import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.data import calibration_batches, load_text, random_windows


def test_random_windows_published_protocol():
    tokens = torch.arange(1000)
    windows = random_windows(tokens, 4, 16, seed=0)
    starts = torch.randint(0, 1000 - 16 - 1, (4,), generator=torch.Generator().manual_seed(0))
    assert windows.shape == (4, 16)
    assert windows[:, 0].tolist() == starts.tolist()
    assert torch.equal(windows, random_windows(tokens, 4, 16, seed=0))


def test_too_little_text_is_clear():
    with pytest.raises(ValueError, match="fewer than nsamples x seqlen"):
        random_windows(torch.arange(100), 8, 16)


def test_load_text_file_dir_and_json(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n")
    assert load_text(tmp_path / "a.txt") == "hello\n"
    (tmp_path / "d.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert load_text(tmp_path / "d.jsonl") == "one\n\ntwo"
    with pytest.raises(ValueError, match="no column 'body'"):
        load_text(tmp_path / "d.jsonl", column="body")


def test_missing_path_is_not_a_hub_download(tmp_path):
    with pytest.raises(PrunekitError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(PrunekitError):
        load_text("./nope/data")


def test_saved_dataset_directory(tmp_path):
    import datasets
    datasets.Dataset.from_dict({"text": ["a b", "c"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_text(tmp_path / "ds") == "a b\n\nc"


def test_calibration_from_text_path(tmp_path):
    from transformers import AutoTokenizer
    from prunekit.cli import demo_assets
    tok = AutoTokenizer.from_pretrained(demo_assets() / "kjv-llama-5m")
    text = (demo_assets() / "kjv" / "test.txt").read_text()[:20000]
    (tmp_path / "t.txt").write_text(text)
    batches = calibration_batches(str(tmp_path / "t.txt"), tok, nsamples=6, seqlen=32, batch_size=4)
    assert [b.shape for b in batches] == [(4, 32), (2, 32)]
    with pytest.raises(ValueError, match="needs a tokenizer"):
        calibration_batches(str(tmp_path / "t.txt"), None)
