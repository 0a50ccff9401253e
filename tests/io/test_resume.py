"""Runs that resume (issue 25): a run killed with SIGKILL right after block k is durably kept, rerun, continues from
block k + 1 and writes exactly what an uninterrupted run writes, in memory and with --lazy; a rerun with another
setting or input is refused with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunekit.cli import demo_assets, main
from prunekit.errors import PrunekitError
from prunekit.io.resume import ResumeState, differences, fingerprint, state_path
from tests import zoo

ROOT = Path(__file__).resolve().parents[2]

# Send this process ``SIGNAL`` (SIGKILL: no cleanup of any kind) right after the progress of block ``K`` is on disk.
KILL_AFTER = """
import os, signal, sys
from prunekit.io import resume
commit = resume.ResumeState.commit
def commit_then_die(self, done, extra):
    commit(self, done, extra)
    if done == {k}:
        os.kill(os.getpid(), signal.{signal})
resume.ResumeState.commit = commit_then_die
from prunekit.cli import main
sys.exit(main({argv!r}))
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """A 3-block LLaMA from the zoo with the bundled tokenizer, and calibration text."""
    root = tmp_path_factory.mktemp("resume")
    zoo.build("llama").save_pretrained(root / "model")
    zoo.processor("llama").save_pretrained(root / "model")
    (root / "train.txt").write_text((demo_assets() / "kjv" / "test.txt").read_text()[:20000])
    return root


def argv(job: Path, out: Path, *extra: str) -> list[str]:
    data = ["--calib-data", str(job / "train.txt"), "--nsamples", "4", "--batch-size", "2", "--seqlen", "32"]
    return ["prune", "--model", str(job / "model"), *data, "--out", str(out), *extra]


def weights(out: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(out.glob("*.safetensors")):
        found.update(load_file(file))
    return found


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8))


def killed_after(block: int, args: list[str], signal: str = "SIGKILL") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    code = KILL_AFTER.format(k=block, argv=args, signal=signal)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def error_line(capsys, args: list[str]) -> str:
    """The one ``error:`` line a failed run prints (progress bars aside), with no traceback."""
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def interrupted_after(monkeypatch, block: int) -> None:
    """Ctrl-C right after the progress of ``block`` is kept (KeyboardInterrupt where the progress is committed)."""
    from prunekit.io import resume

    commit = resume.ResumeState.commit

    def commit_then_interrupt(self, done, extra):
        commit(self, done, extra)
        if done == block:
            raise KeyboardInterrupt

    monkeypatch.setattr(resume.ResumeState, "commit", commit_then_interrupt)


@pytest.mark.parametrize(
    "mode", [pytest.param([], id="in memory"), pytest.param(["--lazy"], id="lazy", marks=pytest.mark.slow)]
)
def test_killed_after_a_block_resumes_to_the_same_output(job, tmp_path, capsys, caplog, mode):
    """SIGKILL right after block 1 of 3 is kept; reruns with another seed or a touched calibration file are
    refused (one line naming it); the same command continues from block 2, says so, and writes the same tensors
    as an uninterrupted run; then nothing is left beside --out. (--lazy: Wanda, whose writes run on a thread that
    also records the progress; in memory: SparseGPT.)"""
    method = ["--method", "wanda", "--pattern", "2:4"] if mode else ["--method", "sparsegpt"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(argv(job, ref, *method, *mode)) == 0
    killed = killed_after(1, argv(job, out, *method, *mode))
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    state = state_path(out)
    assert json.loads((state / "progress.json").read_text())["done"] == 1
    capsys.readouterr()

    changed = error_line(capsys, argv(job, out, *method, *mode, "--seed", "1"))
    assert "interrupted run" in changed and "seed was 0, now 1" in changed and "--no-resume" in changed
    calib = job / "train.txt"
    stat = calib.stat()
    os.utime(calib, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert "--calib-data changed" in error_line(capsys, argv(job, out, *method, *mode))
    finally:
        os.utime(calib, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (state / "progress.json").exists()  # a refusal keeps the state

    assert main(argv(job, out, *method, *mode)) == 0
    assert "resuming the interrupted run" in caplog.text and "continuing from block 2" in caplog.text
    assert_identical(weights(ref), weights(out))
    report = json.loads((out / "prune_report.json").read_text())
    assert "block_2_s" in report["timings"] and "block_1_s" not in report["timings"]  # only block 2 was pruned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref"]  # no state, temporary or lock


@pytest.mark.slow
def test_sigterm_keeps_the_progress(job, tmp_path):
    """SIGTERM (a scheduler's preemption, torchrun stopping the ranks) is an interruption: the temporaries go, the
    progress stays, exit code 143 and one line saying how to go on."""
    out = tmp_path / "out"
    done = killed_after(0, argv(job, out, "--method", "wanda"), "SIGTERM")
    assert done.returncode == 143, done.stderr
    assert f"terminated: --out was not written; the progress is kept in {str(state_path(out))!r}" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.resume"]


def test_resume_needs_an_interrupted_run_and_no_resume_discards_one(job, tmp_path, capsys):
    out = tmp_path / "out"
    assert "no interrupted run to resume" in error_line(capsys, argv(job, out, "--resume"))
    state = state_path(out)
    state.mkdir()
    (state / "progress.json").write_text(json.dumps({"version": 1, "fingerprint": {}, "done": 0}))
    assert "differs from this one" in error_line(capsys, argv(job, out, "--method", "magnitude"))
    assert main(argv(job, out, "--method", "magnitude", "--no-resume")) == 0
    assert not state.exists() and (out / "prune_report.json").exists()


def test_an_interrupted_lazy_run_resumes_to_the_same_output(job, tmp_path, capsys, monkeypatch):
    """Ctrl-C after block 0 of a --lazy SparseGPT run (no IO threads: the progress is committed on the main
    thread) keeps the progress and says so; the same command finishes it with the uninterrupted run's tensors."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(argv(job, ref, "--lazy", "--method", "sparsegpt")) == 0
    with monkeypatch.context() as patch:
        interrupted_after(patch, 0)
        assert main(argv(job, out, "--lazy", "--method", "sparsegpt")) == 130
    err = capsys.readouterr().err
    assert f"interrupted: --out was not written; the progress is kept in {str(state_path(out))!r}" in err
    assert not out.exists() and json.loads((state_path(out) / "progress.json").read_text())["done"] == 0
    assert main(argv(job, out, "--lazy", "--method", "sparsegpt")) == 0
    assert_identical(weights(ref), weights(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref"]


def test_a_failed_run_leaves_no_state(job, tmp_path, capsys, monkeypatch):
    """A run that fails with an error (not an interruption) leaves nothing behind: a rerun would fail the same."""
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupted_after(patch, 0)
        assert main(argv(job, out, "--method", "wanda")) == 130
    assert (state_path(out) / "progress.json").exists()
    from prunekit import engine

    def fail(*args, **kwargs):
        raise PrunekitError("simulated failure")

    monkeypatch.setattr(engine, "_prune_layer", fail)
    assert "simulated failure" in error_line(capsys, argv(job, out, "--method", "wanda"))  # resumed, then failed
    assert not state_path(out).exists() and not out.exists()


def test_fingerprints_name_what_changed(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("abc")
    then = fingerprint({"sparsity": 0.5, "overwrite": False}, {"--calib-data": str(data), "calib": torch.arange(4)})
    same = fingerprint({"sparsity": 0.5, "overwrite": True}, {"--calib-data": str(data), "calib": torch.arange(4)})
    assert differences(then, same) == []  # overwrite does not change what is computed
    data.write_text("abcd")
    now = fingerprint({"sparsity": 0.6}, {"--calib-data": str(data), "calib": torch.arange(5)})
    assert differences(then, now) == [
        "sparsity was 0.5, now 0.6",
        "--calib-data changed since (or is another one)",
        "calib changed since (or is another one)",
    ]


def test_a_python_run_without_an_output_keeps_no_state():
    assert not ResumeState.open(None, None, {}).keep
    with pytest.raises(PrunekitError, match="--resume needs --out"):
        ResumeState.open(None, True, {})
