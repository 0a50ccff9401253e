"""Make the bundled speech data: a few short spoken KJV phrases with their transcripts, synthesized offline.

Picks CLIPS clauses of at most MAX_WORDS words from ``prunekit/assets/kjv/test-small.txt`` (a seeded choice), speaks
each with ``espeak-ng`` (Debian package ``espeak-ng``; nothing is downloaded), resamples the 22,050 Hz output to 16
kHz (the rate of Whisper's and wav2vec 2.0's feature extractors) and writes, into ``prunekit/assets/speech/``, one
16-bit mono ``NNN.wav`` and its transcript ``NNN.txt`` per clip: the folder format ``prunekit.data.audio`` reads.

espeak-ng is deterministic: a rerun with the same version writes the same files.

    python benchmarks/make_speech_assets.py [--out prunekit/assets/speech]
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

ROOT = Path(__file__).resolve().parents[1]
CLIPS, MAX_WORDS, SEED = 4, 6, 0
RATE, ESPEAK_RATE = 16_000, 22_050
VOICE, WORDS_PER_MINUTE = "en-us", 170


def phrases(text: Path) -> list[str]:
    """CLIPS clauses of 3 to MAX_WORDS words (verses cut at their punctuation), chosen with SEED."""
    clauses = {c.strip() for line in text.read_text().splitlines() for c in re.split(r"[,;:.?!]", line)}
    short = sorted(c for c in clauses if 3 <= len(c.split()) <= MAX_WORDS)
    return random.Random(SEED).sample(short, CLIPS)


def speak(text: str) -> np.ndarray:
    """espeak-ng's waveform of ``text`` at 16 kHz, float in [-1, 1]."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "clip.wav"
        subprocess.run(["espeak-ng", "-v", VOICE, "-s", str(WORDS_PER_MINUTE), "-w", str(out), text], check=True)
        with wave.open(str(out), "rb") as f:
            assert f.getframerate() == ESPEAK_RATE and f.getsampwidth() == 2 and f.getnchannels() == 1
            samples = np.frombuffer(f.readframes(-1), np.int16).astype(np.float64) / 32768
    return resample_poly(samples, RATE // 50, ESPEAK_RATE // 50)  # 320 / 441


def write_wav(path: Path, samples: np.ndarray) -> None:
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(RATE)
        f.writeframes(pcm.tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "prunekit" / "assets" / "speech")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    for i, text in enumerate(phrases(ROOT / "prunekit" / "assets" / "kjv" / "test-small.txt")):
        samples = speak(text)
        write_wav(args.out / f"{i:03d}.wav", samples)
        (args.out / f"{i:03d}.txt").write_text(text + "\n")
        print(f"{i:03d}.wav  {len(samples) / RATE:.2f}s  {text}")


if __name__ == "__main__":
    main()
