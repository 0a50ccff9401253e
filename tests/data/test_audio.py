"""Audio data for speech models: .wav files read with the standard library, their transcripts, as model inputs."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
import torch

from prunekit.cli import demo_assets
from prunekit.data.audio import read_audio, read_wav, speech_inputs, targets
from prunekit.data.inputs import IGNORE
from prunekit.errors import PrunekitError


def write_wav(path, samples: np.ndarray, rate: int = 16_000, width: int = 2, channels: int = 1) -> None:
    kinds = {1: np.uint8, 2: np.int16, 4: np.int32}
    scale = {1: 127, 2: 32767, 4: 2**31 - 1}[width]
    pcm = np.round(samples * scale) + (128 if width == 1 else 0)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(np.repeat(pcm, channels).astype(kinds[width]).tobytes())


@pytest.mark.parametrize("width", [1, 2, 4])
def test_pcm_samples_in_minus_one_to_one_and_channels_mixed(tmp_path, width):
    samples = np.array([0.0, 0.5, -0.5, 0.25])
    write_wav(tmp_path / "a.wav", samples, width=width, channels=2)
    assert read_wav(tmp_path / "a.wav", 16_000, "--calib-data") == pytest.approx(samples, abs=1 / 127)


def test_another_rate_is_one_line_naming_the_fix(tmp_path):
    write_wav(tmp_path / "a.wav", np.zeros(8), rate=44_100)
    with pytest.raises(PrunekitError, match="sampled at 44100 Hz .* takes 16000 Hz; resample it"):
        read_wav(tmp_path / "a.wav", 16_000, "--calib-data")


def test_both_formats_and_their_errors(tmp_path):
    write_wav(tmp_path / "a.wav", np.zeros(8))
    with pytest.raises(PrunekitError, match="has no transcript 'a.txt'"):
        read_audio(str(tmp_path), "--eval-data")
    assert read_audio(str(tmp_path), "--eval-data", transcripts=False)[0]["text"] is None
    (tmp_path / "a.txt").write_text("In the beginning\n")
    assert read_audio(str(tmp_path), "--eval-data")[0]["text"] == "In the beginning"
    (tmp_path / "data.jsonl").write_text(json.dumps({"audio": "missing.wav", "text": "x"}) + "\n")
    with pytest.raises(PrunekitError, match="record 1: audio .*missing.wav' does not exist"):
        read_audio(str(tmp_path), "--eval-data")
    assert len(read_audio(str(demo_assets() / "speech"), "--calib-data")) == 4  # the bundled clips


def test_transcripts_as_decoder_inputs_and_labels():
    """Padding is ignored in the labels; the decoder reads the start token, then the transcript shifted right."""
    out = targets([[5, 6, 7], [8]], start=0, pad_id=1)
    assert out["labels"].tolist() == [[5, 6, 7], [8, IGNORE, IGNORE]]
    assert out["decoder_input_ids"].tolist() == [[0, 5, 6], [0, 8, 1]]
    assert out["decoder_attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_whisper_features_from_the_bundled_clips():
    from tests import zoo

    records = read_audio(str(demo_assets() / "speech"), "--calib-data")
    batches = speech_inputs(zoo.processor("whisper"), records, 3, start=0, limit=100, what="--calib-data", labels=True)
    assert [b["input_features"].shape for b in batches] == [
        (3, zoo.MEL_BINS, zoo.MEL_FRAMES),
        (1, zoo.MEL_BINS, zoo.MEL_FRAMES),
    ]
    assert batches[0]["labels"].dtype == torch.long and (batches[0]["labels"][0] != IGNORE).sum() > 2
