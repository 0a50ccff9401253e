"""Faults and bad input, as a user meets them on the command line (issue 17's matrix).

After every test the inputs hash as before, and ``--out`` is absent, the complete previous output or the
complete new output: never a half-written one, never a leftover temporary.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import prunekit.commands as commands
from prunekit.cli import demo_assets, main
from tests.test_cli import _prune_args as args  # the CLI tests' prune command line
from tests.test_cli import checkpoint  # noqa: F401  (module-scoped: a tiny LLaMA with tokenizer and text)
from tests.test_cli_models import models  # noqa: F401  (module-scoped: zoo models of every class, with data)
from tests.test_cli_models import prune_args as model_args

ROOT = Path(__file__).resolve().parents[1]


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(autouse=True)
def inputs_untouched(checkpoint):  # noqa: F811
    before = digest(checkpoint)
    yield
    assert digest(checkpoint) == before, "an input file was changed"


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp-" in p.name or p.name.endswith(".lock")]


def fail(capsys, argv: list[str], match: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]  # progress bars share stderr
    assert "Traceback" not in err and len(errors) == 1 and match in errors[0], err
    return errors[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if any weights are loaded: the check must come before."""

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the check")

    monkeypatch.setattr(commands, "load_causal_lm", refuse)
    monkeypatch.setattr(commands, "load_hf_model", refuse)
    monkeypatch.setattr("prunekit.io.timm.load_vision_model", refuse)  # timm models load through their class


# ---------------------------------------------------------------- data loss (1-3)


def test_json_may_not_point_into_an_input(checkpoint, tmp_path, capsys, no_loading):  # noqa: F811
    fail(capsys, args(checkpoint, tmp_path / "o", "--json", str(checkpoint / "model" / "config.json")), "--json")
    assert not (tmp_path / "o").exists()


def test_overwrite_never_deletes_inputs_inside_out(checkpoint, tmp_path, capsys, no_loading):  # noqa: F811
    out = tmp_path / "o"
    out.mkdir()
    shutil.copy(checkpoint / "train.txt", out / "train.txt")
    argv = args(checkpoint, out, "--overwrite")
    argv[argv.index("--calib-data") + 1] = str(out / "train.txt")
    fail(capsys, argv, "--calib-data")
    assert (out / "train.txt").exists()


# ---------------------------------------------------------------- found before any work (4-5)


def test_json_that_is_a_directory_fails_before_loading(checkpoint, tmp_path, capsys, no_loading):  # noqa: F811
    (tmp_path / "j").mkdir()
    fail(capsys, args(checkpoint, tmp_path / "o", "--json", str(tmp_path / "j")), "--json")


def test_out_that_cannot_be_written_fails_before_loading(checkpoint, tmp_path, capsys, no_loading):  # noqa: F811
    (tmp_path / "file").write_text("x")
    fail(capsys, args(checkpoint, tmp_path / "file" / "o"), "--out")


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--group", "per-row"], "comparison group"),
        (["--update", "admmm"], "unknown update"),
        (["--method-param", "alpha=1"], "no parameter"),
        (["--allocation", "owll"], "unknown allocation"),
        (["--layer-types", "dense"], "layer type"),
        (["--seqlen", "0"], "seqlen"),
        (["--save-format", "compactt"], "save_format"),
        (["--device", "cuda:7"], "cuda"),
    ],
)
def test_settings_fail_before_loading(checkpoint, tmp_path, capsys, no_loading, extra, match):  # noqa: F811
    fail(capsys, args(checkpoint, tmp_path / "o", *extra), match)


def test_calibration_text_is_checked_before_the_weights_load(checkpoint, tmp_path, capsys, no_loading):  # noqa: F811
    fail(capsys, args(checkpoint, tmp_path / "o", "--nsamples", "100000"), "fewer than")
    fail(capsys, args(checkpoint, tmp_path / "o", "--seqlen", "4096"), "context of 128")


# ---------------------------------------------------------------- model classes and their data (issue 15)


def with_config(source: Path, folder: Path, **changes) -> Path:
    """A copy of checkpoint ``source`` whose config.json has ``changes``."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def replace_arg(argv: list[str], flag: str, value: str) -> list[str]:
    argv[argv.index(flag) + 1] = value
    return argv


def test_unknown_architecture_names_it_and_the_override(models, tmp_path, capsys, no_loading):  # noqa: F811
    odd = with_config(models / "bert", tmp_path / "odd", architectures=["BertForPoetry"])
    line = fail(capsys, replace_arg(model_args(models, "bert", tmp_path / "o"), "--model", str(odd)), "BertForPoetry")
    assert "--model-class" in line and not (tmp_path / "o").exists()
    bare = with_config(models / "bert", tmp_path / "bare", architectures=None)
    fail(capsys, replace_arg(model_args(models, "bert", tmp_path / "o"), "--model", str(bare)), "no architectures")


def without(argv: list[str], flag: str) -> list[str]:
    at = argv.index(flag)
    return argv[:at] + argv[at + 2 :]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--model-class", "seq2seq"], "cannot load; choose one of"),
        (["--model-class", "masked"], "unknown model_class 'masked'"),
        (["--lazy"], "--lazy prunes causal LMs"),
    ],
)
def test_model_class_that_cannot_load_the_checkpoint(models, tmp_path, capsys, no_loading, extra, match):  # noqa: F811
    argv = without(model_args(models, "bert", tmp_path / "o", *extra), "--eval-data")  # --lazy evaluates afterwards
    fail(capsys, argv, match)
    assert not (tmp_path / "o").exists()


def test_model_class_on_an_image_model(tmp_path, capsys, no_loading):
    fail(capsys, ["prune", "--model", "timm:resnet18", "--model-class", "causal-lm"], "drop --model-class")


def bad_pairs(folder: Path, lines: list[str]) -> Path:
    folder.mkdir()
    (folder / "data.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


@pytest.mark.parametrize(
    "calib, match",
    [
        ("train.txt", "is not image-text data"),
        (['{"image": "missing.png", "text": "a"}'], "missing.png' does not exist"),
        (['{"image": "x.png"}'], 'line 1 needs "text": a string'),
        (["{not json"], "line 1 is not valid JSON"),
    ],
)
def test_bad_image_text_data_fails_before_loading(models, tmp_path, capsys, no_loading, calib, match):  # noqa: F811
    data = models / calib if isinstance(calib, str) else bad_pairs(tmp_path / "pairs", calib)
    fail(capsys, replace_arg(model_args(models, "llava", tmp_path / "o"), "--calib-data", str(data)), match)
    assert not (tmp_path / "o").exists()


def test_image_text_model_without_a_processor(models, tmp_path, capsys, no_loading):  # noqa: F811
    bare = tmp_path / "llava"
    shutil.copytree(models / "llava", bare)
    (bare / "processor_config.json").unlink()
    fail(capsys, replace_arg(model_args(models, "llava", tmp_path / "o"), "--model", str(bare)), "processor")


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"text": "a", "label": 7}'], "label 7 is not one of the model's 3 classes"),
        (['{"text": "a", "label": 1}', '{"text": "b"}'], "1 of 2 lines have a"),
        (['{"text": "a", "label": 1}', "[1, 2]"], "line 2 is a list"),
    ],
)
def test_bad_labeled_data_fails_before_loading(models, tmp_path, capsys, no_loading, lines, match):  # noqa: F811
    (tmp_path / "labels.jsonl").write_text("".join(line + "\n" for line in lines))
    argv = replace_arg(
        model_args(models, "bert-classifier", tmp_path / "o"), "--eval-data", str(tmp_path / "labels.jsonl")
    )
    fail(capsys, argv, match)


def test_masked_lm_evaluation_needs_a_mask_token(models, tmp_path, capsys, no_loading):  # noqa: F811
    from transformers import AutoTokenizer

    plain = tmp_path / "bert"
    shutil.copytree(models / "bert", plain)
    AutoTokenizer.from_pretrained(demo_assets() / "kjv-llama-5m").save_pretrained(plain)  # no mask token
    fail(capsys, replace_arg(model_args(models, "bert", tmp_path / "o"), "--model", str(plain)), "mask token")


# ---------------------------------------------------------------- one line, not a traceback (6-7)


@pytest.mark.parametrize(
    "text, match",
    [
        ("- a\n", "mapping"),
        ("model: [\n", "not valid YAML"),
        ("model: !!python/object/apply:os.system [ls]\n", "tag"),
        ("model: m\ntrust_remote_code: true\n", "only the command line"),
    ],
)
def test_bad_recipes(tmp_path, capsys, text, match):
    (tmp_path / "r.yaml").write_text(text)
    fail(capsys, ["prune", "--recipe", str(tmp_path / "r.yaml")], match)


def test_missing_relative_model_path_fails_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    fail(capsys, ["prune", "--model", "runs/llama", "--out", "o"], "'runs/llama'")
    assert time.perf_counter() - start < 10  # no hub retries


def test_binary_calibration_text_names_the_file(checkpoint, tmp_path, capsys):  # noqa: F811
    (tmp_path / "bad.txt").write_bytes(bytes(range(256)) * 64)
    argv = args(checkpoint, tmp_path / "o")
    argv[argv.index("--calib-data") + 1] = str(tmp_path / "bad.txt")
    fail(capsys, argv, "bad.txt")


def test_truncated_checkpoint(checkpoint, tmp_path, capsys):  # noqa: F811
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint / "model", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    argv = args(checkpoint, tmp_path / "o")
    argv[argv.index("--model") + 1] = str(broken)
    fail(capsys, argv, "model.safetensors")
    assert not (tmp_path / "o").exists() and no_temporaries(tmp_path)


def test_disk_full_while_saving_is_one_line_and_leaves_nothing(checkpoint, tmp_path, capsys, monkeypatch):  # noqa: F811
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "o" / "model.safetensors"))

    monkeypatch.setattr(commands, "write_model", full)
    fail(capsys, args(checkpoint, tmp_path / "o"), "No space left on device")
    assert not (tmp_path / "o").exists() and no_temporaries(tmp_path)


# ---------------------------------------------------------------- silently accepted (9-10)


def test_nan_weights_are_refused_and_nan_perplexity_is_an_error(checkpoint, tmp_path, capsys):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bad = tmp_path / "nan"
    model = AutoModelForCausalLM.from_pretrained(checkpoint / "model")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(checkpoint / "model").save_pretrained(bad)
    argv = args(checkpoint, tmp_path / "o")
    argv[argv.index("--model") + 1] = str(bad)
    fail(capsys, argv, "NaN/inf weights")
    fail(
        capsys,
        ["eval", "ppl", "--model", str(bad), "--data", str(checkpoint / "test.txt"), "--seqlen", "32"],
        "perplexity is nan",
    )


# ---------------------------------------------------------------- interrupts and concurrent runs (2, 11)


def run(argv: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "prunekit.cli", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    end = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_runs_on_one_out(checkpoint, tmp_path):  # noqa: F811
    out, marker, release = tmp_path / "o", tmp_path / "marker", tmp_path / "release"
    first = slow_save(marker, release, args(checkpoint, out))
    wait_for(marker, first)  # the first run holds --out and is in the middle of saving
    second = run(args(checkpoint, out))
    _, err = second.communicate(timeout=120)
    release.write_text("go")
    assert second.returncode == 2 and "another prunekit run" in err and f"pid {first.pid}" in err, err
    assert first.wait(timeout=300) == 0, first.communicate()
    assert (out / "model.safetensors").exists() and (out / "prune_report.json").exists()
    assert no_temporaries(tmp_path)


# A prune whose save pauses after writing the model: it touches argv[1], then waits (at most 2 minutes) for
# argv[2] to appear.
SLOW_SAVE = """
import sys, time
from pathlib import Path
import prunekit.commands as commands
from prunekit.cli import demo_assets, main
real = commands.write_model
def slow(*args):
    real(*args)
    Path(sys.argv[1]).write_text("saving")
    end = time.time() + 120
    while not Path(sys.argv[2]).exists() and time.time() < end:
        time.sleep(0.05)
commands.write_model = slow
sys.exit(main(sys.argv[3:]))
"""


def slow_save(marker: Path, release: Path, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, str(marker), str(release), *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_ctrl_c_exits_130_and_leaves_nothing(checkpoint, tmp_path):  # noqa: F811
    out, marker = tmp_path / "o", tmp_path / "marker"
    proc = slow_save(marker, tmp_path / "never", args(checkpoint, out))
    wait_for(marker, proc)  # interrupted in the middle of writing the output
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("interrupted"), err
    assert not out.exists() and no_temporaries(tmp_path)


@pytest.mark.slow
def test_sigkill_during_save_then_the_next_run_cleans_up(checkpoint, tmp_path):  # noqa: F811
    out, marker = tmp_path / "o", tmp_path / "marker"
    proc = slow_save(marker, tmp_path / "never", args(checkpoint, out))
    wait_for(marker, proc)
    proc.kill()
    proc.wait(timeout=60)
    assert not out.exists() and not no_temporaries(tmp_path)  # a temporary was left by the killed run ...
    again = run(args(checkpoint, out))
    assert again.wait(timeout=300) == 0, again.communicate()
    assert (out / "model.safetensors").exists() and no_temporaries(tmp_path)  # ... and removed by the next
