"""Images with text for vision-language models, in one small local format:

    DATA/data.jsonl           one JSON object a line: {"image": "images/0001.png", "text": "A red square."}
    DATA/images/0001.png      image paths are relative to the folder holding data.jsonl

``--calib-data`` / ``--eval-data`` name the folder or the ``.jsonl`` file itself. Each record is one sample, turned
into model inputs by the checkpoint's own processor (``AutoProcessor``: resizing, normalising, and expanding the
image placeholder into as many tokens as the vision tower yields); a text without the placeholder gets it in front.
Everything is read and checked before the weights load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import PrunekitError
from .images import read_image, sample_indices
from .inputs import IGNORE, Inputs
from .jsonl import read_jsonl

DATA_FILE = "data.jsonl"
FORMAT = f'a folder with {DATA_FILE} lines {{"image": "relative/path.png", "text": "..."}} (or that .jsonl file)'


def data_file(source: str, what: str) -> Path:
    """The ``.jsonl`` file of an image-text data set given as its folder or as the file."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / DATA_FILE
    if not path.is_file() or path.suffix.lower() != ".jsonl":
        raise PrunekitError(f"{what} {source!r} is not image-text data; image-text models take {FORMAT}")
    return path


def read_image_text(source: str, what: str) -> list[dict[str, Any]]:
    """The records of ``source`` with each ``image`` resolved against the data file's folder; a missing image
    fails naming its line."""
    path = data_file(source, what)
    records = read_jsonl(path, {"image": str, "text": str}, what)
    for number, record in enumerate(records, start=1):
        record["image"] = path.parent / record["image"]
        if not record["image"].is_file():
            raise PrunekitError(f"{what} {str(path)!r} record {number}: image {str(record['image'])!r} does not exist")
    return records


def sample_records(records: list[dict[str, Any]], nsamples: int, seed: int) -> list[dict[str, Any]]:
    """A seeded sample of ``nsamples`` records, drawn as image calibration draws images."""
    return [records[i] for i in sample_indices(len(records), nsamples, seed).tolist()]


def image_token(processor: Any) -> str:
    token = getattr(processor, "image_token", None)
    if not isinstance(token, str):
        raise PrunekitError(
            f"the checkpoint's processor ({type(processor).__name__}) names no image token to place the image in "
            "the text; image-text models need a processor with an image token"
        )
    return token


def process(processor: Any, record: dict[str, Any]) -> Inputs:
    """One record as model inputs (batch of one), the image placeholder put in front of a text without one."""
    token = image_token(processor)
    text = record["text"] if token in record["text"] else f"{token}\n{record['text']}"
    return dict(processor(images=[read_image(str(record["image"]))], text=[text], return_tensors="pt"))


def collate(samples: list[Inputs], pad_id: int) -> Inputs:
    """One batch from single-sample inputs: per-token tensors (those whose shape starts like ``input_ids``': the
    attention mask, Mllama's ``[1, tokens, images, tiles]`` cross-attention mask) right-padded along the tokens,
    ``input_ids`` with the pad token and the others with zeros (masked out); everything else (pixels, image sizes,
    Qwen2-VL's packed patches) concatenated along the first dimension."""
    longest = max(s["input_ids"].shape[1] for s in samples)
    batch = {}
    for key in samples[0]:
        if all(per_token(s[key], s["input_ids"]) for s in samples):
            fill = pad_id if key == "input_ids" else 0
            rows = [pad_tokens(s[key], longest, fill) for s in samples]
        else:
            rows = [s[key] for s in samples]
        batch[key] = torch.cat(rows)
    return batch


def per_token(tensor: torch.Tensor, ids: torch.Tensor) -> bool:
    return tensor.dim() >= 2 and tuple(tensor.shape[:2]) == tuple(ids.shape)


def pad_tokens(tensor: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    """``tensor`` right-padded along its second (token) dimension to ``length``."""
    trailing = (0, 0) * (tensor.dim() - 2)
    return torch.nn.functional.pad(tensor, (*trailing, 0, length - tensor.shape[1]), value=fill)


def text_labels(batch: Inputs, image_token_id: int) -> torch.Tensor:
    """The text tokens as targets: image placeholders and padding are ignored (``-100``)."""
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = IGNORE
    labels[labels == image_token_id] = IGNORE
    return labels


def image_text_inputs(
    processor: Any, records: list[dict[str, Any]], batch_size: int, labels: bool = False
) -> list[Inputs]:
    """The records as model-input batches (with ``labels`` for the text when asked: evaluation)."""
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    image_id = tokenizer.convert_tokens_to_ids(image_token(processor))
    batches = []
    for start in range(0, len(records), batch_size):
        batch = collate([process(processor, r) for r in records[start : start + batch_size]], pad_id)
        if labels:
            batch["labels"] = text_labels(batch, image_id)
        batches.append(batch)
    return batches


# ---------------------------------------------------------------- dual encoders (CLIP, SigLIP)


def is_image_folder(source: str) -> bool:
    """An ImageFolder tree (``ROOT/<class>/<image>``) rather than image-text data (no ``data.jsonl`` in it)."""
    path = Path(source).expanduser()
    return path.is_dir() and not (path / DATA_FILE).is_file()


def folder_records(source: str, template: str) -> tuple[list[dict[str, Any]], list[str]]:
    """An ImageFolder as image-text records, each image captioned with its class folder's name put into
    ``template`` (``"a photo of a {}."``), with its class index; and the class names in index order."""
    from .images import image_dataset

    dataset = image_dataset(source)
    records = [
        {"image": Path(path), "text": template.format(dataset.classes[label]), "label": label}
        for path, label in dataset.samples
    ]
    return records, list(dataset.classes)


def caption_records(source: str, what: str, template: str) -> list[dict[str, Any]]:
    """The image-text pairs of ``data.jsonl``, or of an ImageFolder captioned from its class names."""
    return folder_records(source, template)[0] if is_image_folder(source) else read_image_text(source, what)


def text_inputs(processor: Any, texts: list[str], max_length: int) -> Inputs:
    """Texts as a dual encoder's text tower reads them: padded (and cut) to ``max_length`` tokens, as CLIP and SigLIP
    were trained (SigLIP pools the last position, CLIP the first end-of-text token)."""
    tokens = processor(text=texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return {k: v for k, v in tokens.items() if k in ("input_ids", "attention_mask")}


def pair_inputs(processor: Any, records: list[dict[str, Any]], batch_size: int, max_length: int) -> list[Inputs]:
    """Images with their captions as dual-encoder batches (``input_ids``, ``pixel_values``, ...), in order."""
    batches = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        pixels = processor(images=[read_image(str(r["image"])) for r in chunk], return_tensors="pt")["pixel_values"]
        batches.append({**text_inputs(processor, [r["text"] for r in chunk], max_length), "pixel_values": pixels})
    return batches
