"""Make the bundled image assets the shipped recipes run on: a tiny ImageFolder and a tiny timm ConvNeXt.

Reads the development fixtures (``../shared/fixtures/digits``: scikit-learn's handwritten digits as 32x32
RGB PNGs) and writes, into ``prunekit/assets/``:

* ``digits/{train,val}/<class>/*.png``: the first TRAIN_PER_CLASS / VAL_PER_CLASS images (sorted file
  names) of every class folder of the fixture's train / val split, copied byte for byte;
* ``convnext-digits-500k/``: timm ``convnext_atto`` with its depths (2, 2, 6, 2) but narrow stages
  (dims 16-32-64-128), 10 classes, trained here on the fixture's whole train split (1,347 images), saved
  with timm's ``save_for_hf`` so ``timm.create_model("local-dir:PATH", pretrained=True)`` loads it.

Seeded (torch seed 0, 2 threads, CPU): a rerun reproduces the same images and, up to CPU kernel
differences, the same checkpoint. About 10 minutes on a busy 2-core CPU machine.

    python benchmarks/make_digits_assets.py [--fixtures ../shared/fixtures] [--out prunekit/assets]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models import save_for_hf

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PER_CLASS, VAL_PER_CLASS = 16, 10
ARCH = "convnext_atto"
ARGS = dict(num_classes=10, dims=(16, 32, 64, 128))
NAME = "convnext-digits-500k"
# The fixtures' preprocessing: 32x32 input, no resize or crop, mean = std = 0.5.
DATA_CFG = dict(
    input_size=(3, 32, 32),
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    interpolation="bilinear",
    crop_pct=1.0,
    num_classes=10,
)
# What the saved config keeps of convnext_atto's own pretrained config: not its ImageNet weights' url, hub id,
# tag, test-time size or pool size.
KEPT_CFG = ("architecture", "custom_load", "fixed_input_size", "crop_mode", "first_conv", "classifier", "license")
EPOCHS, BATCH, LR = 40, 64, 4e-3


def copy_subset(source: Path, target: Path, per_class: int) -> None:
    if target.exists():
        shutil.rmtree(target)
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.png"))[:per_class]:
            shutil.copyfile(image, target / folder.name / image.name)


def tensors(split: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of an ImageFolder split, normalised as DATA_CFG says: ``[N, 3, 32, 32]``, labels ``[N]``."""
    images, labels = [], []
    for label, folder in enumerate(sorted(p for p in split.iterdir() if p.is_dir())):
        for path in sorted(folder.glob("*.png")):
            array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
            images.append(torch.from_numpy(array).permute(2, 0, 1))
            labels.append(label)
    return (torch.stack(images) - 0.5) / 0.5, torch.tensor(labels)


def train(xtr: torch.Tensor, ytr: torch.Tensor) -> torch.nn.Module:
    """AdamW with a one-cycle schedule, random shifts of up to 2 pixels, label smoothing 0.1."""
    model = timm.create_model(ARCH, **ARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    steps = EPOCHS * ((len(xtr) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    model.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(len(xtr))
        for start in range(0, len(xtr), BATCH):
            j = perm[start : start + BATCH]
            shift = torch.randint(-2, 3, (2,))
            x = torch.roll(xtr[j], shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            loss = F.cross_entropy(model(x), ytr[j], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", type=Path, default=ROOT.parent / "shared" / "fixtures")
    parser.add_argument("--out", type=Path, default=ROOT / "prunekit" / "assets")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    source = args.fixtures / "digits"
    copy_subset(source / "train", args.out / "digits" / "train", TRAIN_PER_CLASS)
    copy_subset(source / "val", args.out / "digits" / "val", VAL_PER_CLASS)
    start = time.time()
    model = train(*tensors(source / "train"))
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{NAME}: {params:,} parameters, trained in {time.time() - start:.0f}s; top-1 on the fixture's val "
        f"{top1(model, *tensors(source / 'val')):.4f}, on the bundled val "
        f"{top1(model, *tensors(args.out / 'digits' / 'val')):.4f}"
    )
    save(model, args.out / NAME, tensors(args.out / "digits" / "val")[0])


def save(model: torch.nn.Module, target: Path, images: torch.Tensor) -> None:
    """timm's ``save_for_hf`` with the digits preprocessing, checked by reloading through ``local-dir:``."""
    model.pretrained_cfg = {**{k: model.pretrained_cfg[k] for k in KEPT_CFG}, **DATA_CFG}
    if target.exists():
        shutil.rmtree(target)
    save_for_hf(model, str(target), safe_serialization=True)
    reloaded = timm.create_model(f"local-dir:{target}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(images), model(images), atol=1e-5), "the saved checkpoint does not reload"


if __name__ == "__main__":
    main()
