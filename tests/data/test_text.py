import pytest
import torch

from prunekit.data import calibration_batches, load_text, random_windows
from prunekit.errors import PrunekitError
from prunekit.io import paths


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
    with pytest.raises(PrunekitError, match="no column 'body'"):
        load_text(tmp_path / "d.jsonl", column="body")


def test_missing_path_is_not_a_hub_download(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "hub_reachable", lambda timeout=3.0: pytest.fail("a local path never asks the hub"))
    with pytest.raises(PrunekitError, match="does not exist; give a .txt file"):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(PrunekitError, match="--calib-data './nope/data' does not exist"):
        load_text("./nope/data", what="--calib-data")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(PrunekitError, match="'data/calib' does not exist"):
        load_text("data/calib")  # beside an existing folder: a path, not an org/name dataset


def test_binary_and_non_utf8_text_name_the_file_and_the_fix(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    with pytest.raises(
        PrunekitError,
        match=r"^--calib-data '.*latin1.txt' is not UTF-8 text \(byte 3: .*\); convert "
        r"it, e.g. iconv",
    ):
        load_text(tmp_path / "latin1.txt", what="--calib-data")
    (tmp_path / "utf16.txt").write_bytes("hello".encode("utf-16-le"))
    with pytest.raises(PrunekitError, match="utf16.txt' is a binary file .*NUL bytes"):
        load_text(tmp_path / "utf16.txt")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("fine\n")
    (folder / "b.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(PrunekitError, match="b.txt' is not UTF-8 text"):
        load_text(folder)
    (tmp_path / "bad.csv").write_bytes(b'text\n"unclosed\n\xff\xfe\n')
    with pytest.raises(PrunekitError, match="bad.csv' could not be read as csv"):
        load_text(tmp_path / "bad.csv")


def test_hub_dataset_names_fail_at_once_offline_or_unreachable(monkeypatch):
    import time

    start = time.perf_counter()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(
        PrunekitError,
        match=r"--calib-data 'prunekit-test/no-such-data' is neither a local file nor a "
        r"dataset in the datasets cache \(HF_DATASETS_OFFLINE",
    ):
        load_text("prunekit-test/no-such-data", what="--calib-data")
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(paths, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(PrunekitError, match="hub cannot be reached .* set HF_DATASETS_OFFLINE=1"):
        load_text("wikitext:wikitext-2-raw-v1")
    assert time.perf_counter() - start < 10


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


def test_heldout_windows_share_no_token_with_the_calibration_windows():
    from prunekit.data.text import heldout_windows, window_starts

    tokens = torch.arange(5000)  # every token its own position
    held = heldout_windows(tokens, nsamples=16, seqlen=50, seed=0, holdout=20)
    assert held.shape == (20, 50)
    calibrated = {int(t) for s in window_starts(5000, 16, 50, 0).tolist() for t in tokens[s : s + 50]}
    assert not calibrated & set(held.flatten().tolist())
    assert torch.equal(random_windows(tokens, 16, 50, 0)[:, 0], window_starts(5000, 16, 50, 0))
    with pytest.raises(PrunekitError, match="fewer than the 200 held out"):
        heldout_windows(tokens, nsamples=16, seqlen=50, seed=0, holdout=200)
