"""What prunekit supports, architecture by architecture, established by running it.

Each capability is a check on a tiny zoo model (``tests.zoo``) that either passes, or meets a
``PrunekitError`` (a clear refusal: the capability is not offered for that architecture). Any other exception is a
bug and propagates. ``support_matrix()`` runs every check; ``benchmarks/support.py`` records the result in
``benchmarks/results/support.{json,md}`` (the README's table of supported architectures is generated from it), and
the test suite reruns every check and fails when the recorded table no longer matches what prunekit does.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.forward import hidden_state, hooks, run_model
from prunekit.graph import find_stacks, weight_matrix
from prunekit.shapes import sized_by_weights

from . import ZOO, batch, build, output, token_ids

log = logging.getLogger(__name__)

YES = "yes"


def calibration(name: str, batches: int = 2) -> list[dict]:
    return [batch(name, token_ids(2, 24, seed)) for seed in range(batches)]


def reloaded(model: nn.Module) -> nn.Module:
    """``model`` after ``save_pretrained`` and ``from_pretrained`` (of its own class), in eval mode; or
    ``prunekit.load`` where the config says the layers take the stored weights' sizes (SliceGPT on GPT-2, OPT,
    Falcon, GPT-NeoX: ``prunekit.shapes``)."""
    from prunekit import load

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        if sized_by_weights(model.config):
            return load(folder)
        return type(model).from_pretrained(folder).eval()


@torch.no_grad()
def same_logits(a: nn.Module, b: nn.Module, inputs) -> bool:
    """Whether two models give the same main output (``zoo.output``: logits, or hidden states of bare encoders)."""
    return torch.equal(output(a, inputs), output(b, inputs))


def _reloads_identically(model: nn.Module, name: str) -> None:
    """Saved and reloaded with ``from_pretrained`` of its own class, the model gives the same logits."""
    if not same_logits(model, reloaded(model), calibration(name, 1)[0]):
        raise AssertionError(f"{name}: logits change when the pruned model is saved and reloaded")


def prune_zoo_model(name: str, method: str, ratio: float = 0.3, params: dict | None = None):
    """The tiny ``name`` model pruned by the structured ``method``, with its calibration batch and the method's
    summary; raises the method's ``PrunekitError`` when it refuses the architecture."""
    from prunekit.structured import STRUCTURED

    model, inputs = build(name), batch(name, token_ids())
    summary = STRUCTURED.create(method, params or {}).prune_model(model, [inputs], ratio)
    return model, inputs, summary


# ---------------------------------------------------------------- the checks


def block_inputs(model: nn.Module, batches: list) -> dict[int, list[torch.Tensor]]:
    """What every block receives in plain forward passes, keyed by the block module's id."""
    seen: dict[int, list[torch.Tensor]] = {}

    def record(module, args, kwargs):
        seen.setdefault(id(module), []).append(hidden_state(args, kwargs).detach().clone())

    blocks = [b for _, stack in find_stacks(model) for b in stack]
    with hooks(b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks), torch.no_grad():
        for x in batches:
            run_model(model, x)
    return seen


def fed_inputs(model: nn.Module, batches: list) -> dict[int, list[torch.Tensor]]:
    """What sequential calibration feeds every block: the inputs its statistics are taken on."""
    from prunekit import engine, prune

    fed: dict[int, list[torch.Tensor]] = {}
    original = engine._block_statistics

    def spy(block, index, layers, acts, plan):
        if acts is not None:
            fed[id(block)] = [hidden_state(*acts.call(j, index)).detach().clone() for j in range(len(acts))]
        return original(block, index, layers, acts, plan)

    engine._block_statistics = spy
    try:
        prune(model, "wanda", 0.0, calib=batches)
    finally:
        engine._block_statistics = original
    return fed


def calibration_gap(model: nn.Module, batches: list) -> float:
    """The largest relative difference between what calibration feeds a block and what it really receives."""
    real = block_inputs(model, batches)
    fed = fed_inputs(model, batches)
    if not real or set(real) != set(fed):
        raise AssertionError("a block of the model was not calibrated")
    return max(float((a - b).norm() / a.norm()) for key in real for a, b in zip(real[key], fed[key], strict=True))


def check_calibration(name: str, model: nn.Module) -> None:
    gap = calibration_gap(model, calibration(name))
    if gap > 1e-5:
        raise AssertionError(f"{name}: calibration feeds blocks inputs {gap:.2%} away from their real inputs")


def check_unstructured(name: str, model: nn.Module) -> None:
    from prunekit import prune

    coverage = prune(model, "wanda", 0.5, calib=calibration(name), layer_types=("all",)).coverage
    if coverage["block_sparsity"] < 0.49:
        raise AssertionError(f"{name}: Wanda 50% left the blocks {coverage['block_sparsity']:.1%} sparse")
    _reloads_identically(model, name)


def check_nm(name: str, model: nn.Module) -> None:
    from prunekit import plan_prune, prune

    pruned = prune(model, "wanda", 0.5, pattern="2:4", calib=calibration(name)).layers
    for layer, module in plan_prune(model, "wanda").layers.items():
        if layer not in pruned:  # left dense, with its reason (a layer no calibration input reaches)
            continue
        w = weight_matrix(module)
        if ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) > 2).any():
            raise AssertionError(f"{name}: {layer} breaks the 2:4 pattern")
    _reloads_identically(model, name)


def check_sparsegpt(name: str, model: nn.Module) -> None:
    from prunekit import prune

    report = prune(model, "sparsegpt", 0.5, calib=calibration(name))
    if abs(report.sparsity - 0.5) > 0.01:
        raise AssertionError(f"{name}: SparseGPT 50% reached {report.sparsity:.3f}")
    _reloads_identically(model, name)


def _structured(method: str) -> Callable[[str, nn.Module], None]:
    def check(name: str, model: nn.Module) -> None:
        from prunekit import prune

        removed = prune(model, method, 0.25, calib=calibration(name)).structure["removed_fraction"]
        if removed <= 0:
            raise AssertionError(f"{name}: {method} removed nothing from the blocks")
        _reloads_identically(model, name)

    check.__doc__ = f"structured {method} at 25%: smaller blocks, reloads with identical logits"
    return check


def check_cli(name: str, model: nn.Module) -> None:
    """``prunekit prune`` on a saved copy with its tokenizer / processor and data in the format its class takes
    (text, or an image-text folder); a refusal is the CLI's one-line error."""
    from prunekit.cli import main

    from . import save

    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "model", Path(tmp) / "pruned"
        save(name, source, model)
        data = ["--calib-data", str(calibration_data(name, Path(tmp)))]
        data += ["--seqlen", "32"] if ZOO[name].kind in ("causal", "masked", "seq2seq") else []
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(["prune", "--model", str(source), *data, "--nsamples", "4", "--out", str(out)])
        if code == 2:
            lines = [line for line in stderr.getvalue().splitlines() if line.startswith("error: ")]
            raise PrunekitError(lines[-1][len("error: ") :] if lines else "refused by the command line")
        if code != 0:
            raise AssertionError(f"{name}: prunekit prune exited {code}: {stderr.getvalue()[-2000:]}")
        report = json.loads((out / "prune_report.json").read_text())
        if abs(report["sparsity"] - 0.5) > 0.01:
            raise AssertionError(f"{name}: CLI run reached {report['sparsity']:.3f}")


def calibration_data(name: str, folder: Path) -> Path:
    """Calibration data in the format ``name``'s model class takes, from the bundled assets: text, the digits
    ImageFolder (image models; dual encoders caption it from its class names), the spoken KJV clips, or image-text
    pairs written into ``folder`` (vision-language models)."""
    from prunekit.cli import demo_assets

    from . import write_image_text

    assets, kind = demo_assets(), ZOO[name].kind
    if kind in ("image", "dual"):
        return assets / "digits" / "train"
    if kind in ("speech", "audio"):
        return assets / "speech"
    text = assets / "kjv" / "test-small.txt"
    if kind == "vlm":
        verses = [line for line in text.read_text().splitlines() if line.strip()][:4]
        return write_image_text(folder / "pairs", verses)
    return text


CAPABILITIES: dict[str, Callable[[str, nn.Module], None]] = {
    "exact calibration": check_calibration,
    "unstructured": check_unstructured,
    "N:M": check_nm,
    "SparseGPT": check_sparsegpt,
    "depth": _structured("depth"),
    "width": _structured("width"),
    "SliceGPT": _structured("slicegpt"),
    "experts": _structured("experts"),
    "CLI": check_cli,
}


def check(name: str, capability: str, model: nn.Module | None = None) -> str:
    """``"yes"``, or ``"no: <why>"`` when prunekit refuses with its one-line error."""
    model = copy.deepcopy(model) if model is not None else build(name)
    try:
        CAPABILITIES[capability](name, model)
    except PrunekitError as err:
        return f"no: {err}"
    return YES


def support_matrix(names: list[str] | None = None) -> dict[str, dict[str, str]]:
    """Every capability of every zoo architecture, by running it."""
    result = {}
    for name in names or list(ZOO):
        log.info("support checks: %s", name)
        dense = build(name)
        result[name] = {capability: check(name, capability, dense) for capability in CAPABILITIES}
    return result


def markdown(matrix: dict[str, dict[str, str]]) -> str:
    """The support table: one row per architecture, one column per capability; refusals as footnotes."""
    capabilities = list(CAPABILITIES)
    lines = [
        "| architecture | model class | " + " | ".join(capabilities) + " |",
        "|---|---|" + "---|" * len(capabilities),
    ]
    notes: dict[str, int] = {}
    for name, row in matrix.items():
        cells = []
        for capability in capabilities:
            status = row[capability]
            if status == YES:
                cells.append("✓")
            else:
                reason = re.sub(r"^[\w.-]+: ", "", status.removeprefix("no: "))  # the architecture is the row
                number = notes.setdefault(reason, len(notes) + 1)
                cells.append(f"– [{number}]")
        lines.append(f"| {name} | `{ZOO[name].model}` | " + " | ".join(cells) + " |")
    lines += ["", "<details><summary>The one-line reason behind each –</summary>", ""]
    lines += [f"[{number}] {reason}  " for reason, number in notes.items()]
    lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def model_class_markdown() -> str:
    """The table of model classes, from the rows of ``prunekit.model_classes`` (the README's *Supported models*)."""
    from prunekit.model_classes import MODEL_CLASSES

    lines = ["| `--model-class` | what | `--calib-data` / `--eval-data` | `--eval-data` metric (report key) |"]
    lines.append("|---|---|---|---|")
    for name, row in MODEL_CLASSES.items():
        shown = f"`{name}`" if row.transformers else f"(`{name}`: chosen by the source)"
        lines.append(f"| {shown} | {_plain_markdown(row.what)} | {_plain_markdown(row.data)} | {row.metric} |")
    return "\n".join(lines) + "\n"


def _plain_markdown(text: str) -> str:
    """Text as markdown shows it: ``*ForCausalLM`` is no emphasis, ``<class>`` no HTML tag."""
    return text.replace("*", "\\*").replace("<", "&lt;")
