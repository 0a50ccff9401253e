"""Images for calibration and evaluation, preprocessed the way the model expects (timm's data config).

An ImageFolder tree (``ROOT/<class>/<image>``) maps the sorted class-folder names to indices 0..C-1; for
ImageNet-1k the sorted synset folders (``n01440764`` ...) are exactly timm's class-index order.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from ..errors import PrunekitError
from ..progress import progress

log = logging.getLogger(__name__)

ImageData = str | os.PathLike | Dataset
SKIP_HINT = "replace or remove it, or skip unreadable images (--skip-bad-images, skip_bad_images=True)"


class BadImageError(PrunekitError):
    """An image file that cannot be decoded (corrupt, truncated, not an image)."""

    def __init__(self, message: str):
        # A DataLoader worker re-raises it as BadImageError("Caught ... Original Traceback ...: <message>"):
        # keep the one line that names the file.
        lines = message.strip().splitlines()
        super().__init__(lines[-1].split("BadImageError: ", 1)[-1] if len(lines) > 1 else message)


def read_image(path: str) -> Any:
    """torchvision's PIL loader (RGB), with an unreadable file as one line naming it."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"image {path!r} cannot be read ({str(err).splitlines()[0][:120]}); {SKIP_HINT}") from None


class CheckedImages(Dataset):
    """An ImageFolder whose unreadable images fail naming the file or, with ``skip_bad_images``, come back
    as None (logged), which ``collate_images`` / ``collate_labeled`` drop. Keeps ImageFolder's ``classes``,
    ``class_to_idx``, ``samples`` and ``targets``."""

    def __init__(self, root: Path, transform: Callable | None = None, skip_bad_images: bool = False):
        from torchvision.datasets import ImageFolder

        try:
            self.folder = ImageFolder(str(root), transform=transform, loader=read_image)
        except FileNotFoundError as err:  # no class folders, or no image files in them
            raise PrunekitError(
                f"image data {str(root)!r}: {err}; give an ImageFolder tree (ROOT/<class>/<image files>)"
            ) from None
        self.skip_bad_images = skip_bad_images
        self.root, self.transform = self.folder.root, transform
        self.classes, self.class_to_idx = self.folder.classes, self.folder.class_to_idx
        self.samples, self.targets = self.folder.samples, self.folder.targets

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.folder[index]
        except BadImageError as err:
            if not self.skip_bad_images:
                raise
            log.warning("skipping an unreadable image: %s", str(err).split(";")[0])
            return None


def data_config(model: nn.Module) -> dict[str, Any]:
    """The model's own eval preprocessing (input size, resize/crop, interpolation, mean/std), from timm."""
    from timm.data import resolve_data_config

    return resolve_data_config(model=model)


def image_transform(config: dict[str, Any], is_training: bool = False) -> Callable:
    """timm's transform for a data config: resize + centre crop + normalise (eval) or its train augmentation."""
    from timm.data import create_transform

    return create_transform(**config, is_training=is_training)


def image_dataset(data: ImageData, transform: Callable | None = None, skip_bad_images: bool = False) -> Dataset:
    """An ImageFolder over ``data`` (a directory of class folders); a ``Dataset`` is returned as is.

    An unreadable image fails naming the file when it is read; with ``skip_bad_images`` it is logged and
    read as None instead, which ``collate_images`` / ``collate_labeled`` drop (count what arrives)."""
    if isinstance(data, Dataset):
        return data
    path = Path(os.path.expanduser(str(data)))
    if not path.is_dir():
        raise PrunekitError(
            f"image data {str(data)!r} is not a directory; give an ImageFolder tree "
            "(ROOT/<class>/<image files>), e.g. /data/imagenet/val"
        )
    return CheckedImages(path, transform, skip_bad_images)


def sample_indices(n: int, nsamples: int, seed: int = 0) -> torch.Tensor:
    """The first ``nsamples`` of ``torch.randperm(n)`` under ``torch.Generator().manual_seed(seed)``."""
    if nsamples < 1:
        raise PrunekitError(f"nsamples must be positive, got {nsamples}")
    if nsamples > n:
        raise PrunekitError(
            f"asked for {nsamples} calibration images but the data holds only {n}; "
            "lower --nsamples or give a larger image folder"
        )
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:nsamples]


def heldout_indices(targets: Sequence[int], nsamples: int, seed: int, holdout: int) -> list[int]:
    """Images ``image_calibration`` does not sample (it takes the first ``nsamples`` of the seeded permutation):
    the next ``holdout`` of that permutation, plus the first unused image of each class they miss, so every class
    folder of a held-out ImageFolder holds one."""
    rest = sample_indices(len(targets), len(targets), seed).tolist()[nsamples:]
    if len(rest) < holdout:
        raise PrunekitError(
            f"the image folder leaves {len(rest)} images outside the {nsamples} calibration images, fewer than the "
            f"{holdout} held out to measure quality; give --eval-data or a lower --holdout"
        )
    chosen = rest[:holdout]
    seen = {targets[i] for i in chosen}
    for i in rest[holdout:]:
        if targets[i] not in seen:
            chosen.append(i)
            seen.add(targets[i])
    return chosen


def _image_of(item: Any, transform: Callable | None) -> torch.Tensor:
    """The image tensor of one dataset item: ``(image, label)`` or a bare image, PIL or tensor."""
    image = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(image, torch.Tensor):
        if transform is None:
            raise TypeError(f"dataset item is a {type(image).__name__}, not a tensor, and no transform was given")
        image = transform(image)
    return image


def collate_images(items: Sequence[Any], transform: Callable | None = None) -> torch.Tensor | None:
    """Stack the images of a list of dataset items, dropping labels and skipped (None) items:
    ``[B, C, H, W]``, or None when every item was skipped."""
    images = [_image_of(item, transform) for item in items if item is not None]
    return torch.stack(images) if images else None


def collate_labeled(items: Sequence[Any]) -> Any:
    """``default_collate`` without the skipped (None) items; None when every item was skipped."""
    kept = [item for item in items if item is not None]
    return default_collate(kept) if kept else None


def processor_transform(processor: Any) -> Callable:
    """A Hugging Face image processor (or a processor holding one) as a transform: one PIL image to ``[C, H, W]``
    (the checkpoint's own resizing, cropping and normalising)."""
    images = getattr(processor, "image_processor", processor)

    def transform(image: Any) -> torch.Tensor:
        return images(images=image, return_tensors="pt")["pixel_values"][0]

    return transform


def image_calibration(
    model: nn.Module,
    data: ImageData,
    nsamples: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    num_workers: int = 0,
    skip_bad_images: bool = False,
    transform: Callable | None = None,
) -> list[torch.Tensor]:
    """A seeded sample of ``nsamples`` images, preprocessed for ``model`` (timm's data config, or ``transform``:
    a Hugging Face image processor's), as a list of ``[B, C, H, W]`` batches that ``prunekit.prune(model, ...,
    calib=batches)`` takes. An unreadable image fails naming it; with ``skip_bad_images`` it is left out of the
    sample and counted in a warning."""
    transform = transform or image_transform(data_config(model))
    dataset = image_dataset(data, transform, skip_bad_images)
    indices = sample_indices(len(dataset), nsamples, seed)
    batches = image_batches(Subset(dataset, indices.tolist()), transform, batch_size, num_workers, "calibration")
    kept = sum(len(b) for b in batches)
    if kept < nsamples:
        log.warning(
            "skipped %d unreadable image(s) of the %d sampled from %s; calibrating on %d",
            nsamples - kept,
            nsamples,
            data,
            kept,
        )
    if not batches:
        raise PrunekitError(f"none of the {nsamples} images sampled from {str(data)!r} could be read; check the folder")
    log.info("calibration: %d images in %d batches of shape %s", nsamples, len(batches), tuple(batches[0].shape[1:]))
    return batches


def image_batches(dataset: Dataset, transform: Callable, batch_size: int, num_workers: int, what: str) -> list:
    """Every readable image of ``dataset`` in order, as ``[B, C, H, W]`` batches (skipped images left out)."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=functools.partial(collate_images, transform=transform),
    )
    loaded = progress(loader, f"loading {what} images", unit="batch", inner=True)
    return [batch for batch in loaded if batch is not None]
