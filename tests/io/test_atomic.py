import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from prunekit.io import atomic_dir, write_json


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_outputs_get_the_permissions_of_a_plain_mkdir_and_open(tmp_path, umask_022):
    """Temporary entries are owner-only; a shared checkpoint must not stay that way after the rename."""
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f.txt").write_text("x")
        (tmp / "sub").mkdir()
        save_file({"w": torch.zeros(2)}, tmp / "sub" / "model.safetensors")
    write_json(tmp_path / "r.json", {"a": 1})
    assert _mode(tmp_path / "out") == 0o755 and _mode(tmp_path / "out" / "sub") == 0o755
    assert _mode(tmp_path / "out" / "f.txt") == 0o644
    assert _mode(tmp_path / "out" / "sub" / "model.safetensors") == 0o644  # safetensors itself writes 0600
    assert _mode(tmp_path / "r.json") == 0o644
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}


def test_failures_leave_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out"):
        raise RuntimeError("boom")
    with pytest.raises(TypeError):
        write_json(tmp_path / "r.json", {("tuple", "key"): 1})  # JSON keys must be strings
    assert sorted(p.name for p in tmp_path.iterdir()) == []
