"""Language-model perplexity as a Lightning recipe, identical to ``prunekit.eval.perplexity``.

Same windows (the joined test text tokenised once, non-overlapping ``seqlen`` windows, tail dropped),
same per-window summed NLL; the module sums NLL and predicted-token counts in float64 torchmetrics
``SumMetric`` states, which Lightning reduces across batches and devices, and reports
``exp(sum NLL / sum tokens)`` — never a mean of batch means, so batch size and device count do not
change the number.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import SumMetric

from ..data.text import load_text, tokenize
from ..io.atomic import write_json
from ..io.hf import load_causal_lm, load_tokenizer
from .image import eval_sampler, eval_sections, eval_trainer
from .perplexity import token_windows, window_nll

log = logging.getLogger(__name__)


class PerplexityModule(L.LightningModule):
    """Wraps a causal LM; ``trainer.test`` logs ``test/ppl``, ``test/nll_sum`` and ``test/tokens``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.nll_sum = SumMetric().set_dtype(torch.float64)
        self.tokens = SumMetric().set_dtype(torch.float64)

    def test_step(self, windows: torch.Tensor, batch_idx: int) -> None:
        nll = window_nll(self.model, windows)
        self.nll_sum.update(nll.double().sum())
        self.tokens.update(float(windows.shape[0] * (windows.shape[1] - 1)))

    def on_test_epoch_end(self) -> None:
        nll, tokens = self.nll_sum.compute(), self.tokens.compute()  # synced across devices
        self.log_dict({"test/ppl": torch.exp(nll / tokens), "test/nll_sum": nll, "test/tokens": tokens})
        self.nll_sum.reset()
        self.tokens.reset()


class TokenWindowDataModule(L.LightningDataModule):
    """The fixed evaluation windows ``[n, seqlen]`` of a 1-D token tensor, optionally the first
    ``max_windows`` of them (a quick check on a subset)."""

    def __init__(self, tokens: torch.Tensor, seqlen: int = 2048, batch_size: int = 8, max_windows: int | None = None):
        super().__init__()
        windows = token_windows(tokens, seqlen)
        self.windows = windows[:max_windows] if max_windows else windows
        self.batch_size = batch_size

    def test_dataloader(self) -> DataLoader:
        return DataLoader(
            self.windows, batch_size=self.batch_size, shuffle=False, sampler=eval_sampler(self.windows, self.trainer)
        )


def lightning_perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int = 2048,
    batch_size: int = 8,
    max_windows: int | None = None,
    results: str | os.PathLike | None = None,
    **trainer_kwargs: Any,
) -> dict[str, float]:
    """``trainer.test`` over the perplexity windows; ``{"ppl", "nll_sum", "tokens", "windows"}``."""
    datamodule = TokenWindowDataModule(tokens, seqlen, batch_size, max_windows)
    trainer = eval_trainer(**trainer_kwargs)
    return _run(trainer, model, datamodule, {"seqlen": seqlen}, results)


def _run(
    trainer: L.Trainer,
    model: nn.Module,
    datamodule: TokenWindowDataModule,
    extra: dict[str, Any],
    results: str | os.PathLike | None,
) -> dict[str, Any]:
    trainer.test(PerplexityModule(model), datamodule=datamodule, verbose=False)
    metrics = trainer.callback_metrics
    out = {
        "ppl": float(metrics["test/ppl"]),
        "nll_sum": float(metrics["test/nll_sum"]),
        "tokens": int(metrics["test/tokens"]),
        "windows": int(datamodule.windows.shape[0]),
        **extra,
    }
    if not math.isfinite(out["ppl"]):
        log.warning("perplexity is not finite (%s): the model produced inf/NaN losses", out["ppl"])
    if results is not None and trainer.is_global_zero:
        write_json(results, out)
        out["results_file"] = str(results)
    return out


MODEL_KEYS = {"source", "dtype"}  # remote code only from the command line / Python (trust_remote_code=)
DATA_KEYS = {"path", "tokenizer", "seqlen", "batch_size", "max_windows", "split", "column"}


def run_ppl_eval_config(
    path: str | os.PathLike, overrides: dict[str, Any] | None = None, trust_remote_code: bool = False
) -> dict[str, Any]:
    """Perplexity as a LightningCLI-style YAML says: ``trainer:`` (Trainer arguments), ``model:``
    (``source``, ``dtype``), ``data:`` (``path`` of the test text, ``seqlen``, ``batch_size``,
    ``tokenizer`` defaulting to the model, ``max_windows``), optional ``results:`` JSON path.
    ``overrides`` are merged on top one level deep (see ``load_eval_config``)."""
    config, trainer_cfg, model_cfg, data_cfg = eval_sections(path, overrides, MODEL_KEYS, DATA_KEYS)
    tokenizer = load_tokenizer(data_cfg.get("tokenizer", model_cfg["source"]), trust_remote_code)
    text = load_text(data_cfg["path"], data_cfg.get("split", "test"), data_cfg.get("column", "text"))
    datamodule = TokenWindowDataModule(
        tokenize(tokenizer, text),
        data_cfg.get("seqlen", 2048),
        data_cfg.get("batch_size", 8),
        data_cfg.get("max_windows"),
    )
    model = load_causal_lm(**model_cfg, trust_remote_code=trust_remote_code)
    extra = {"model": str(model_cfg["source"]), "data": str(data_cfg["path"]), "seqlen": datamodule.windows.shape[1]}
    return _run(eval_trainer(**trainer_cfg), model, datamodule, extra, config.get("results"))
