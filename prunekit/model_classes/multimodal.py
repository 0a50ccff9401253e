"""Models that read images and text, calibrated on images with their texts through the checkpoint's processor.

* ``image-text-to-text``: vision-language models (LLaVA, Qwen2.5-VL, Mllama, ...), whatever the layout of their
  image inputs (one image tensor per sample, Qwen2-VL's packed patches, Mllama's tiles and cross-attention mask);
  an image-text folder; text perplexity given the image (``text_ppl``).
* ``dual-encoder``: CLIP, SigLIP and the like; images with captions (an image-text folder, or an ImageFolder whose
  class names fill ``prompt_template``); zero-shot accuracy on an ImageFolder (``zeroshot_top1``, ``zeroshot_top5``)
  or image-text retrieval recall on image-text data (``i2t_recall@1``, ``t2i_recall@1``, ... @5).

An *image-text folder* holds ``data.jsonl``, one ``{"image": "images/0001.png", "text": "..."}`` a line.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .base import Job, ModelClass, Prepared, Recipe
from .text import labeled_ppl

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


log = logging.getLogger(__name__)

IMAGE_TEXT = "image-text folder (data.jsonl of image paths and texts)"


def vlm_processor(source: str, trust_remote_code: bool) -> Any:
    from ..io.hf import load_processor

    return load_processor(source, trust_remote_code)


def dual_processor(source: str, trust_remote_code: bool) -> Any:
    from ..io.hf import load_processor

    return load_processor(source, trust_remote_code, what="dual encoders")


def vlm_records(job: Job) -> list[dict]:
    from ..data.image_text import image_text_inputs, read_image_text, sample_records

    r = job.recipe
    if r.seqlen is not None:
        log.warning("--seqlen does not apply to image-text models: each record is one sample, as long as it is")
    records = sample_records(read_image_text(r.calib_data, "--calib-data"), r.nsamples, r.seed)
    return image_text_inputs(job.preprocessor, records, r.batch_size)


def vlm_data(job: Job) -> Prepared:
    from ..data.image_text import image_text_inputs, read_image_text

    records = read_image_text(job.recipe.eval_data, "--eval-data")
    return Prepared(
        "image-text-to-text", image_text_inputs(job.preprocessor, records, job.recipe.eval_batch_size, True)
    )


# ---------------------------------------------------------------- dual encoders


def text_length(config: Any) -> int:
    """How many tokens the text tower reads (CLIP 77, SigLIP 64): captions are padded and cut to it."""
    text = getattr(config, "text_config", config)
    return int(getattr(text, "max_position_embeddings", 77))


def dual_pairs(job: Job) -> list[dict]:
    """A seeded sample of captioned images from ``--calib-data`` (image-text folder or ImageFolder)."""
    from ..data.image_text import caption_records, pair_inputs, sample_records

    r = job.recipe
    records = sample_records(caption_records(r.calib_data, "--calib-data", r.prompt_template), r.nsamples, r.seed)
    return pair_inputs(job.preprocessor, records, r.batch_size, text_length(job.config))


def dual_data(job: Job) -> Prepared:
    """An ImageFolder for zero-shot classification (its class names as prompts), else image-text pairs for
    retrieval."""
    from ..data.image_text import is_image_folder, pair_inputs, read_image_text

    r, length = job.recipe, text_length(job.config)
    if is_image_folder(r.eval_data):
        return zeroshot_data(job, length)
    records = read_image_text(r.eval_data, "--eval-data")
    batches = pair_inputs(job.preprocessor, records, r.eval_batch_size, length)
    return Prepared("dual-encoder", batches, extra={"pairs": [(str(x["image"]), x["text"]) for x in records]})


def zeroshot_data(job: Job, length: int) -> Prepared:
    import torch

    from ..data.image_text import text_inputs
    from ..data.images import image_batches, image_dataset, processor_transform

    r = job.recipe
    transform = processor_transform(job.preprocessor)
    dataset = image_dataset(r.eval_data, transform, r.skip_bad_images)
    prompts = text_inputs(job.preprocessor, [r.prompt_template.format(c) for c in dataset.classes], length)
    images = image_batches(dataset, transform, r.eval_batch_size, r.num_workers, "evaluation")
    return Prepared("dual-encoder", images, torch.tensor(dataset.targets), extra={"prompts": prompts})


def dual_score(model: nn.Module, prepared: Prepared, recipe: Recipe) -> dict[str, float]:
    from ..eval.retrieval import retrieval_recall, zeroshot_accuracy

    if "prompts" in prepared.extra:
        return zeroshot_accuracy(model, prepared.eval_data, prepared.extra["prompts"], prepared.labels, recipe.device)
    return retrieval_recall(model, prepared.eval_data, prepared.extra["pairs"], recipe.device)


ROWS = (
    ModelClass(
        "image-text-to-text",
        "vision-language models: LLaVA, Qwen2.5-VL, Mllama, ...",
        IMAGE_TEXT,
        "text perplexity given the image (text_ppl)",
        rank=10,
        calibration=vlm_records,
        prepare=vlm_data,
        score=labeled_ppl("text_ppl", shift=True),
        preprocessor=vlm_processor,
        auto_class="AutoModelForImageTextToText",
        mapping="MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
        inputs=("input_ids",),
    ),
    ModelClass(
        "dual-encoder",
        "image-text dual encoders: CLIP, SigLIP, ...",
        f"{IMAGE_TEXT}, or an ImageFolder whose class names fill --prompt-template",
        "zero-shot top-1/top-5 on an ImageFolder (zeroshot_top1, zeroshot_top5); image-text retrieval recall@1/@5 "
        "on image-text data (i2t_recall@1, t2i_recall@1, ...)",
        rank=20,
        calibration=dual_pairs,
        prepare=dual_data,
        score=dual_score,
        preprocessor=dual_processor,
        auto_class="AutoModelForZeroShotImageClassification",
        mapping="MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        inputs=("input_ids", "pixel_values"),
    ),
)
