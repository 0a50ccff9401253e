"""Image classification with Lightning: top-1 / top-5 accuracy and mean cross-entropy of any classifier.

``ImageClassifier`` wraps a model that maps ``[B, C, H, W]`` images to ``[B, classes]`` logits; it
evaluates (``validation_step`` / ``test_step``) and trains (``training_step``: cross-entropy), so the
fine-tuning callback reuses it. ``ImageDataModule`` serves ImageFolder trees with the model's own timm
preprocessing. Metrics are torchmetrics states summed across batches and devices, never means of
batch means, so results do not depend on batch size or device count.

Class order: an ImageFolder maps its sorted class-folder names to 0..C-1. For ImageNet-1k models the
validation set must be in ImageNet layout (``val/<synset>/*.JPEG``, 1000 synset folders); the sorted
synsets are timm's class-index order.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from ..data.images import ImageData, collate_labeled, data_config, image_dataset, image_transform
from ..distill import distillation_loss
from ..errors import PrunekitError
from ..io.atomic import write_json
from ..io.timm import load_vision_model, num_classes_of

log = logging.getLogger(__name__)

STAGES = ("val", "test")


def accuracy_metrics(num_classes: int) -> MetricCollection:
    """top1 (and top5 when there are at least 5 classes): fraction of images whose label is in the top k."""
    metrics = {"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes >= 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


class ImageClassifier(L.LightningModule):
    """Any classifier as a LightningModule: evaluates top-1/top-5/loss, trains with cross-entropy + AdamW."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.model = model
        self.num_classes = num_classes or num_classes_of(model)
        self.lr, self.weight_decay, self.label_smoothing = lr, weight_decay, label_smoothing
        self.accuracy = nn.ModuleDict({s: accuracy_metrics(self.num_classes) for s in STAGES})
        self.mean_loss = nn.ModuleDict({s: MeanMetric() for s in STAGES})
        self.images = nn.ModuleDict({s: SumMetric() for s in STAGES})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return getattr(out, "logits", out)  # Hugging Face classifiers return an output object

    def on_fit_start(self) -> None:
        """Loaders return models in eval mode; training must run dropout / BatchNorm in train mode."""
        self.model.train()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels, label_smoothing=self.label_smoothing)
        loss = distillation_loss(self, loss)  # + the terms of a DistillationCallback, if any
        self.log("train/loss", loss, prog_bar=True, batch_size=labels.shape[0])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor] | None, stage: str) -> None:
        if batch is None:  # every image of the batch was unreadable and skipped (skip_bad_images)
            return
        images, labels = batch
        logits = self(images).float()
        self._check_logits(logits)
        accuracy = self.accuracy[stage]
        accuracy.update(logits, labels)
        self.mean_loss[stage].update(F.cross_entropy(logits, labels, reduction="none"))
        self.images[stage].update(labels.shape[0])
        self.log_dict({f"{stage}/{k}": m for k, m in accuracy.items()}, prog_bar=True)
        self.log(f"{stage}/loss", self.mean_loss[stage], prog_bar=True)
        self.log(f"{stage}/images", self.images[stage])

    def _check_logits(self, logits: torch.Tensor) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise PrunekitError(
                f"the model returned logits of shape {tuple(logits.shape)}, expected "
                f"[batch, {self.num_classes}]; is it a classifier with that many classes?"
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


def check_class_folders(dataset: Dataset, num_classes: int, where: str) -> None:
    """An ImageFolder must have one folder per model class, or labels would point at the wrong logits."""
    classes = getattr(dataset, "classes", None)
    if classes is not None and len(classes) != num_classes:
        raise PrunekitError(
            f"the model predicts {num_classes} classes but {where} has {len(classes)} class "
            f"folders; ImageFolder numbers the sorted folder names 0..{len(classes) - 1}, which must be "
            "the model's class order (ImageNet-1k: the 1000 synset folders, as in val/n01440764/)"
        )


class ImageDataModule(L.LightningDataModule):
    """ImageFolder trees (or Datasets) with timm preprocessing: ``val`` for validate/test, ``train`` for fit."""

    def __init__(
        self,
        val: ImageData | None = None,
        train: ImageData | None = None,
        data_config: dict[str, Any] | None = None,
        num_classes: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        train_augment: bool = True,
        skip_bad_images: bool = False,
        transform: Callable | None = None,
    ):
        super().__init__()
        if val is None and train is None:
            raise PrunekitError("give val= (evaluation images) and/or train= (fine-tuning images)")
        if data_config is None and transform is None:
            raise PrunekitError(
                "data_config (or transform) is needed for preprocessing; build it with prunekit.data.images."
                "data_config(model) or use ImageDataModule.for_model(model, ...)"
            )
        self.val_data, self.train_data, self.config, self.transform = val, train, data_config, transform
        self.num_classes, self.batch_size, self.num_workers = num_classes, batch_size, num_workers
        self.train_augment, self.skip_bad_images = train_augment, skip_bad_images
        self.val_set: Dataset | None = None
        self.train_set: Dataset | None = None

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs: Any) -> ImageDataModule:
        """Preprocessing and class count taken from ``model`` (timm's data config, unless a ``transform`` is given:
        a Hugging Face image processor's; the classifier head)."""
        kwargs.setdefault("num_classes", num_classes_of(model))
        config = data_config(model) if kwargs.get("transform") is None else None
        return cls(data_config=config, **kwargs)

    def setup(self, stage: str | None = None) -> None:
        if self.val_data is not None and self.val_set is None:
            self.val_set = self._dataset(self.val_data, is_training=False)
        if self.train_data is not None and self.train_set is None:
            self.train_set = self._dataset(self.train_data, is_training=self.train_augment)

    def _dataset(self, data: ImageData, is_training: bool) -> Dataset:
        transform = self.transform or image_transform(self.config, is_training=is_training)
        dataset = image_dataset(data, transform, self.skip_bad_images)
        if self.num_classes is not None:
            check_class_folders(dataset, self.num_classes, str(data))
        return dataset

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise PrunekitError("no training images: give ImageDataModule(train=...)")
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def _eval_loader(self) -> DataLoader:
        if self.val_set is None:
            raise PrunekitError("no evaluation images: give ImageDataModule(val=...)")
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            sampler=eval_sampler(self.val_set, self.trainer),
            collate_fn=collate_labeled,
        )


def eval_sampler(dataset: Dataset, trainer: L.Trainer | None):
    """Every image exactly once across devices. Lightning's default DistributedSampler pads the last
    shard with repeated images, which would count them twice; this sampler does not pad."""
    if trainer is None or trainer.world_size <= 1:
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(
        dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )


EVAL_TRAINER_DEFAULTS = {
    "accelerator": "auto",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
}


def eval_trainer(**kwargs: Any) -> L.Trainer:
    """A Trainer for evaluation: one device, no logger / checkpoints unless asked (CPU or GPU: 'auto')."""
    return L.Trainer(**{**EVAL_TRAINER_DEFAULTS, **kwargs})


def _results(metrics: dict[str, Any], stage: str = "test") -> dict[str, float]:
    prefix = f"{stage}/"
    out = {k[len(prefix) :]: float(v) for k, v in metrics.items() if k.startswith(prefix)}
    out["images"] = int(out["images"])
    return out


def evaluate_image(
    model: nn.Module,
    data: ImageData,
    batch_size: int = 64,
    num_workers: int = 0,
    accelerator: str = "auto",
    devices: int | str = 1,
    progress: bool = True,
    results: str | os.PathLike | None = None,
    skip_bad_images: bool = False,
    transform: Callable | None = None,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """Top-1 / top-5 / mean cross-entropy of ``model`` on an ImageFolder (or Dataset) via ``trainer.test``.

    Returns ``{"top1", "top5" (>= 5 classes), "loss", "images", "num_classes", "data_config"}``, also
    written to ``results`` (JSON) when given. ``transform`` preprocesses an image (default: the model's timm data
    config; Hugging Face models: ``processor_transform`` of their image processor). ``trainer_kwargs`` go to
    ``lightning.Trainer``.
    """
    module = ImageClassifier(model)
    datamodule = ImageDataModule.for_model(
        model,
        val=data,
        batch_size=batch_size,
        num_workers=num_workers,
        skip_bad_images=skip_bad_images,
        transform=transform,
    )
    trainer = eval_trainer(accelerator=accelerator, devices=devices, enable_progress_bar=progress, **trainer_kwargs)
    described = type(data).__name__ if isinstance(data, Dataset) else str(data)
    return _run_test(trainer, module, datamodule, {"data": described}, results)


def _run_test(
    trainer: L.Trainer,
    module: ImageClassifier,
    datamodule: ImageDataModule,
    extra: dict[str, Any],
    results: str | os.PathLike | None,
) -> dict[str, Any]:
    trainer.test(module, datamodule=datamodule, verbose=False)
    out = {
        **_results(trainer.callback_metrics),
        "num_classes": module.num_classes,
        "data_config": datamodule.config,
        **extra,
    }
    log.info("image eval: top-1 %.4f over %d images", out["top1"], out["images"])
    if results is not None and trainer.is_global_zero:
        write_json(results, out)
        out["results_file"] = str(results)
    return out


# ---------------------------------------------------------------- LightningCLI-style YAML config

CONFIG_SECTIONS = {"trainer", "model", "data", "seed_everything", "results"}
MODEL_KEYS = {"source", "pretrained", "num_classes", "weights"}
DATA_KEYS = {"path", "batch_size", "num_workers"}


def load_eval_config(
    path: str | os.PathLike, sections: set[str], overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A YAML mapping whose top-level keys must all be in ``sections`` (typos fail before any work).

    ``overrides`` (e.g. from CLI flags) are merged on top, one level deep: ``{"model": {"source": ...}}``
    replaces only ``model.source``.
    """
    from ..io.yamlfile import load_yaml

    config = load_yaml(path, "eval config")
    for key, value in (overrides or {}).items():
        config[key] = {**(config.get(key) or {}), **value} if isinstance(value, dict) else value
    unknown = set(config) - sections
    if unknown:
        raise PrunekitError(f"{str(path)!r}: unknown section(s) {sorted(unknown)}; allowed: {sorted(sections)}")
    return config


def check_keys(section: dict[str, Any] | None, allowed: set[str], name: str, required: set[str]) -> dict[str, Any]:
    section = dict(section or {})
    unknown, missing = set(section) - allowed, required - set(section)
    if unknown:
        raise PrunekitError(f"config section {name!r}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    if missing:
        raise PrunekitError(f"config section {name!r} needs {sorted(missing)}")
    return section


def check_trainer_keys(section: dict[str, Any] | None) -> dict[str, Any]:
    allowed = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    return check_keys(section, allowed, "trainer", set())


def eval_sections(
    path: str | os.PathLike, overrides: dict[str, Any] | None, model_keys: set[str], data_keys: set[str]
) -> tuple[dict, dict, dict, dict]:
    """A LightningCLI-style eval config: the whole mapping and its checked ``trainer:``, ``model:`` (needs
    ``source``) and ``data:`` (needs ``path``) sections; seeds everything when ``seed_everything`` is set."""
    config = load_eval_config(path, CONFIG_SECTIONS, overrides)
    trainer_cfg = check_trainer_keys(config.get("trainer"))
    model_cfg = check_keys(config.get("model"), model_keys, "model", {"source"})
    data_cfg = check_keys(config.get("data"), data_keys, "data", {"path"})
    if config.get("seed_everything") is not None:
        L.seed_everything(config["seed_everything"], verbose=False)
    return config, trainer_cfg, model_cfg, data_cfg


def run_image_eval_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate as a LightningCLI-style YAML says (sections ``trainer:``, ``model:`` (``source``,
    ``pretrained``, ``num_classes``, ``weights``), ``data:`` (``path``, ``batch_size``, ``num_workers``),
    optional ``seed_everything:`` and ``results:`` JSON path); returns the results dict."""
    config, trainer_cfg, model_cfg, data_cfg = eval_sections(path, overrides, MODEL_KEYS, DATA_KEYS)
    model = load_vision_model(**model_cfg)
    data_path = data_cfg.pop("path")
    module = ImageClassifier(model)
    datamodule = ImageDataModule.for_model(model, val=data_path, **data_cfg)
    trainer = eval_trainer(**trainer_cfg)
    extra = {"model": str(model_cfg["source"]), "data": str(data_path), "config": str(path)}
    return _run_test(trainer, module, datamodule, extra, config.get("results"))
