"""Images for calibration and evaluation, preprocessed the way the model expects (timm's data config).

An ImageFolder tree (``ROOT/<class>/<image>``) maps the sorted class-folder names to indices 0..C-1; for
ImageNet-1k the sorted synset folders (``n01440764`` ...) are exactly timm's class-index order.
"""
from __future__ import annotations
from ..errors import PrunekitError

import functools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

log = logging.getLogger(__name__)

ImageData = str | os.PathLike | Dataset


def data_config(model: nn.Module) -> dict[str, Any]:
    """The model's own eval preprocessing (input size, resize/crop, interpolation, mean/std), from timm."""
    from timm.data import resolve_data_config
    return resolve_data_config(model=model)


def image_transform(config: dict[str, Any], is_training: bool = False) -> Callable:
    """timm's transform for a data config: resize + centre crop + normalise (eval) or its train augmentation."""
    from timm.data import create_transform
    return create_transform(**config, is_training=is_training)


def image_dataset(data: ImageData, transform: Callable | None = None) -> Dataset:
    """An ImageFolder over ``data`` (a directory of class folders); a ``Dataset`` is returned as is."""
    if isinstance(data, Dataset):
        return data
    path = Path(os.path.expanduser(str(data)))
    if not path.is_dir():
        raise PrunekitError(f"image data {str(data)!r} is not a directory; give an ImageFolder tree "
                                "(ROOT/<class>/<image files>), e.g. /data/imagenet/val")
    from torchvision.datasets import ImageFolder
    return ImageFolder(str(path), transform=transform)


def sample_indices(n: int, nsamples: int, seed: int = 0) -> torch.Tensor:
    """The first ``nsamples`` of ``torch.randperm(n)`` under ``torch.Generator().manual_seed(seed)``."""
    if nsamples < 1:
        raise PrunekitError(f"nsamples must be positive, got {nsamples}")
    if nsamples > n:
        raise PrunekitError(f"asked for {nsamples} calibration images but the data holds only {n}; "
                         "lower --nsamples or give a larger image folder")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:nsamples]


def _image_of(item: Any, transform: Callable | None) -> torch.Tensor:
    """The image tensor of one dataset item: ``(image, label)`` or a bare image, PIL or tensor."""
    image = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(image, torch.Tensor):
        if transform is None:
            raise TypeError(f"dataset item is a {type(image).__name__}, not a tensor, and no transform was given")
        image = transform(image)
    return image


def collate_images(items: Sequence[Any], transform: Callable | None = None) -> torch.Tensor:
    """Stack the images of a list of dataset items, dropping labels: ``[B, C, H, W]``."""
    return torch.stack([_image_of(item, transform) for item in items])


def image_calibration(model: nn.Module, data: ImageData, nsamples: int = 128, batch_size: int = 32,
                      seed: int = 0, num_workers: int = 0) -> list[torch.Tensor]:
    """A seeded sample of ``nsamples`` images, preprocessed for ``model``, as a list of ``[B, C, H, W]``
    batches that ``prunekit.prune(model, ..., calib=batches)`` takes."""
    transform = image_transform(data_config(model))
    dataset = image_dataset(data, transform)
    indices = sample_indices(len(dataset), nsamples, seed)
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=functools.partial(collate_images, transform=transform))
    batches = list(loader)
    log.info("calibration: %d images in %d batches of shape %s", nsamples, len(batches), tuple(batches[0].shape[1:]))
    return batches
