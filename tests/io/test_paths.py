"""Paths: local or hub, inputs never overlapped by outputs, writability and free space before any work."""

import logging
import os

import pytest

from prunekit.errors import PrunekitError
from prunekit.io import paths
from prunekit.io.paths import (
    check_dir_writable,
    check_file_writable,
    check_free_space,
    check_paths,
    checkpoint_bytes,
    is_hub_id,
    looks_local,
    require_hub,
    require_local,
)


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    return folder


# ---------------------------------------------------------------- local or hub


@pytest.mark.parametrize(
    "name", ["gpt2", "org/name", "EleutherAI/pythia-1.4b", "wikitext:wikitext-2-raw-v1", "timm:convnext_tiny.fb_in1k"]
)
def test_hub_names_are_not_local(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id(name) and not looks_local(name)


@pytest.mark.parametrize(
    "name",
    ["./model", "/abs/model", "~/model", "calib.txt", "a/b/c", "my model", "weights.pth", "org--x/name", "../up"],
)
def test_paths_that_cannot_be_hub_names_are_local(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_local(name)


def test_existing_paths_and_paths_under_an_existing_folder_are_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "runs").mkdir()
    assert looks_local("gpt2")  # a local folder wins, as in from_pretrained
    assert looks_local("runs/pruned")  # a relative path under an existing folder is not an org/name id
    assert not looks_local("other/pruned")


def test_require_local_names_what_and_the_fix(tmp_path):
    assert require_local(tmp_path, "model path") == tmp_path
    with pytest.raises(PrunekitError, match=r"^calibration data '.*missing.txt' does not exist; give a file$"):
        require_local(tmp_path / "missing.txt", "calibration data", "give a file")


def test_offline_hub_names_fail_at_once_unless_cached(monkeypatch):
    monkeypatch.setattr(paths, "hub_reachable", lambda timeout=3.0: pytest.fail("no network probe when offline"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PrunekitError, match="not in the Hugging Face cache, and HF_HUB_OFFLINE is set"):
        require_hub("org/name", "model", cached=False)
    assert require_hub("org/name", "model", cached=True) is True  # read from the cache only


def test_unreachable_hub_fails_at_once_unless_cached(monkeypatch, caplog):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(paths, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(PrunekitError, match="hub cannot be reached"):
        require_hub("org/name", "model", cached=False)
    with caplog.at_level(logging.WARNING):
        assert require_hub("org/name", "model", cached=True) is True
    assert "using the cached model" in caplog.text
    monkeypatch.setattr(paths, "hub_reachable", lambda timeout=3.0: True)
    assert require_hub("org/name", "model", cached=False) is False


def test_hub_probe_reports_a_dead_endpoint_quickly(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # discard port: nothing listens
    assert paths.hub_reachable(timeout=1.0) is False
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert paths._hub_address() == ("proxy.internal", 3128)


# ---------------------------------------------------------------- inputs are sacred


def test_json_pointing_into_the_model_is_refused(model):
    """Issue 17 #1: --json M/config.json replaced the input's config."""
    with pytest.raises(
        PrunekitError,
        match=r"--json .*config.json' overlaps the input --model \(it is inside "
        r".*model'\)",
    ):
        check_paths({"--json": model / "config.json"}, {"--model": model})
    with pytest.raises(PrunekitError, match=r"--json .* overlaps the input --model \(it is inside"):
        check_paths({"--json": model / "report.json"}, {"--model": model})
    with pytest.raises(PrunekitError, match=r"--json .* overlaps the input --recipe \(it is '.*config.json'\)"):
        check_paths({"--json": model / "config.json"}, {"--recipe": model / "config.json"})


def test_outputs_that_contain_or_equal_inputs_are_refused(model, tmp_path):
    calib = tmp_path / "data" / "calib.txt"
    calib.parent.mkdir()
    calib.write_text("text")
    with pytest.raises(PrunekitError, match=r"--out .* overlaps the input --calib-data \(it contains"):
        check_paths({"--out": tmp_path / "data"}, {"--model": model, "--calib-data": calib})
    with pytest.raises(PrunekitError, match="overlaps the input --model"):
        check_paths({"--out": model}, {"--model": model})
    check_paths(
        {"--out": tmp_path / "pruned", "--json": tmp_path / "r.json"},
        {"--model": model, "--calib-data": calib, "--eval-data": None, "--tokenizer": "gpt2"},
    )


def test_symlinks_and_hard_links_are_followed(model, tmp_path):
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(PrunekitError, match="overlaps the input --model"):
        check_paths({"--out": tmp_path / "link" / "pruned"}, {"--model": model})
    os.link(model / "config.json", tmp_path / "hard.json")
    with pytest.raises(PrunekitError, match=r"overlaps the input --model \(it is"):
        check_paths({"--json": tmp_path / "hard.json"}, {"--model": model / "config.json"})


def test_json_inside_out_is_refused(tmp_path):
    with pytest.raises(PrunekitError, match="--json .* is inside --out .* replaced as a whole"):
        check_paths({"--out": tmp_path / "out", "--json": tmp_path / "out" / "r.json"}, {})
    with pytest.raises(PrunekitError, match="--out and --json are the same path"):
        check_paths({"--out": tmp_path / "x", "--json": tmp_path / "x"}, {})


# ---------------------------------------------------------------- writable before any work


def test_out_under_a_file_cannot_be_created(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(PrunekitError, match=r"--out .* cannot be created: .*/f' is a file"):
        check_dir_writable(tmp_path / "f" / "sub" / "out")
    with pytest.raises(PrunekitError, match="--out .* is a file; give a directory"):
        check_dir_writable(tmp_path / "f")
    assert check_dir_writable(tmp_path / "new" / "deeper" / "out") == tmp_path / "new" / "deeper" / "out"


def test_json_that_is_a_directory_or_under_a_file_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(PrunekitError, match="--json .* is a directory; give a file path"):
        check_file_writable(tmp_path / "d")
    with pytest.raises(PrunekitError, match="cannot be created"):
        check_file_writable(tmp_path / "f" / "r.json")
    assert check_file_writable(tmp_path / "d" / "r.json") == tmp_path / "d" / "r.json"


def test_read_only_folders_are_refused_by_access_semantics(tmp_path, monkeypatch):
    """Root ignores permission bits, so the os.access answer is simulated; the next test uses chmod."""
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(paths, "_can_write_in", lambda folder: folder != ro)
    with pytest.raises(PrunekitError, match=r"--out .* cannot be written: .*/ro' is not writable"):
        check_dir_writable(ro / "out")
    with pytest.raises(PrunekitError, match=r"--json .* cannot be written"):
        check_file_writable(ro / "sub" / "r.json")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_folders_are_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PrunekitError, match="is not writable"):
            check_dir_writable(ro / "out")
    finally:
        ro.chmod(0o755)


def test_short_free_space_warns(tmp_path, caplog, model):
    with caplog.at_level(logging.WARNING):
        assert check_free_space(tmp_path / "out", 1)
        assert check_free_space(tmp_path / "out", None)
        assert not check_free_space(tmp_path / "not" / "yet" / "out", 10**18)
    assert "GB free on its disk, the output needs about 1000000000.00 GB" in caplog.text
    assert checkpoint_bytes(model) == 100 and checkpoint_bytes("gpt2") is None
