"""Jobs behind the CLI: structured methods through fine-tuning, evaluation on the compute device, every
format prunekit writes read back, and errors as one line."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import yaml
from torch import nn

from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.eval.perplexity import perplexity
from tests.conftest import tiny_llama
from tests.test_cli import _prune_args, checkpoint  # noqa: F401  (the module-scoped fixture)


def test_finetune_with_a_structured_method_runs_to_the_end(checkpoint, tmp_path):  # noqa: F811
    """Defect 7: the one-shot structured prune ran, then fit failed with "unknown method 'depth'"."""
    from prunekit.finetune import run_finetune_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": str(checkpoint / "model"),
                "method": "depth",
                "sparsity": 0.5,
                "calib_data": str(checkpoint / "train.txt"),
                "nsamples": 4,
                "seqlen": 32,
                "max_steps": 2,
                "train_batch_size": 2,
                "out": str(tmp_path / "out"),
            }
        )
    )
    report = run_finetune_recipe(recipe)
    assert report["task"] == "causal-lm" and (tmp_path / "out" / "finetune_report.json").exists()
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1  # the depth-pruned model was fine-tuned and saved


def test_finetune_honours_the_compact_save_format(checkpoint, tmp_path):  # noqa: F811
    """Issue 28 item 4: fine-tuning saved ``--save-format compact`` outputs dense (its own save path)."""
    import prunekit
    from prunekit.finetune import run_finetune
    from prunekit.finetune.recipe import FinetuneRecipe

    recipe = FinetuneRecipe(
        model=str(checkpoint / "model"),
        method="magnitude",
        calib_data=str(checkpoint / "train.txt"),
        seqlen=32,
        max_steps=1,
        train_batch_size=2,
        save_format="compact",
        out=str(tmp_path / "out"),
        report_json=str(tmp_path / "report.json"),
    )
    report = run_finetune(recipe)
    assert (tmp_path / "out" / "model.compact.safetensors").exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert json.loads((tmp_path / "report.json").read_text())["sparsity"] == report["sparsity"]  # --json honoured
    layer = prunekit.load(tmp_path / "out").model.layers[0].mlp.down_proj.weight
    assert (layer == 0).float().mean() > 0.45


class Recorder(nn.Module):
    """A causal LM stand-in that records where it was moved."""

    def __init__(self):
        super().__init__()
        self.lm = tiny_llama()
        self.moves: list[str] = []

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros(1))
        self.moves.append(str(probe.device))
        return super()._apply(fn, recurse)

    def forward(self, input_ids):
        return self.lm(input_ids)


def test_evaluation_moves_the_model_to_the_compute_device():
    """Defect 8: --device cuda moved the evaluation windows, not the model (device mismatch)."""
    model = Recorder()
    ppl = perplexity(model, torch.randint(0, 128, (64,)), seqlen=16, batch_size=2, device="cpu")
    assert ppl > 1 and model.moves[0] == "cpu"  # moved there for the evaluation, then back


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    """Defect 9: only four exception types were caught; RuntimeError/KeyError from our code printed tracebacks
    and the helpful LinAlgError message came with one."""
    import prunekit.quality as quality  # the CLI's prune job: one sparsity, or a --target search

    def user_error(recipe, path=None, on_trial=None):
        raise PrunekitError("the Hessian is not positive definite; raise percdamp")

    monkeypatch.setattr(quality, "prune_job", user_error)
    assert main(["prune", "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: the Hessian is not positive definite; raise percdamp"

    def bug(recipe, path=None, on_trial=None):
        raise RuntimeError("index out of range")

    monkeypatch.setattr(quality, "prune_job", bug)
    assert main(["prune", "--model", "m"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "bug in prunekit" in err

    def interrupted(recipe, path=None, on_trial=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(quality, "prune_job", interrupted)
    assert main(["prune", "--model", "m"]) == 130


def test_structured_run_prints_what_was_removed(checkpoint, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "depth"
    assert (
        main(
            [
                "prune",
                "--model",
                str(checkpoint / "model"),
                "--method",
                "depth",
                "--sparsity",
                "0.5",
                "--calib-data",
                str(checkpoint / "train.txt"),
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "removed 50.0% of the block parameters" in text and "params before" in text
    assert "overall sparsity" not in text


def test_eval_reads_the_compact_format(checkpoint, tmp_path, capsys):  # noqa: F811
    dense, compact = tmp_path / "dense", tmp_path / "compact"
    assert main(_prune_args(checkpoint, dense)) == 0
    assert main(_prune_args(checkpoint, compact, "--save-format", "compact")) == 0
    capsys.readouterr()
    results = []
    for out in (dense, compact):
        assert main(["eval", "ppl", "--model", str(out), "--data", str(checkpoint / "test.txt"), "--seqlen", "32"]) == 0
        results.append(capsys.readouterr().out)
    assert results[0] == results[1] and results[0].startswith("perplexity ")
    again = tmp_path / "again"  # every command reads what prunekit writes: prune a compact output again
    argv = _prune_args(checkpoint, again, "--sparsity", "0.6")
    argv[argv.index("--model") + 1] = str(compact)
    assert main(argv) == 0 and (again / "model.safetensors").exists()


def test_eval_seqlen_zero_and_beyond_the_context(checkpoint, capsys):  # noqa: F811
    args = ["eval", "ppl", "--model", str(checkpoint / "model"), "--data", str(checkpoint / "test.txt")]
    assert main([*args, "--seqlen", "0"]) == 2 and "positive" in capsys.readouterr().err
    assert main([*args, "--seqlen", "4096"]) == 2 and "context of 128" in capsys.readouterr().err


def test_offload_activations_works_without_lazy(checkpoint, tmp_path):  # noqa: F811
    """--offload-activations used to be silently ignored without --lazy; it is honoured by the one loop."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_prune_args(checkpoint, a)) == 0
    assert main(_prune_args(checkpoint, b, "--offload-activations", "disk")) == 0
    from safetensors.torch import load_file

    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_version_and_help_do_not_import_torch():
    code = "import sys; from prunekit.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    version = subprocess.run([sys.executable, "-m", "prunekit.cli", "--version"], capture_output=True, text=True)
    assert version.stdout.startswith("prunekit ")


def test_the_resolved_recipe_records_the_seqlen_used_and_a_compact_output_is_loadable(tmp_path):
    """Issue 28 items 4 and 15: ``seqlen: null`` was recorded when the default was used, so the saved recipe did
    not reproduce the run; a compact output lacked generation_config.json and any hint of how to load it."""
    import yaml

    from prunekit.commands import run_prune
    from prunekit.recipe import PruneRecipe
    from tests.zoo import save

    save("llama", tmp_path / "model")
    text = tmp_path / "train.txt"
    text.write_text("In the beginning God created the heaven and the earth.\n" * 40)
    recipe = PruneRecipe(
        model=str(tmp_path / "model"),
        calib_data=str(text),
        nsamples=2,
        out=str(tmp_path / "out"),
        save_format="compact",
    )
    report = run_prune(recipe)
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert report.settings["seqlen"] == saved["seqlen"] == 128  # min(2048, max_position_embeddings)
    assert (tmp_path / "out" / "generation_config.json").exists()
    assert "prunekit.load" in (tmp_path / "out" / "README.md").read_text()
    import prunekit

    assert prunekit.load(tmp_path / "out").config.num_hidden_layers == 3
