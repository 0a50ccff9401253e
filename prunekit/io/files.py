"""Checks on the weight files we read, so that a broken file is one line naming it (not a Rust or pickle
traceback): safetensors headers and sizes, shard indexes, and torch pickles loaded weights-only."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch

from ..errors import PrunekitError

_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def _broken(file: Path, why: str) -> PrunekitError:
    return PrunekitError(f"checkpoint file {str(file)!r} is truncated or corrupt ({why}); re-download or re-save it")


def safetensors_header(file: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file, after checking that the file holds every byte it promises.

    Reads only the header, so checking a 70B checkpoint costs milliseconds."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > min(size - 8, _MAX_HEADER):
            raise _broken(file, f"{size} bytes, too short for the header it announces")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError):
            raise _broken(file, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _broken(file, "its header is not a table of tensors")
    end = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise _broken(file, f"{size} bytes, its tensors need {8 + length + end}")
    return header


def check_safetensors_dir(folder: str | os.PathLike) -> None:
    """Every ``*.safetensors`` file in a checkpoint directory is whole, and every shard an index names exists."""
    folder = Path(folder)
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError):
            raise _broken(index, "not a shard index with a weight_map") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise PrunekitError(
                f"checkpoint {str(folder)!r} lacks {missing[0]}"
                f"{f' and {len(missing) - 1} more shards' if len(missing) > 1 else ''} named in "
                f"{index.name}; re-download the checkpoint"
            )
    for file in sorted(folder.glob("*.safetensors")):
        safetensors_header(file)


def safetensors_shapes(folder: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (file name, shape)}`` over a checkpoint directory's safetensors files."""
    shapes = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        for name, info in safetensors_header(file).items():
            if name != "__metadata__":
                shapes[name] = (file.name, tuple(info["shape"]))
    return shapes


def load_weights_file(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file loaded weights-only (a pickle that would run
    code is refused, never executed)."""
    file = Path(file)
    if not file.is_file():
        raise PrunekitError(f"weights file {str(file)!r} does not exist; give a .pth/.pt/.safetensors state dict")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        safetensors_header(file)
        return load_file(str(file))
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise PrunekitError(
            f"weights file {str(file)!r} is not weights-only loadable (it pickles other objects, "
            "which prunekit never unpickles); re-save it as torch.save(model.state_dict(), path) "
            f"or as .safetensors ({str(err).splitlines()[0][:120]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise _broken(file, str(err).splitlines()[0][:160]) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PrunekitError(
            f"weights file {str(file)!r} holds a {type(state).__name__}, not a state dict of "
            "tensors; re-save it as torch.save(model.state_dict(), path)"
        )
    return state
