import json
from pathlib import Path

import pytest
import yaml

from prunekit import cli
from prunekit.cli import demo_assets, main
from prunekit.config import PruneConfig
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random LLaMA saved with the built-in tokenizer, plus calibration/eval text files."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("ckpt")
    tiny_llama(vocab=4096).save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(demo_assets() / "kjv-llama-5m").save_pretrained(root / "model")
    text = (demo_assets() / "kjv" / "test.txt").read_text()
    (root / "train.txt").write_text(text[:60000])
    (root / "test.txt").write_text(text[60000:80000])
    return root


def _prune_args(ckpt, out, *extra):
    return [
        "prune",
        "--model",
        str(ckpt / "model"),
        "--calib-data",
        str(ckpt / "train.txt"),
        "--nsamples",
        "8",
        "--seqlen",
        "32",
        "--out",
        str(out),
        *extra,
    ]


def test_prune_saves_loadable_model_report_and_recipe(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    assert main(_prune_args(checkpoint, out, "--eval-data", str(checkpoint / "test.txt"), "--pattern", "2:4")) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.5) and report["settings"]["pattern"] == "2:4"
    assert report["metrics"]["ppl"] > 1 and report["metrics"]["ppl_dense"] > 1
    assert yaml.safe_load((out / "recipe.yaml").read_text())["pattern"] == "2:4"
    model = AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[0].mlp.up_proj.weight
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not list(tmp_path.glob(".pruned.tmp-*"))  # no temporary left behind


def test_recipe_and_flag_override(checkpoint, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"model": str(checkpoint / "model"), "method": "magnitude", "sparsity": 0.6, "out": str(tmp_path / "o1")}
        )
    )
    assert main(["prune", "--recipe", str(recipe), "--sparsity", "0.7"]) == 0
    report = json.loads((tmp_path / "o1" / "prune_report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.7, abs=1e-3)  # floor(numel * 0.7) per layer


def test_eval_ppl(checkpoint, tmp_path, capsys):
    assert (
        main(
            [
                "eval",
                "ppl",
                "--model",
                str(checkpoint / "model"),
                "--data",
                str(checkpoint / "test.txt"),
                "--seqlen",
                "64",
                "--json",
                str(tmp_path / "ppl.json"),
            ]
        )
        == 0
    )
    assert "perplexity" in capsys.readouterr().out
    assert json.loads((tmp_path / "ppl.json").read_text())["ppl"] > 1


def test_eval_ppl_of_a_model_saved_without_its_tokenizer(checkpoint, tmp_path, capsys):
    """Issue 28 item 11: a traceback ("Couldn't instantiate the backend tokenizer") and "a bug in prunekit" became one
    line naming the fix, exit 2, before the weights load; --tokenizer gives it."""
    bare = tmp_path / "bare"
    tiny_llama(vocab=4096).save_pretrained(bare)
    argv = ["eval", "ppl", "--model", str(bare), "--data", str(checkpoint / "test.txt"), "--seqlen", "64"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer" in err and "--tokenizer" in err and "prunekit.save(" in err
    assert "Traceback" not in err and "bug" not in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "--tokenizer", str(checkpoint / "model")]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_eval_image_recipe_writes_only_when_asked_and_says_where(tmp_path, monkeypatch, capsys):
    """Issue 28 item 15: the shipped recipe wrote out/recipes/imagenet-eval.json on every run and never said so."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    overrides = [
        "--model",
        f"local-dir:{demo_assets() / 'convnext-digits-500k'}",
        "--data",
        str(demo_assets() / "digits" / "val"),
    ]
    assert main(["eval", "image", "--recipe", str(root / "recipes" / "imagenet-eval.yaml"), *overrides]) == 0
    assert "top-1" in capsys.readouterr().out and not list(tmp_path.rglob("*.json"))
    result = tmp_path / "top1.json"
    assert (
        main(
            [
                "eval",
                "image",
                "--recipe",
                str(root / "recipes" / "imagenet-eval.yaml"),
                *overrides,
                "--json",
                str(result),
            ]
        )
        == 0
    )
    assert f"wrote {result}" in capsys.readouterr().out and json.loads(result.read_text())["top1"] > 0.9


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--sparsity", "1.5"], "sparsity must be in"),
        (["--pattern", "3:3"], "0 < N < M"),
        (["--method", "bogus"], "unknown method"),
        (["--group", "rows"], "unknown comparison group"),
        (["--include", "nothing"], "no prunable layers"),
    ],
)
def test_bad_input_errors_write_nothing(checkpoint, tmp_path, capsys, extra, match):
    out = tmp_path / "never"
    assert main(_prune_args(checkpoint, out, *extra)) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_missing_model_path(tmp_path, capsys):
    assert main(["prune", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_calib_and_short_calib(checkpoint, tmp_path, capsys):
    assert main(_prune_args(checkpoint, tmp_path / "o", "--calib-data", str(tmp_path / "none.txt"))) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(_prune_args(checkpoint, tmp_path / "o", "--nsamples", "100000")) == 2
    assert "fewer than nsamples x seqlen" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_output_is_never_the_input_nor_a_nonempty_dir(checkpoint, tmp_path, capsys):
    assert main(_prune_args(checkpoint, checkpoint / "model")) == 2
    assert "overlaps the input" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(_prune_args(checkpoint, busy)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "x"


def test_unknown_recipe_key(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: x\nsparsty: 0.5\n")
    assert main(["prune", "--recipe", str(recipe)]) == 2
    assert "unknown key(s) ['sparsty']" in capsys.readouterr().err


def test_methods_listing(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "wanda" in out and "magnitude" in out and "uniform" in out


def test_methods_details_read_well_in_a_pipe(capsys):
    """Issue 28 item 13: ``methods -v`` was a table cut at 80 columns (``percdamp=0...``) whose description column
    read ``Magnitude()`` / ``Wanda()``; in a pipe it is plain text now, every value whole."""
    assert main(["methods", "-v"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and "Magnitude()" not in out and "Wanda()" not in out
    assert "  parameters: blocksize=128, percdamp=0.01\n" in out
    entries = [line for line in out.splitlines() if not line.startswith(" ")]
    assert all(line.split(": ", 1)[1] for line in entries), "every entry says what it is"


def test_a_pattern_and_a_sparsity_that_contradict_it_are_refused(capsys):
    """Issue 28 item 12: ``--pattern 2:4 --sparsity 0.7`` silently pruned to 0.5."""
    assert main(["prune", "--model", "m", "--pattern", "2:4", "--sparsity", "0.7"]) == 2
    assert "--sparsity 0.7 contradicts it" in capsys.readouterr().err
    assert PruneConfig(pattern="1:4").sparsity == 0.75  # the sparsity a pattern implies is what is recorded
    report = {"settings": {"method": "wanda", "pattern": "2:4"}, "sparsity": 0.5, "layers": {}}
    assert "wanda 2:4" in cli.layer_table(report).title  # the summary shows the pattern


def test_repo_recipes_parse(monkeypatch):
    """Every YAML in recipes/ is valid for the command it is written for (unknown keys are errors), with its
    paths relative to the repository root (tests/test_recipes.py runs them all)."""
    from pathlib import Path

    from prunekit.finetune.recipe import load_finetune_recipe
    from prunekit.recipe import PruneRecipe, load_recipe

    root = Path(__file__).parents[1]
    monkeypatch.chdir(root)
    recipes = sorted((root / "recipes").glob("*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        data = yaml.safe_load(path.read_text())
        if "trainer" in data:
            continue  # Lightning-style evaluation configs are parsed by their own tests
        if {"schedule", "lora", "max_steps"} & set(data):
            load_finetune_recipe(path)
        else:
            load_recipe(PruneRecipe, path, {})


# ---------------------------------------------------------------- what the CLI prints


def test_finetune_summary_is_a_rounded_table(capsys):
    """One row per stage, one column per metric, 4 decimals: never 0.9933333396911621."""
    from prunekit.cli import print_finetune_report

    report = {
        "task": "image-classification",
        "sparsity": 0.80000001,
        "metrics": {
            "top1_dense": 0.9933333396911621,
            "loss_dense": 0.11501,
            "top1_finetuned": 0.98,
            "loss_finetuned": 0.2,
            "ppl_lora_unmerged": 53.22334,
        },
        "timings": {"prune_s": 0.5, "finetune_s": 61.687},
    }
    print_finetune_report(report)
    out = capsys.readouterr().out
    assert "0.99333" not in out and "sparsity 0.8000" in out and "finetune time 61.69s" in out
    rows = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
        for line in out.splitlines()
        if line.startswith("│")
    }
    assert rows == {
        "dense": ["0.9933", "0.1150", "–"],
        "finetuned": ["0.9800", "0.2000", "–"],
        "lora unmerged": ["–", "–", "53.2233"],
    }


def test_lightning_lines_print_once_without_advert():
    """Lightning's own console handler and prunekit's root handler both saw its INFO lines (each printed twice),
    and a Trainer without LitLogger logs an advert; after configure_logging each line appears once, no advert,
    also when a job builds three Trainers (issue 28 item 14: a fine-tune printed the banner for each)."""
    import subprocess
    import sys

    code = (
        "from prunekit.cli import configure_logging; configure_logging(False); import lightning.pytorch as L\n"
        "for _ in range(3): L.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False, "
        "accelerator='cpu')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "available" in line or "Tip" in line]
    assert [line.split(" available")[0] for line in lines] == ["INFO: GPU", "INFO: TPU"], run.stderr
