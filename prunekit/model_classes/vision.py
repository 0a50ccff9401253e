"""Image models: calibrated on a seeded sample of an ImageFolder tree (``ROOT/<class>/<image>``), preprocessed as
the checkpoint says (its Hugging Face image processor, or the timm model's own data config).

* ``image-classification``: Hugging Face ``*ForImageClassification`` (ViT, Swin, ConvNeXt, ...); top-1 / top-5
  on an ImageFolder whose sorted class folders are the model's classes (``top1``, ``top5``).
* ``vision-encoder``: bare vision encoders (DINOv2, ViT, SigLIP's vision tower, ...): cosine of each image's
  embedding (pooled output, else the mean of the last hidden state) to the dense model's (``embedding_cosine``).
* ``timm``: timm and torchvision classifiers (``timm:NAME``, ``local-dir:PATH``, ``torchvision:NAME``); top-1 /
  top-5. Not a ``--model-class``: the source's prefix chooses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Job, ModelClass, Prepared, Recipe, against_reference

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


IMAGES = "ImageFolder (ROOT/<class>/<image files>)"
IMAGE_INPUTS = ("pixel_values",)


def image_processor(source: str, trust_remote_code: bool) -> Any:
    from ..io.hf import load_processor

    return load_processor(source, trust_remote_code, needs=("image_processor",), what="image models")


def hf_images(job: Job) -> list[dict]:
    """A seeded sample of ``--calib-data`` through the checkpoint's image processor."""
    from ..data.images import image_calibration, processor_transform

    r = job.recipe
    transform = processor_transform(job.preprocessor)
    batches = image_calibration(
        None, r.calib_data, r.nsamples, r.batch_size, r.seed, r.num_workers, r.skip_bad_images, transform
    )
    return [{"pixel_values": b} for b in batches]


def timm_images(job: Job) -> list:
    """A seeded sample of ``--calib-data`` with the timm model's own preprocessing."""
    from ..data.images import image_calibration

    r = job.recipe
    return image_calibration(
        job.model, r.calib_data, r.nsamples, r.batch_size, r.seed, r.num_workers, r.skip_bad_images
    )


# ---------------------------------------------------------------- evaluation


def classified_folder(job: Job) -> Prepared:
    """The evaluation ImageFolder, checked to hold one folder per class of the model before the weights load."""
    from ..data.images import image_dataset, processor_transform
    from ..eval.image import check_class_folders

    folder = job.recipe.eval_data
    dataset = image_dataset(folder)
    labels = getattr(job.config, "num_labels", None)
    if isinstance(labels, int):
        check_class_folders(dataset, labels, folder)
    transform = processor_transform(job.preprocessor) if job.preprocessor is not None else None
    return Prepared(job.model_class.name, folder, extra={"transform": transform})


def top_k(model: nn.Module, prepared: Prepared, recipe: Recipe) -> dict[str, float]:
    """Top-1 / top-5 and mean cross-entropy over the ImageFolder (Lightning)."""
    from ..eval.image import evaluate_image

    result = evaluate_image(
        model,
        prepared.eval_data,
        batch_size=recipe.eval_batch_size,
        num_workers=recipe.num_workers,
        progress=False,
        skip_bad_images=recipe.skip_bad_images,
        transform=prepared.extra.get("transform"),
    )
    return {k: result[k] for k in ("top1", "top5", "loss") if k in result}


def encoder_folder(job: Job) -> Prepared:
    """Every image of the evaluation ImageFolder, in order, through the image processor (labels unused)."""
    from ..data.images import image_batches, image_dataset, processor_transform

    r = job.recipe
    transform = processor_transform(job.preprocessor)
    dataset = image_dataset(r.eval_data, transform, r.skip_bad_images)
    batches = image_batches(dataset, transform, r.eval_batch_size, r.num_workers, "evaluation")
    return Prepared("vision-encoder", [{"pixel_values": b} for b in batches])


def image_embedding_score(model: nn.Module, prepared: Prepared, recipe: Recipe) -> dict[str, float]:
    from ..eval.agreement import image_embeddings, mean_cosine

    current = image_embeddings(model, prepared.eval_data, recipe.device)
    return against_reference(prepared, current, "embedding_cosine", mean_cosine)


def load_timm(job: Job) -> nn.Module:
    from ..io.timm import load_vision_model

    return load_vision_model(job.recipe.model)


TOP_K = "top-1 / top-5 accuracy and mean cross-entropy (top1, top5, loss)"

ROWS = (
    ModelClass(
        "image-classification",
        "*ForImageClassification: ViT, Swin, ConvNeXt, ...",
        f"{IMAGES}; for evaluation, one class folder per label of the model, in its label order",
        TOP_K,
        rank=50,
        calibration=hf_images,
        prepare=classified_folder,
        score=top_k,
        preprocessor=image_processor,
        auto_class="AutoModelForImageClassification",
        mapping="MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        suffixes=("ForImageClassification",),
        inputs=IMAGE_INPUTS,
        holdout="images",
    ),
    ModelClass(
        "vision-encoder",
        "bare vision encoders: DINOv2, ViT, SigLIP's vision tower, ...",
        IMAGES,
        "cosine of each image's embedding to the dense model's (embedding_cosine)",
        rank=90,
        calibration=hf_images,
        prepare=encoder_folder,
        score=image_embedding_score,
        preprocessor=image_processor,
        auto_class="AutoModel",
        mapping="MODEL_FOR_IMAGE_MAPPING_NAMES",
        suffixes=("VisionModel",),  # a vision-language model's tower on its own (CLIPVisionModel, ...)
        inputs=IMAGE_INPUTS,
        holdout="images",
    ),
    ModelClass(
        "timm",
        "timm and torchvision image classifiers (timm:NAME, local-dir:PATH, torchvision:NAME)",
        IMAGES,
        TOP_K,
        rank=1000,
        calibration=timm_images,
        prepare=classified_folder,
        score=top_k,
        load=load_timm,
        holdout="images",
    ),
)
