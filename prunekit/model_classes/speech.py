"""Speech models: calibrated on audio files (``prunekit.data.audio``: a ``data.jsonl`` of audio paths and
transcripts, or a folder of ``.wav`` files with ``.txt`` transcripts) through the checkpoint's feature extractor.

* ``speech-seq2seq``: speech encoder-decoders (Whisper, ...); the encoder reads the sound, the decoder its
  transcript; decoder perplexity on the transcripts (``decoder_ppl``).
* ``audio-encoder``: bare audio encoders (wav2vec 2.0, HuBERT, WavLM, ...); cosine of each clip's mean embedding to
  the dense model's (``embedding_cosine``); transcripts are not needed.
"""

from __future__ import annotations

from typing import Any

from .base import Job, ModelClass, Prepared
from .text import labeled_ppl
from .vision import image_embedding_score

AUDIO = "audio folder (data.jsonl of .wav paths and transcripts, or .wav files with .txt transcripts)"


def speech_processor(source: str, trust_remote_code: bool) -> Any:
    from ..io.hf import load_processor

    return load_processor(source, trust_remote_code, needs=("feature_extractor", "tokenizer"), what="speech models")


def feature_extractor(source: str, trust_remote_code: bool) -> Any:
    from ..io.hf import load_processor

    return load_processor(source, trust_remote_code, needs=("feature_extractor",), what="audio encoders")


def decoder_limit(config: Any) -> int:
    """The most transcript tokens the decoder takes (Whisper: 448 positions, one for the start token)."""
    return int(getattr(config, "max_target_positions", 448)) - 1


def _speech_batches(job: Job, records: list, batch_size: int, what: str, labels: bool) -> list:
    from ..data.audio import speech_inputs
    from ..data.inputs import decoder_start_id

    start = decoder_start_id(job.config)
    return speech_inputs(job.preprocessor, records, batch_size, start, decoder_limit(job.config), what, labels)


def speech_clips(job: Job) -> list:
    from ..data.audio import read_audio
    from ..data.image_text import sample_records

    r = job.recipe
    records = sample_records(read_audio(r.calib_data, "--calib-data"), r.nsamples, r.seed)
    return _speech_batches(job, records, r.batch_size, "--calib-data", labels=False)


def speech_data(job: Job) -> Prepared:
    from ..data.audio import read_audio

    r = job.recipe
    records = read_audio(r.eval_data, "--eval-data")
    return Prepared("speech-seq2seq", _speech_batches(job, records, r.eval_batch_size, "--eval-data", labels=True))


def audio_clips(job: Job) -> list:
    from ..data.audio import audio_inputs, read_audio
    from ..data.image_text import sample_records

    r = job.recipe
    records = sample_records(read_audio(r.calib_data, "--calib-data", transcripts=False), r.nsamples, r.seed)
    return audio_inputs(job.preprocessor, records, r.batch_size, "--calib-data")


def audio_data(job: Job) -> Prepared:
    from ..data.audio import audio_inputs, read_audio

    r = job.recipe
    records = read_audio(r.eval_data, "--eval-data", transcripts=False)
    return Prepared("audio-encoder", audio_inputs(job.preprocessor, records, r.eval_batch_size, "--eval-data"))


ROWS = (
    ModelClass(
        "speech-seq2seq",
        "speech encoder-decoders: Whisper, ...",
        f"{AUDIO}: the encoder reads the sound, the decoder its transcript",
        "decoder perplexity on the transcripts (decoder_ppl)",
        rank=25,
        calibration=speech_clips,
        prepare=speech_data,
        score=labeled_ppl("decoder_ppl", shift=False),
        preprocessor=speech_processor,
        auto_class="AutoModelForSpeechSeq2Seq",
        mapping="MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
        inputs=("input_features", "input_values"),
    ),
    ModelClass(
        "audio-encoder",
        "bare audio encoders: wav2vec 2.0, HuBERT, WavLM, ...",
        f"{AUDIO}; transcripts optional",
        "cosine of each clip's mean embedding to the dense model's (embedding_cosine)",
        rank=95,
        calibration=audio_clips,
        prepare=audio_data,
        score=image_embedding_score,
        preprocessor=feature_extractor,
        auto_class="AutoModel",
        mapping="MODEL_MAPPING_NAMES",
        inputs=("input_values", "input_features"),
    ),
)
