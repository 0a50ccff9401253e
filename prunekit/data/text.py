"""Text for calibration and perplexity: local files, a `datasets` dataset, tokenised once."""
from __future__ import annotations
from ..errors import PrunekitError

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_DATASET_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_text(source: str | os.PathLike, split: str = "train", column: str = "text") -> str:
    """The text of a ``.txt`` file, a data file / saved dataset directory, or a `datasets` hub name.

    Dataset rows are joined with blank lines (as the Wanda/SparseGPT evaluation joins WikiText).
    Paths that look local but do not exist are an error, never a silent hub download.
    """
    path = Path(os.path.expanduser(str(source)))
    if path.is_file() and path.suffix.lower() not in _DATASET_SUFFIXES:
        return path.read_text(encoding="utf-8")
    if path.exists():
        return _dataset_text(_load_local_dataset(path, split), column, source)
    if str(source).startswith((".", "/", "~")) or path.suffix:
        raise PrunekitError(f"text data {str(source)!r} does not exist; give a .txt file, a data file "
                                "(.json/.jsonl/.csv/.parquet), a saved dataset directory or a datasets hub name")
    import datasets
    name, _, config = str(source).partition(":")
    return _dataset_text(datasets.load_dataset(name, config or None, split=split), column, source)


def _load_local_dataset(path: Path, split: str):
    import datasets
    if path.is_dir() and (path / "dataset_info.json").exists() or (path / "state.json").exists():
        ds = datasets.load_from_disk(str(path))
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.txt"))
        if not files:
            raise PrunekitError(f"directory {str(path)!r} has no .txt files and is not a saved dataset")
        return datasets.load_dataset("text", data_files=files, split="train")
    return datasets.load_dataset(_DATASET_SUFFIXES[path.suffix.lower()], data_files=str(path), split="train")


def _dataset_text(ds, column: str, source) -> str:
    if column not in ds.column_names:
        raise PrunekitError(f"dataset {str(source)!r} has no column {column!r}; its columns are {ds.column_names}")
    return "\n\n".join(ds[column])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text as one sequence (1-D LongTensor), as the papers tokenise."""
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
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
        raise PrunekitError(f"calibration text has {n} tokens, fewer than nsamples x seqlen = {nsamples} x {seqlen}"
                         f" = {nsamples * seqlen}; give more text, or lower --nsamples / --seqlen")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen - 1, (nsamples,), generator=gen)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])
