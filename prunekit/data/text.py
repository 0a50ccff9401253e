"""Text for calibration and perplexity: local files, a `datasets` dataset, tokenised once."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from ..errors import PrunekitError
from ..io import paths
from ..io.paths import looks_local, require_local

log = logging.getLogger(__name__)
_DATASET_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_text(source: str | os.PathLike, split: str = "train", column: str = "text", what: str = "text data") -> str:
    """The text of a ``.txt`` file, a data file / saved dataset directory, or a `datasets` hub name.

    Dataset rows are joined with blank lines (as the Wanda/SparseGPT evaluation joins WikiText).
    Paths that look local but do not exist are an error, never a silent hub download; a hub name while
    offline or with the hub unreachable fails at once, not after a minute of retries. ``what`` names the
    data in errors (``--calib-data``, ``--eval-data``).
    """
    text = str(source)
    if not looks_local(text):
        return _dataset_text(_load_hub_dataset(text, split, what), column, source)
    path = require_local(
        text,
        what,
        "give a .txt file, a data file (.json/.jsonl/.csv/.parquet), a saved dataset directory or a datasets hub name",
    )
    if path.is_file() and path.suffix.lower() not in _DATASET_SUFFIXES:
        return read_utf8(path, what)
    return _dataset_text(_load_local_dataset(path, split, what), column, source)


def read_utf8(path: Path, what: str = "text data") -> str:
    """A text file's contents; binary or non-UTF-8 files are one line naming the file and the fix."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PrunekitError(
            f"{what} {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}); convert it, "
            "e.g. iconv -f latin1 -t utf-8, or give a UTF-8 .txt file"
        ) from None
    if "\0" in text:
        raise PrunekitError(
            f"{what} {str(path)!r} is a binary file (it contains NUL bytes), not text; give a UTF-8 "
            ".txt file or a data file (.json/.jsonl/.csv/.parquet)"
        )
    return text


def _load_hub_dataset(name: str, split: str, what: str):
    """``datasets.load_dataset(name[:config])``, failing at once instead of retrying when it cannot work."""
    import datasets

    offline = paths.hub_offline(datasets=True)
    if not offline and not paths.hub_reachable():
        raise PrunekitError(
            f"{what} {name!r} is not a local file, and the Hugging Face hub cannot be reached to "
            "download it (no network?); give a local file, or set HF_DATASETS_OFFLINE=1 to use a "
            "cached copy"
        )
    dataset, _, config = name.partition(":")
    try:
        return datasets.load_dataset(dataset, config or None, split=split)
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        where = "in the datasets cache (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set)" if offline else "on the hub"
        raise PrunekitError(
            f"{what} {name!r} is neither a local file nor a dataset {where} "
            f"({_first_line(err)}); give an existing file, or check the name"
        ) from err


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _load_local_dataset(path: Path, split: str, what: str):
    import datasets

    if path.is_dir() and (path / "dataset_info.json").exists() or (path / "state.json").exists():
        ds = datasets.load_from_disk(str(path))
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise PrunekitError(
                f"{what} directory {str(path)!r} has no .txt files and is not a saved dataset; give "
                "a folder of .txt files, a saved dataset or a file"
            )
        for file in files:
            read_utf8(file, what)  # names the bad file; the datasets reader would not
        return datasets.load_dataset("text", data_files=[str(f) for f in files], split="train")
    kind = _DATASET_SUFFIXES[path.suffix.lower()]
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err
        raise PrunekitError(
            f"{what} {str(path)!r} could not be read as {kind} ({_first_line(cause)}); check that it "
            f"is valid {kind}{' in UTF-8' if kind != 'parquet' else ''}"
        ) from err


def _dataset_text(ds, column: str, source) -> str:
    if column not in ds.column_names:
        raise PrunekitError(f"dataset {str(source)!r} has no column {column!r}; its columns are {ds.column_names}")
    return "\n\n".join(ds[column])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text as one sequence (1-D LongTensor), as the papers tokenise. One tokenizer call
    (no progress to show inside it), so the log says what is happening and how long it took."""
    start = time.perf_counter()
    log.info("tokenising %.1f MB of text", len(text) / 1e6)
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    log.info("tokenised into %d tokens in %.1fs", len(ids), time.perf_counter() - start)
    return torch.tensor(ids, dtype=torch.long)


def random_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random starts: ``[nsamples, seqlen]``.

    Starts are ``torch.randint(0, n - seqlen - 1, (nsamples,))`` from ``torch.Generator().manual_seed(seed)``,
    the published protocol. The text must hold at least ``nsamples * seqlen`` tokens, so that the
    calibration set is not mostly repeats of the same tokens.
    """
    if nsamples < 1 or seqlen < 1:
        raise PrunekitError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    n = tokens.numel()
    if n < nsamples * seqlen + 2:
        raise PrunekitError(
            f"calibration text has {n} tokens, fewer than nsamples x seqlen = {nsamples} x {seqlen}"
            f" = {nsamples * seqlen}; give more text, or lower --nsamples / --seqlen"
        )
    return torch.stack([tokens[s : s + seqlen] for s in window_starts(n, nsamples, seqlen, seed).tolist()])


def window_starts(n: int, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Where ``random_windows`` starts its windows in a text of ``n`` tokens."""
    return torch.randint(0, n - seqlen - 1, (nsamples,), generator=torch.Generator().manual_seed(seed))


def heldout_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, holdout: int) -> torch.Tensor:
    """``holdout`` windows of ``seqlen`` tokens that share no token with the calibration windows
    ``random_windows(tokens, nsamples, seqlen, seed)`` draws: the text cut into consecutive windows, those the
    calibration touches dropped, ``holdout`` of the rest taken evenly spread over the text."""
    n = tokens.numel()
    used = torch.zeros(n // seqlen, dtype=torch.bool)
    for start in window_starts(n, nsamples, seqlen, seed).tolist():
        used[start // seqlen : min((start + seqlen - 1) // seqlen + 1, len(used))] = True
    free = (~used).nonzero().flatten()
    if len(free) < holdout:
        raise PrunekitError(
            f"the calibration text leaves {len(free)} windows of {seqlen} tokens that calibration does not touch, "
            f"fewer than the {holdout} held out to measure quality; give --eval-data, more text, or a lower --holdout"
        )
    chosen = free[torch.linspace(0, len(free) - 1, holdout).round().long()]
    return torch.stack([tokens[i * seqlen : (i + 1) * seqlen] for i in chosen.tolist()])
