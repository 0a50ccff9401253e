"""Sound for speech models, in two small local formats (nothing is downloaded, nothing but the standard library
reads the files):

    DATA/data.jsonl       one JSON object a line: {"audio": "clips/0001.wav", "text": "In the beginning ..."}
    DATA/*.wav            or a folder of .wav files, each with its transcript in a .txt file of the same name

``--calib-data`` / ``--eval-data`` name the folder (or the ``.jsonl`` file). Files are PCM ``.wav`` (8, 16, 24 or
32 bit, any number of channels, mixed down to one) at the sampling rate of the checkpoint's feature extractor (16
kHz for Whisper and wav2vec 2.0; resample others first, e.g. ``ffmpeg -i in.wav -ar 16000 out.wav``). The feature
extractor turns them into the model's inputs (Whisper's log-mel features, wav2vec 2.0's normalised waveform); a
speech encoder-decoder's decoder reads the transcript. Everything is read and checked before the weights load.
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import PrunekitError
from .inputs import IGNORE, Inputs, shift_right
from .jsonl import read_jsonl
from .text import read_utf8

DATA_FILE = "data.jsonl"
FORMAT = (
    f'a folder with {DATA_FILE} lines {{"audio": "relative/path.wav", "text": "transcript"}}, or a folder of .wav '
    "files with .txt transcripts of the same names"
)


def read_audio(source: str, what: str, transcripts: bool = True) -> list[dict[str, Any]]:
    """The records of ``source``: ``{"audio": Path, "text": str | None}``; a missing file or (when ``transcripts``
    are needed) transcript fails naming it."""
    path = Path(source).expanduser()
    if path.is_dir() and not (path / DATA_FILE).is_file():
        return _wav_folder(path, what, transcripts)
    data = path / DATA_FILE if path.is_dir() else path
    if not data.is_file() or data.suffix.lower() != ".jsonl":
        raise PrunekitError(f"{what} {source!r} is not audio data; speech models take {FORMAT}")
    records = read_jsonl(data, {"audio": str, "text": str} if transcripts else {"audio": str}, what)
    for number, record in enumerate(records, start=1):
        record["audio"] = data.parent / record["audio"]
        if not record["audio"].is_file():
            raise PrunekitError(f"{what} {str(data)!r} record {number}: audio {str(record['audio'])!r} does not exist")
    return [{"audio": r["audio"], "text": r.get("text")} for r in records]


def _wav_folder(folder: Path, what: str, transcripts: bool) -> list[dict[str, Any]]:
    files = sorted(folder.glob("*.wav"))
    if not files:
        raise PrunekitError(
            f"{what} {str(folder)!r} holds no .wav files and no {DATA_FILE}; speech models take {FORMAT}"
        )
    records = []
    for file in files:
        text_file = file.with_suffix(".txt")
        if transcripts and not text_file.is_file():
            raise PrunekitError(f"{what} {str(file)!r} has no transcript {text_file.name!r} beside it")
        text = read_utf8(text_file, what).strip() if text_file.is_file() else None
        records.append({"audio": file, "text": text})
    return records


def read_wav(path: Path, rate: int, what: str) -> np.ndarray:
    """The samples of a PCM ``.wav`` file as float32 in [-1, 1], channels mixed down to one; its sampling rate must
    be ``rate``."""
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, found, frames = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.readframes(-1)
    except (wave.Error, EOFError) as err:
        raise PrunekitError(
            f"{what} {str(path)!r} is not a PCM .wav file ({err}); convert it, e.g. with ffmpeg"
        ) from None
    if found != rate:
        raise PrunekitError(
            f"{what} {str(path)!r} is sampled at {found} Hz but the model's feature extractor takes {rate} Hz; "
            f"resample it (ffmpeg -i IN.wav -ar {rate} OUT.wav)"
        )
    return _samples(frames, width).reshape(-1, channels).mean(axis=1).astype(np.float32)


def _samples(frames: bytes, width: int) -> np.ndarray:
    """PCM bytes as floats in [-1, 1]: 8-bit is unsigned, wider little-endian signed (24-bit widened to 32)."""
    if width == 1:
        return (np.frombuffer(frames, np.uint8).astype(np.float32) - 128) / 128
    if width == 3:
        raw = np.frombuffer(frames, np.uint8).reshape(-1, 3)
        frames, width = np.pad(raw, ((0, 0), (1, 0))).tobytes(), 4  # the low byte zero: 24 bits in 32
    kind = {2: np.int16, 4: np.int32}.get(width)
    if kind is None:
        raise PrunekitError(f".wav samples of {width} bytes are not PCM prunekit reads (8, 16, 24, 32 bit)")
    return np.frombuffer(frames, kind).astype(np.float32) / float(np.iinfo(kind).max + 1)


def waveforms(records: list[dict[str, Any]], extractor: Any, what: str) -> list[np.ndarray]:
    return [read_wav(r["audio"], extractor.sampling_rate, what) for r in records]


def transcript_ids(tokenizer: Any, text: str, start: int, limit: int) -> list[int]:
    """A transcript as decoder targets: the tokenizer's ids (Whisper's begin with its task tokens) without a leading
    decoder start token (the decoder is fed it), at most ``limit``."""
    ids = tokenizer(text).input_ids
    return (ids[1:] if ids and ids[0] == start else ids)[:limit]


def targets(sequences: list[list[int]], start: int, pad_id: int) -> Inputs:
    """Transcripts of any length as ``labels`` (padding ignored), the decoder inputs (shifted right behind the start
    token) and the decoder's attention mask."""
    longest = max(len(s) for s in sequences)
    labels = torch.full((len(sequences), longest), IGNORE, dtype=torch.long)
    for row, ids in enumerate(sequences):
        labels[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    inputs = shift_right(labels.masked_fill(labels == IGNORE, pad_id), start)
    mask = torch.cat([torch.ones_like(labels[:, :1]), (labels[:, :-1] != IGNORE).long()], dim=1)
    return {"decoder_input_ids": inputs, "decoder_attention_mask": mask, "labels": labels}


def speech_inputs(
    processor: Any, records: list[dict[str, Any]], batch_size: int, start: int, limit: int, what: str, labels: bool
) -> list[Inputs]:
    """Records as speech encoder-decoder batches: the feature extractor's features, the transcript as the decoder's
    input (and ``labels`` for its perplexity when asked)."""
    extractor, tokenizer = processor.feature_extractor, processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    batches = []
    for first in range(0, len(records), batch_size):
        chunk = records[first : first + batch_size]
        features = extractor(
            waveforms(chunk, extractor, what), sampling_rate=extractor.sampling_rate, return_tensors="pt"
        )
        text = targets([transcript_ids(tokenizer, r["text"], start, limit) for r in chunk], start, pad)
        batch = {**dict(features), **text}
        if not labels:
            batch.pop("labels")
        batches.append(batch)
    return batches


def audio_inputs(extractor: Any, records: list[dict[str, Any]], batch_size: int, what: str) -> list[Inputs]:
    """Records as an audio encoder's batches (the feature extractor's output, waveforms padded to the longest)."""
    extractor = getattr(extractor, "feature_extractor", extractor)
    batches = []
    for first in range(0, len(records), batch_size):
        sounds = waveforms(records[first : first + batch_size], extractor, what)
        batches.append(
            dict(extractor(sounds, sampling_rate=extractor.sampling_rate, padding=True, return_tensors="pt"))
        )
    return batches
