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


# ---------------------------------------------------------------- output claims (issue 17)

import logging  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from prunekit.errors import PrunekitError  # noqa: E402
from prunekit.io import atomic  # noqa: E402
from prunekit.io.atomic import check_output_dir, claim_output, lock_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(out: Path, pid: int, host: str | None = None) -> Path:
    lock = lock_path(out)
    lock.write_text(
        json.dumps(
            {
                "pid": pid,
                "host": host or socket.gethostname(),
                "started": "2026-01-01 10:00:00",
                "command": "prunekit prune --out x",
            }
        )
    )
    return lock


def _siblings(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_claim_writes_atomically_and_leaves_only_the_output(tmp_path):
    out = tmp_path / "out"
    with claim_output(out) as claim:
        assert lock_path(out).exists() and str(os.getpid()) in lock_path(out).read_text()
        with claim.staging() as tmp:
            assert tmp.name.startswith(f".out.tmp-{os.getpid()}-")
            (tmp / "w.txt").write_text("new")
            assert not out.exists()  # nothing appears before the final rename
    assert (out / "w.txt").read_text() == "new" and _siblings(tmp_path) == ["out"]


def test_a_second_claim_fails_at_once_naming_the_first_run(tmp_path):
    out, errors = tmp_path / "out", []
    with claim_output(out):

        def second():
            try:
                with claim_output(out):
                    pass
            except PrunekitError as err:
                errors.append(str(err))

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(30)
    assert len(errors) == 1 and f"pid {os.getpid()} on {socket.gethostname()}, started " in errors[0]
    assert "another prunekit run" in errors[0] and "\n" not in errors[0]
    with claim_output(out):  # released: the next run may claim it
        pass
    assert not lock_path(out).exists()


def test_legacy_atomic_dir_is_claimed_too(tmp_path):
    """Two runs that both passed check_output_dir cannot both rename onto the same out."""
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("first")
        with pytest.raises(PrunekitError, match="another prunekit run"), atomic_dir(tmp_path / "out"):
            pass
    assert (tmp_path / "out" / "a").read_text() == "first"


def test_the_rename_never_replaces_an_out_that_appeared_after_the_claim(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(PrunekitError, match="kept in") as err, claim_output(out) as claim:
        with claim.staging() as tmp:
            (tmp / "mine.txt").write_text("new")
            out.mkdir()
            (out / "theirs.txt").write_text("someone else's")
    assert (out / "theirs.txt").read_text() == "someone else's" and sorted(os.listdir(out)) == ["theirs.txt"]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.prunekit-")]
    assert len(kept) == 1 and (kept[0] / "mine.txt").read_text() == "new" and str(kept[0]) in str(err.value)


def test_the_rename_never_replaces_an_out_that_changed_after_the_claim(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with (
        pytest.raises(PrunekitError, match="changed by something else"),
        claim_output(out, overwrite=True) as claim,
        claim.staging() as tmp,
    ):
        (tmp / "mine.txt").write_text("new")
        (out / "added.txt").write_text("added while we ran")
    assert sorted(os.listdir(out)) == ["added.txt", "old.txt"]


def test_overwrite_replaces_the_previous_output_only_at_the_end(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(PrunekitError, match="not empty; pass --overwrite"):
        with claim_output(out):
            pass
    with claim_output(out, overwrite=True) as claim:
        with claim.staging() as tmp:
            (tmp / "new.txt").write_text("new")
            assert (out / "old.txt").read_text() == "old"  # still the complete previous output
    assert sorted(os.listdir(out)) == ["new.txt"] and _siblings(tmp_path) == ["out"]
    with pytest.raises(KeyboardInterrupt), claim_output(out, overwrite=True) as claim, claim.staging():
        raise KeyboardInterrupt  # Ctrl-C: the previous output stays, no temporaries, no lock
    assert sorted(os.listdir(out)) == ["new.txt"] and _siblings(tmp_path) == ["out"]


def test_overwrite_never_deletes_inputs_inside_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "calib.txt").write_text("calibration text")
    with pytest.raises(PrunekitError, match="overlaps the input --calib-data"):
        with claim_output(out, inputs={"--model": "gpt2", "--calib-data": out / "calib.txt"}, overwrite=True):
            pass
    assert (out / "calib.txt").read_text() == "calibration text" and not lock_path(out).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "out"
    pid = _dead_pid()
    _write_lock(out, pid)
    stale_dir = tmp_path / f".out.tmp-{pid}-0123abcd"
    stale_dir.mkdir()
    (stale_dir / "half.safetensors").write_bytes(b"x" * 10)
    with caplog.at_level(logging.WARNING), claim_output(out) as claim, claim.staging() as tmp:
        (tmp / "a").write_text("a")
    assert f"pid {pid}" in caplog.text and "gone" in caplog.text
    assert _siblings(tmp_path) == ["out"]  # the stale temporary is removed, the lock released


def test_another_hosts_lock_is_never_taken(tmp_path):
    out = tmp_path / "out"
    lock = _write_lock(out, _dead_pid(), host="elsewhere.example")
    with pytest.raises(PrunekitError, match=f"on elsewhere.example.*delete '{lock}'"):
        with claim_output(out):
            pass


def test_an_empty_lock_is_a_run_starting_now_until_it_is_old(tmp_path):
    out = tmp_path / "out"
    lock_path(out).write_text("")
    with pytest.raises(PrunekitError, match="a run that is starting now"):
        with claim_output(out):
            pass
    os.utime(lock_path(out), (time.time() - 60, time.time() - 60))
    with claim_output(out):
        pass


def test_without_flock_the_pid_in_the_lock_decides(tmp_path, monkeypatch):
    """File systems without flock (e.g. Lustre without -o flock) fall back to the recorded pid."""
    monkeypatch.setattr(atomic, "_flock", lambda fd, wait=False: None)
    out = tmp_path / "out"
    _write_lock(out, os.getpid())  # a live process
    with pytest.raises(PrunekitError, match=f"pid {os.getpid()}"):
        with claim_output(out):
            pass
    _write_lock(out, _dead_pid())
    with claim_output(out) as claim:
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
        with pytest.raises(PrunekitError, match="another prunekit run"), claim_output(out):
            pass
        with claim.staging() as tmp:
            (tmp / "a").write_text("a")
    assert _siblings(tmp_path) == ["out"]


CHILD = """
import sys, time
from prunekit.io.atomic import claim_output
with claim_output(sys.argv[1]) as claim, claim.staging() as tmp:
    (tmp / "half.bin").write_bytes(b"x" * 100)
    print("ready", flush=True)
    time.sleep(120)
"""


def test_sigkilled_run_blocks_while_alive_and_its_leftovers_go_after(tmp_path, caplog):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(PrunekitError, match=f"pid {child.pid} on .*started"):
            with claim_output(out):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert any(name.startswith(f".out.tmp-{child.pid}-") for name in _siblings(tmp_path))
    with caplog.at_level(logging.WARNING), claim_output(out) as claim, claim.staging() as tmp:
        (tmp / "done").write_text("ok")
    assert "taking over" in caplog.text and "removing" in caplog.text
    assert _siblings(tmp_path) == ["out"] and os.listdir(out) == ["done"]


def test_check_output_dir_errors_are_one_line_prunekit_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrunekitError, match="is a file"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(PrunekitError, match="cannot be created: .* is a file"):
        check_output_dir(tmp_path / "file" / "out")
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(PrunekitError, match="overlaps the input"):
        check_output_dir(model / "pruned", [model])
