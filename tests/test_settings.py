"""Every setting, in every front end: honoured, or refused with one line (issue 28).

Generated from the config classes' fields: each setting is set to its declared ``example`` (``prunekit.config.setting``,
with the settings it needs beside it, ``example_with``) in each front end that takes it — ``prunekit.prune``,
``prune_lazy``, the CLI, a YAML recipe, ``PruningCallback``, fine-tuning (one-shot and cubic). The front end must
either refuse it with a ``PrunekitError`` of one line that names it, or hand it on: the config that reaches the
work (caught right where the work would start) holds the value. A new setting is covered without editing this file;
one without an ``example`` fails here. What each front end then does with a setting is tested where it is done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

import prunekit
from prunekit import api, cli, commands, quality
from prunekit.config import PruneConfig
from prunekit.errors import PrunekitError
from prunekit.finetune import run as finetune_run
from prunekit.finetune.recipe import FinetuneRecipe
from prunekit.io import lazy
from prunekit.recipe import SCAN_UNUSED, PruneRecipe, SensitivityRecipe
from tests import zoo

# Settings whose examples are file names: inputs are created in the test's folder, outputs placed there.
INPUTS = {"calib_data", "eval_data", "train_data", "val_data"}
OUTPUTS = {"out", "report_json"}


class Captured(BaseException):
    """Raised where a front end would start the work, with the config it hands on (not an ``Exception``: no
    front end may swallow it)."""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config


def fields_of(cls: type, skip: tuple[str, ...] = ()) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name not in skip]


def example(f: dataclasses.Field) -> dict[str, Any]:
    """The field's example value with the settings it needs."""
    value = f.metadata.get("example")
    assert value is not None, f"setting {f.name!r} has no example=: give it one in its setting(...) declaration"
    return {**f.metadata.get("example_with", {}), f.name: value}


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("settings")
    zoo.save("llama", root / "model")
    for name in ("calib.txt", "eval.txt", "train.txt", "val.txt"):
        (root / name).write_text("In the beginning God created the heaven and the earth.\n" * 20)
    return root


def resolved(settings: Mapping[str, Any], place: Path, case: str) -> dict[str, Any]:
    """Example file names as paths in the test's folder (outputs in a folder of their own per case)."""
    out = {}
    for name, value in settings.items():
        if name in INPUTS:
            value = str(place / value)
        elif name in OUTPUTS:
            value = str(place / "outputs" / case / value)
        elif name == "model":
            value = str(place / "model")
        out[name] = value
    return out


def plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """``("refused", message)`` or ``("honoured", the config handed on)``."""
    try:
        call()
    except Captured as caught:
        return "honoured", caught.config
    except PrunekitError as err:
        return "refused", str(err)
    raise AssertionError("the front end neither refused the setting nor reached the work")


def check(front_end: str, name: str, settings: dict[str, Any], result: tuple[str, Any]) -> None:
    kind, detail = result
    if kind == "refused":
        assert "\n" not in detail, f"{front_end} refused {name} with more than one line: {detail}"
        named = [n for n in settings if n in detail or "--" + n.replace("_", "-") in detail]
        assert named, f"{front_end} refused {name}={settings[name]!r} without naming it: {detail}"
        return
    got = getattr(detail, name, None)
    assert plain(got) == plain(settings[name]), f"{front_end} dropped {name}: handed on {got!r}"


# ---------------------------------------------------------------- the front ends


def python_prune(monkeypatch, place: Path, settings: dict[str, Any]) -> tuple[str, Any]:
    def work(model, config, calib=None, tokenizer=None):
        raise Captured(config)

    monkeypatch.setattr(api, "prune_model", work)
    model = zoo.build("llama")
    tokenizer = zoo.processor("llama")
    return outcome(lambda: prunekit.prune(model, calib=str(place / "calib.txt"), tokenizer=tokenizer, **settings))


def python_lazy(monkeypatch, place: Path, settings: dict[str, Any]) -> tuple[str, Any]:
    def work(source, claim, config, *args):
        raise Captured(config)

    monkeypatch.setattr(lazy, "_prune_claimed", work)
    out = place / "outputs" / "lazy"
    return outcome(lambda: lazy.prune_lazy(place / "model", out, calib=str(place / "calib.txt"), **settings))


def flags(cls: type, settings: Mapping[str, Any]) -> list[str]:
    """``settings`` as the command line gives them (``--flag VALUE``, repeated, ``KEY=VALUE``, ``--no-flag``)."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    argv: list[str] = []
    for name, value in settings.items():
        f = by_name[name]
        flag = cli.flag_name(f)
        if f.metadata.get("keyvalue"):
            for key, item in value.items():
                pairs = item.items() if isinstance(item, Mapping) else [(None, item)]
                argv += [x for k, v in pairs for x in (flag, f"{key}.{k}={v}" if k else f"{key}={v}")]
        elif f.metadata.get("repeat"):
            argv += [x for item in value for x in (flag, str(item))]
        elif f.metadata.get("type") is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def run_cli(monkeypatch, capsys, argv: list[str]) -> tuple[str, Any]:
    def work(recipe, recipe_path=None):
        raise Captured(recipe)

    monkeypatch.setattr(commands, "run_prune", work)
    monkeypatch.setattr(quality, "prune_job", lambda recipe, recipe_path=None, on_trial=None: work(recipe))
    monkeypatch.setattr(quality, "run_sensitivity", work)
    try:
        code = cli.main(argv)
    except Captured as caught:
        return "honoured", caught.config
    error = capsys.readouterr().err.strip()
    assert code == 2, f"prunekit {' '.join(argv)} exited {code}: {error}"
    return "refused", error.removeprefix("error: ")


def command_line(
    monkeypatch, capsys, place: Path, settings: dict[str, Any], command: str = "prune", cls: type = PruneRecipe
) -> tuple[str, Any]:
    base = [command, "--model", str(place / "model"), "--calib-data", str(place / "calib.txt")]
    return run_cli(monkeypatch, capsys, base + flags(cls, settings))


def yaml_recipe(monkeypatch, capsys, place: Path, settings: dict[str, Any], command: str = "prune") -> tuple[str, Any]:
    path = place / "outputs" / f"{command}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"model": str(place / "model"), "calib_data": str(place / "calib.txt"), **plain(settings)}
    path.write_text(yaml.safe_dump(data))
    return run_cli(monkeypatch, capsys, [command, "--recipe", str(path)])


def callback(settings: dict[str, Any]) -> tuple[str, Any]:
    from prunekit.lightning import PruningCallback

    def build() -> None:
        made = PruningCallback(**settings)
        raise Captured(made.config)

    return outcome(build)


def finetune(monkeypatch, place: Path, settings: dict[str, Any], **base: Any) -> tuple[str, Any]:
    def work(recipe):
        raise Captured(recipe)

    monkeypatch.setattr(finetune_run, "_run", work)
    given = {"model": str(place / "model"), "calib_data": str(place / "calib.txt"), **base, **settings}
    return outcome(lambda: finetune_run.run_finetune(FinetuneRecipe(**given)))


def finetune_command_line(monkeypatch, capsys, place: Path, settings: dict[str, Any]) -> tuple[str, Any]:
    def work(recipe):
        raise Captured(recipe)

    monkeypatch.setattr(finetune_run, "_run", work)
    base = ["finetune", "--model", str(place / "model"), "--calib-data", str(place / "calib.txt")]
    return run_cli(monkeypatch, capsys, base + flags(FinetuneRecipe, settings))


CUBIC = dict(schedule="cubic", end_step=10, max_steps=20)


# ---------------------------------------------------------------- the matrix

CONFIG = fields_of(PruneConfig)
JOB = fields_of(PruneRecipe, ("model", "calib_data"))
FINETUNE = fields_of(FinetuneRecipe, ("model", "calib_data"))
SCAN = fields_of(SensitivityRecipe, ("model", "calib_data"))


@pytest.mark.parametrize("field", CONFIG, ids=lambda f: f.name)
def test_python_prune(field, monkeypatch, place):
    settings = resolved(example(field), place, "python")
    result = python_prune(monkeypatch, place, settings)
    check("prunekit.prune", field.name, settings, result)
    assert result[0] == "honoured" or field.name == "dtype", result  # a loaded model: only its dtype is moot


@pytest.mark.parametrize("field", CONFIG, ids=lambda f: f.name)
def test_prune_lazy(field, monkeypatch, place):
    settings = resolved(example(field), place, "lazy")
    check("prune_lazy", field.name, settings, python_lazy(monkeypatch, place, settings))


@pytest.mark.parametrize("field", JOB, ids=lambda f: f.name)
def test_command_line(field, monkeypatch, capsys, place):
    settings = resolved(example(field), place, "cli")
    check("prunekit prune", field.name, settings, command_line(monkeypatch, capsys, place, settings))


@pytest.mark.parametrize("field", JOB, ids=lambda f: f.name)
def test_recipe(field, monkeypatch, capsys, place):
    settings = resolved(example(field), place, "recipe")
    check("prunekit prune --recipe", field.name, settings, yaml_recipe(monkeypatch, capsys, place, settings))


@pytest.mark.parametrize("field", CONFIG, ids=lambda f: f.name)
def test_lightning_callback(field):
    settings = example(field)
    check("PruningCallback", field.name, settings, callback(settings))


@pytest.mark.parametrize("field", FINETUNE, ids=lambda f: f.name)
def test_finetune_oneshot(field, monkeypatch, place):
    settings = resolved(example(field), place, "finetune")
    check("prunekit finetune", field.name, settings, finetune(monkeypatch, place, settings))


@pytest.mark.parametrize("field", FINETUNE, ids=lambda f: f.name)
def test_finetune_command_line(field, monkeypatch, capsys, place):
    settings = resolved(example(field), place, "finetune-cli")
    check("prunekit finetune", field.name, settings, finetune_command_line(monkeypatch, capsys, place, settings))


@pytest.mark.parametrize("field", [f for f in FINETUNE if f.name not in CUBIC], ids=lambda f: f.name)
def test_finetune_cubic(field, monkeypatch, place):
    settings = resolved(example(field), place, "cubic")
    check("prunekit finetune (cubic)", field.name, settings, finetune(monkeypatch, place, settings, **CUBIC))


def scan_example(f: dataclasses.Field) -> dict[str, Any]:
    """The example without the prune-job settings beside it that a scan does not take (``holdout`` needs a
    ``target`` to be used by ``prune``, not by a scan)."""
    return {k: v for k, v in example(f).items() if k == f.name or k not in SCAN_UNUSED}


@pytest.mark.parametrize("field", [f for f in SCAN if f.name not in SCAN_UNUSED], ids=lambda f: f.name)
def test_sensitivity_command_line(field, monkeypatch, capsys, place):
    settings = resolved(scan_example(field), place, "scan-cli")
    result = command_line(monkeypatch, capsys, place, settings, "sensitivity", SensitivityRecipe)
    check("prunekit sensitivity", field.name, settings, result)


@pytest.mark.parametrize("field", SCAN, ids=lambda f: f.name)
def test_sensitivity_recipe(field, monkeypatch, capsys, place):
    settings = resolved(scan_example(field), place, "scan-recipe")
    result = yaml_recipe(monkeypatch, capsys, place, settings, "sensitivity")
    check("prunekit sensitivity --recipe", field.name, settings, result)


def test_the_front_ends_refuse_what_they_cannot_do(monkeypatch, capsys, place):
    """Spot checks of the matrix: the refusals the code review found missing, each with its reason."""
    refused = {
        "owl for the callback": callback({"allocation": "owl"}),
        "nsamples for the callback": callback({"nsamples": 7}),
        "BatchNorm recalibration for lazy": python_lazy(monkeypatch, place, {"recalibrate_bn": True}),
        "dtype of a loaded model": python_prune(monkeypatch, place, {"dtype": "bfloat16"}),
        "remote code from a recipe": yaml_recipe(monkeypatch, capsys, place, {"trust_remote_code": True}),
        "lazy fine-tuning": finetune(monkeypatch, place, {"lazy": True, "out": str(place / "o")}),
        "calibration count with cubic": finetune(monkeypatch, place, {"nsamples": 7}, **CUBIC),
    }
    assert {what: kind for what, (kind, _) in refused.items()} == dict.fromkeys(refused, "refused")
