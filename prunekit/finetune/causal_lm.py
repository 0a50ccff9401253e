"""Causal-LM fine-tuning with Lightning on plain text files: a DataModule of token windows and a
LightningModule around any Hugging Face ``*ForCausalLM`` (dense, pruned, or wrapped in LoRA adapters).

The text is tokenised once as one sequence (``prunekit.data.tokenize``, the papers' protocol) and cut into
non-overlapping ``seqlen`` windows; training shuffles the windows with a seeded generator. Batches are
``{"input_ids": LongTensor[B, seqlen]}``, so ``PruningCallback``'s default calibration forward
(``module(**batch)``) works on them unchanged.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import load_text, tokenize
from ..distill import distillation_loss
from ..errors import PrunekitError
from ..eval.perplexity import token_windows

log = logging.getLogger(__name__)


class TokenWindows(Dataset):
    """Rows of a ``[n, seqlen]`` window tensor as ``{"input_ids": ...}`` samples."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i]}


class WindowStream(Sampler[int]):
    """Window indices in seeded random order, epoch after epoch (a ``randperm`` of the windows per epoch from one
    seeded generator), starting ``offset`` windows into that stream: a second training stage continues where the
    first stopped instead of seeing its text again."""

    def __init__(self, n: int, seed: int, offset: int = 0):
        self.n, self.seed, self.offset, self.epoch = n, seed, offset, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed)
        epochs = (torch.randperm(self.n, generator=gen).tolist() for _ in itertools.count())
        stream = itertools.chain.from_iterable(epochs)
        start, self.epoch = self.offset + self.epoch * self.n, self.epoch + 1
        return itertools.islice(stream, start, start + self.n)


class TextDataModule(L.LightningDataModule):
    """Train (and optional validation) windows from text files, a saved dataset or a hub dataset name; training
    starts ``offset`` windows into the seeded random order (``WindowStream``)."""

    def __init__(
        self,
        tokenizer: Any,
        train: str | os.PathLike,
        val: str | os.PathLike | None = None,
        seqlen: int = 256,
        batch_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        offset: int = 0,
    ):
        super().__init__()
        self.tokenizer, self.train_source, self.val_source = tokenizer, train, val
        self.seqlen, self.batch_size, self.seed, self.num_workers = seqlen, batch_size, seed, num_workers
        self.offset = offset
        self.train_set: TokenWindows | None = None
        self.val_set: TokenWindows | None = None

    def _windows(self, source) -> TokenWindows:
        return TokenWindows(token_windows(tokenize(self.tokenizer, load_text(source)), self.seqlen))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._windows(self.train_source)
            log.info("training text: %d windows of %d tokens", len(self.train_set), self.seqlen)
            if len(self.train_set) < self.batch_size:  # Lightning would stop at once, having trained nothing
                raise PrunekitError(
                    f"the training text makes {len(self.train_set)} windows of {self.seqlen} tokens, fewer than one "
                    f"batch of {self.batch_size}: give more text or lower the batch size or window length"
                )
        if self.val_source is not None and self.val_set is None:
            self.val_set = self._windows(self.val_source)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=WindowStream(len(self.train_set), self.seed, self.offset),
            drop_last=True,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


class CausalLMModule(L.LightningModule):
    """Next-token loss on ``input_ids`` (plus the distillation terms when the trainer has a
    ``DistillationCallback``); AdamW over the trainable parameters (all, or only LoRA's), with a
    linear warm-up and cosine decay to ``min_lr_ratio * lr`` over ``trainer.max_steps``."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
    ):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.min_lr_ratio, self.betas = min_lr_ratio, tuple(betas)

    def on_train_start(self) -> None:
        """``from_pretrained`` returns models in eval mode; fine-tuning runs dropout in train mode."""
        self.model.train()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> Any:
        return self.model(input_ids=input_ids, labels=labels, use_cache=False, **kwargs)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]
        return self(ids, labels=ids).loss  # HF shifts the labels: predicts tokens 1..seqlen-1

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = distillation_loss(self, self._loss(batch))  # + the terms of a DistillationCallback, if any
        self.log("train_loss", loss, on_step=True, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise PrunekitError("the model has no trainable parameters; unfreeze some or add LoRA adapters")
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else None
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, self.warmup_steps, total, self.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lr_factor(step: int, warmup: int, total: int | None, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total`` (flat if unknown)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total is None or total <= warmup:
        return 1.0
    progress = min((step - warmup) / (total - warmup), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
