"""Checkpoint files: streamed reading and sharded writing of safetensors, dense or compact.

The compact sparse format stores, for each sparse floating tensor of two or more dimensions, only the
kept values plus where they were, and everything else as it is:

* ``bitmask``: the non-zero values in row-major order and a packed bitmask (1 bit per weight, most
  significant bit first, as ``numpy.packbits``);
* ``2:4``: the packed layout of 2:4 sparse kernels: ``values [rows, cols / 2]`` (two kept per four
  along the input dimension) and the two 2-bit positions of every group (4 bits per group, two
  groups per byte, the first group in the low nibble).

A weight is dropped when it equals zero, either sign: pruning by ``W * mask`` leaves ``-0.0`` where
negative weights were, and keeping those would double the file. A round trip therefore restores every
value bit for bit (NaN and inf included) except that a dropped ``-0.0`` comes back as ``+0.0``, which
compares equal (``torch.equal`` holds).

Each shard is a safetensors file whose header metadata carries a small JSON table
(``prunekit.compact``: format, shape and dtype of every tensor in that shard). Dense checkpoints are
written in the layout ``from_pretrained`` reads (``model.safetensors`` or shards plus an index).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import PrunekitError
from ..masks import packbits, unpackbits  # noqa: F401  (re-exported: the compact format's bit order)
from .atomic import claim_output, write_json

log = logging.getLogger(__name__)

DENSE_NAME, COMPACT_NAME = "model.safetensors", "model.compact.safetensors"
META_KEY = "prunekit.compact"
FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_DTYPE_NAMES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    )
}
# 2:4 is preferred when a tensor has the pattern, unless the bitmask is this much smaller (far sparser).
_PREFER_24 = 0.9


# ---------------------------------------------------------------- sizes and side files


def parse_size(size: int | str) -> int:
    """``5GB`` / ``500MB`` / ``64KiB`` / bytes -> bytes (decimal units like Hugging Face, binary with ``i``)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not match:
        raise PrunekitError(f"cannot read the size {size!r}; write it like 5GB, 500MB or 1048576")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit or " "))


def copy_side_files(source: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Copy config, generation config and tokenizer files (every top-level file that is not weights); a README
    loses the compact format's notice (``write_notice``), which only a compact output carries."""
    copied = []
    for path in sorted(Path(source).iterdir()):
        if not path.is_file() or path.name.endswith(WEIGHT_SUFFIXES + (".index.json",)):
            continue
        if path.name == NOTICE and NOTICE_END in (text := path.read_text(encoding="utf-8", errors="replace")):
            rest = text.split(NOTICE_END, 1)[1].lstrip("\n")
            if rest:
                (Path(out) / NOTICE).write_text(rest, encoding="utf-8")
                copied.append(NOTICE)
            continue
        shutil.copy2(path, Path(out) / path.name)
        copied.append(path.name)
    return copied


NOTICE, NOTICE_END = "README.md", "<!-- end of the prunekit compact notice -->"


def write_notice(out: str | os.PathLike) -> None:
    """A compact checkpoint's README says how to load it: ``from_pretrained`` looks for ``model.safetensors`` and
    fails with no hint of ``prunekit.load`` or ``prunekit convert``. A model card already there is kept below."""
    path = Path(out) / NOTICE
    card = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    if NOTICE_END in card:
        return
    notice = (
        "# prunekit compact checkpoint\n\n"
        f"The weights are in prunekit's compact sparse format (`{COMPACT_NAME}`: kept values plus a bitmask or the 2:4 "
        "packing), which `from_pretrained` does not read: it looks for `model.safetensors`. Load it with prunekit,\n\n"
        '```python\nimport prunekit\nmodel = prunekit.load("THIS_FOLDER")\n```\n\n'
        "or write a dense copy that `from_pretrained` reads:\n\n"
        "```bash\nprunekit convert THIS_FOLDER DENSE_FOLDER --to dense\n```\n"
    )
    path.write_text(f"{notice}{NOTICE_END}\n\n{card}", encoding="utf-8")


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# ---------------------------------------------------------------- reading dense checkpoints


class Checkpoint:
    """A safetensors checkpoint directory (one file or shards with an index), read a few tensors at a time.

    Files are memory-mapped by ``safe_open`` and closed after each read, so only what was asked for
    stays resident.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.weight_map = _weight_map(self.root, DENSE_NAME)

    def names(self) -> list[str]:
        return list(self.weight_map)

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Tensors by name, on CPU, cast to ``dtype`` when given (floating tensors only)."""
        out = {}
        for file, group in _by_file(self.weight_map, names).items():
            with safe_open(str(self.root / file), framework="pt") as f:
                for name in group:
                    out[name] = _cast(f.get_tensor(name), dtype)
        return out

    def load(
        self, names: Iterable[str], dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Tensors copied off the memory map now, onto ``device`` (one copy, cast included). A thread can then
        pay for the disk and the page faults ahead of time, and writing a pruned weight back is an in-place
        copy instead of a copy-on-write fault per page of the file's private mapping. The file is mapped for one
        tensor at a time: mapped pages count as resident, and a whole block of them next to its copy doubled
        the peak."""
        out = {}
        for file, group in _by_file(self.weight_map, names).items():
            for name in group:
                with safe_open(str(self.root / file), framework="pt") as f:
                    tensor = f.get_tensor(name)
                    cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                    out[name] = tensor.to(device=device, dtype=cast, copy=True)
        return out

    def nbytes(self, names: Iterable[str]) -> int:
        """Bytes of these tensors as stored (read from the headers, no tensor data touched)."""
        total = 0
        for file, group in _by_file(self.weight_map, names).items():
            with safe_open(str(self.root / file), framework="pt") as f:
                for name in group:
                    piece = f.get_slice(name)
                    total += math.prod(piece.get_shape()) * _dtype_size(piece.get_dtype())
        return total


def _weight_map(root: Path, single: str) -> dict[str, str]:
    index = root / f"{single}.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    if (root / single).exists():
        with safe_open(str(root / single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise PrunekitError(
        f"no {single} or {single}.index.json in {str(root)!r}; prunekit streams "
        "safetensors checkpoints (re-save a .bin checkpoint with save_pretrained first)"
    )


def _by_file(weight_map: Mapping[str, str], names: Iterable[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        if name not in weight_map:
            raise PrunekitError(f"tensor {name!r} is not in the checkpoint")
        groups.setdefault(weight_map[name], []).append(name)
    return groups


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _dtype_size(name: str) -> int:
    bits = re.search(r"(\d+)", name)
    return 1 if name == "BOOL" or bits is None else int(bits.group(1)) // 8


# ---------------------------------------------------------------- writing sharded checkpoints


class ShardWriter:
    """Writes tensors into numbered safetensors shards of at most ``max_shard_size`` and, at ``close``,
    names them ``model-0000k-of-0000n.safetensors`` with an index json (or ``model.safetensors`` when one
    file holds everything): the layout ``from_pretrained`` reads. ``flush`` starts a new shard, so a
    caller streaming a model one block at a time never holds more than a block."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        max_shard_size: int | str = "5GB",
        filename: str = DENSE_NAME,
        shard_metadata: Callable[[list[str]], dict[str, str]] | None = None,
    ):
        self.out_dir, self.max_bytes, self.filename = Path(out_dir), parse_size(max_shard_size), filename
        self.shard_metadata = shard_metadata or (lambda names: {})
        self.pending: dict[str, torch.Tensor] = {}
        self.shards: list[list[str]] = []
        self.total_bytes = self.total_numel = 0

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Add tensors that must share one shard (a compact tensor's parts), starting a new shard if full."""
        size = sum(nbytes(t) for t in tensors.values())
        if self.pending and sum(nbytes(t) for t in self.pending.values()) + size > self.max_bytes:
            self.flush()
        for name, t in tensors.items():
            self.pending[name] = _own_storage(t.detach().to("cpu").contiguous(), self.pending.values())
            self.total_bytes, self.total_numel = self.total_bytes + nbytes(t), self.total_numel + t.numel()

    def flush(self) -> None:
        if not self.pending:
            return
        metadata = {"format": "pt", **self.shard_metadata(list(self.pending))}
        save_file(self.pending, str(self._tmp_path(len(self.shards))), metadata=metadata)
        self.shards.append(list(self.pending))
        self.pending = {}

    def close(
        self, weight_names: Callable[[str], str] = lambda key: key, dest: str | os.PathLike | None = None
    ) -> dict[str, str]:
        """Final names and the index, in ``dest`` (default: where the shards were written); returns
        ``{tensor name: file}`` (keys mapped by ``weight_names``)."""
        self.flush()
        dest = Path(dest) if dest is not None else self.out_dir
        count, weight_map = len(self.shards), {}
        for k, keys in enumerate(self.shards):
            final = self.filename if count == 1 else _shard_name(self.filename, k + 1, count)
            self._tmp_path(k).rename(dest / final)
            weight_map.update({weight_names(key): final for key in keys})
        if count > 1:
            write_json(
                dest / f"{self.filename}.index.json",
                {
                    "metadata": {"total_size": self.total_bytes, "total_parameters": self.total_numel},
                    "weight_map": dict(sorted(weight_map.items())),
                },
            )
        return weight_map

    def _tmp_path(self, k: int) -> Path:
        return self.out_dir / f".shard-{k:05d}.tmp"

    def files(self) -> list[Path]:
        """The shards flushed so far, in order (under their temporary names until ``close``)."""
        return [self._tmp_path(k) for k in range(len(self.shards))]

    def state(self) -> dict:
        """What was flushed so far, as plain data: a resumed run continues with ``restore`` (``io.resume``)."""
        if self.pending:
            raise ValueError("the writer's state is taken after a flush")
        return {"shards": self.shards, "total_bytes": self.total_bytes, "total_numel": self.total_numel}

    def restore(self, state: Mapping) -> None:
        """Continue after the shards an interrupted run flushed into ``out_dir`` (``state()`` of that run)."""
        missing = [p.name for p in (self._tmp_path(k) for k in range(len(state["shards"]))) if not p.is_file()]
        if missing:
            raise PrunekitError(
                f"the interrupted run's output shards {missing} are missing from {str(self.out_dir)!r}; "
                "start again with --no-resume"
            )
        self.shards = [list(keys) for keys in state["shards"]]
        self.total_bytes, self.total_numel = int(state["total_bytes"]), int(state["total_numel"])


def _shard_name(filename: str, k: int, count: int) -> str:
    stem, dot, ext = filename.partition(".")
    return f"{stem}-{k:05d}-of-{count:05d}{dot}{ext}"


def _own_storage(tensor: torch.Tensor, others: Iterable[torch.Tensor]) -> torch.Tensor:
    """safetensors refuses two names on one storage (tied weights): give a repeat its own copy."""
    ptr = tensor.untyped_storage().data_ptr()
    if tensor.numel() and any(o.numel() and o.untyped_storage().data_ptr() == ptr for o in others):
        return tensor.clone()
    return tensor


# ---------------------------------------------------------------- sparse values


def kept(tensor: torch.Tensor) -> torch.Tensor:
    """True where a weight is stored: everything but zeros of either sign (NaN != 0, so NaN is kept)."""
    return tensor != 0


# ---------------------------------------------------------------- the two sparse encodings


def _groups_of_4(tensor: torch.Tensor) -> torch.Tensor | None:
    """``[numel / 4, 4]`` groups along the input dimension, or None when rows are not a multiple of 4."""
    cols = tensor.numel() // tensor.shape[0]
    return tensor.reshape(-1, 4) if cols % 4 == 0 else None


def is_2_4(tensor: torch.Tensor) -> bool:
    """At most 2 non-zeros in every 4 consecutive weights along the input dimension (rows of ``[out, cols]``)."""
    groups = _groups_of_4(tensor)
    return groups is not None and bool((kept(groups).sum(dim=1) <= 2).all())


def encode_bitmask(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = kept(tensor).reshape(-1)
    return {"values": tensor.reshape(-1)[mask], "mask": packbits(mask)}


def decode_bitmask(parts: Mapping[str, torch.Tensor], shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    numel = math.prod(shape)
    out = torch.zeros(numel, dtype=dtype)
    out[unpackbits(parts["mask"], numel)] = parts["values"]
    return out.reshape(shape)


def encode_2_4(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two values per group of four: the non-zeros, padded with zeros at the lowest free positions."""
    groups = _groups_of_4(tensor)
    zero_last = (~kept(groups)).to(torch.int64) * 4 + torch.arange(4)
    index = zero_last.argsort(dim=1)[:, :2].sort(dim=1).values  # [G, 2] ascending positions
    values = groups.gather(1, index).reshape(tensor.shape[0], -1)
    nibbles = (index[:, 0] | (index[:, 1] << 2)).to(torch.uint8)
    nibbles = torch.nn.functional.pad(nibbles, (0, nibbles.numel() % 2))
    return {"values": values, "index": nibbles[0::2] | (nibbles[1::2] << 4)}


def decode_2_4(parts: Mapping[str, torch.Tensor], shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    count = math.prod(shape) // 4
    nibbles = torch.stack([parts["index"] & 15, parts["index"] >> 4], dim=1).reshape(-1)[:count].to(torch.int64)
    index = torch.stack([nibbles & 3, nibbles >> 2], dim=1)
    out = torch.zeros(count, 4, dtype=dtype)
    out.scatter_(1, index, parts["values"].reshape(count, 2).to(dtype))
    return out.reshape(shape)


ENCODERS = {"bitmask": encode_bitmask, "2:4": encode_2_4}
DECODERS = {"bitmask": decode_bitmask, "2:4": decode_2_4}


def choose_format(tensor: torch.Tensor) -> str:
    """``2:4`` when the tensor has the pattern, else ``bitmask`` when that is smaller than dense, else ``dense``."""
    if not tensor.is_floating_point() or tensor.dim() < 2 or tensor.numel() == 0:
        return "dense"
    size = tensor.element_size()
    bitmask = int(kept(tensor).sum()) * size + math.ceil(tensor.numel() / 8)
    if is_2_4(tensor) and not bitmask < _PREFER_24 * (tensor.numel() * size // 2 + tensor.numel() // 8):
        return "2:4"
    return "bitmask" if bitmask < nbytes(tensor) else "dense"


def encode(name: str, tensor: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
    """One tensor -> (its JSON entry, the stored tensors keyed ``name`` or ``name:part``)."""
    tensor = tensor.detach().to("cpu").contiguous()
    fmt = choose_format(tensor)
    info = {"format": fmt, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    if fmt == "dense":
        return info, {name: tensor}
    return info, {f"{name}:{part}": t for part, t in ENCODERS[fmt](tensor).items()}


def decode(name: str, info: Mapping, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    if info["format"] == "dense":
        return read(name)
    if info["format"] not in DECODERS:
        raise PrunekitError(f"tensor {name!r} has unknown compact format {info['format']!r}; upgrade prunekit")
    parts = {part: read(f"{name}:{part}") for part in ("values", "mask", "index") if f"{name}:{part}" in info["keys"]}
    return DECODERS[info["format"]](parts, info["shape"], _DTYPE_NAMES[info["dtype"]])


# ---------------------------------------------------------------- compact files


class CompactWriter:
    """Streams tensors into compact shards (``model.compact.safetensors`` or shards plus an index)."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_size: int | str = "5GB", filename: str = COMPACT_NAME):
        self.infos: dict[str, dict] = {}
        self.owner: dict[str, str] = {}  # stored key -> tensor name
        self.shards = ShardWriter(out_dir, max_shard_size, filename, self._metadata)
        self.formats: dict[str, int] = {}

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            info, stored = encode(name, tensor)
            self.infos[name] = {**info, "keys": list(stored)}
            self.owner.update({key: name for key in stored})
            self.formats[info["format"]] = self.formats.get(info["format"], 0) + 1
            self.shards.add(stored)

    def flush(self) -> None:
        self.shards.flush()

    def close(self, dest: str | os.PathLike | None = None) -> dict[str, str]:
        return self.shards.close(lambda key: self.owner[key], dest)

    def files(self) -> list[Path]:
        return self.shards.files()

    def state(self) -> dict:
        return {"shards": self.shards.state(), "infos": self.infos, "owner": self.owner, "formats": self.formats}

    def restore(self, state: Mapping) -> None:
        self.shards.restore(state["shards"])
        self.infos, self.owner, self.formats = dict(state["infos"]), dict(state["owner"]), dict(state["formats"])

    def _metadata(self, keys: list[str]) -> dict[str, str]:
        names = dict.fromkeys(self.owner[k] for k in keys)
        return {META_KEY: json.dumps({"version": FORMAT_VERSION, "tensors": {n: self.infos[n] for n in names}})}


class CompactReader:
    """A compact checkpoint (one file or shards), decoded one tensor at a time."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        root, files = (path.parent, [path.name]) if path.is_file() else (path, _compact_files(path))
        self.root, self.infos, self.file_of = root, {}, {}
        for file in files:
            for name, info in _compact_table(root / file).items():
                self.infos[name], self.file_of[name] = info, file

    def names(self) -> list[str]:
        return list(self.infos)

    def read(self, name: str) -> torch.Tensor:
        with safe_open(str(self.root / self.file_of[name]), framework="pt") as f:
            return decode(name, self.infos[name], f.get_tensor)


def _compact_files(root: Path) -> list[str]:
    return sorted(set(_weight_map(root, COMPACT_NAME).values()))


def _compact_table(file: Path) -> dict[str, dict]:
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata() or {}
    if META_KEY not in metadata:
        raise PrunekitError(
            f"{str(file)!r} is not a prunekit compact file (no {META_KEY!r} header); "
            "load dense checkpoints with from_pretrained / safetensors"
        )
    table = json.loads(metadata[META_KEY])
    if table.get("version", 0) > FORMAT_VERSION:
        raise PrunekitError(f"{str(file)!r} uses compact format version {table['version']}; upgrade prunekit")
    return table["tensors"]


def _state_dict(obj: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return obj.state_dict() if isinstance(obj, nn.Module) else obj


def save_compact(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    max_shard_size: int | str = "5GB",
) -> dict[str, int]:
    """Write a model / state dict in the compact format: ``path`` is a directory (shards as needed) or a
    ``.safetensors`` file (one file). Returns how many tensors went into each format."""
    path = Path(path)
    one_file = path.suffix == ".safetensors"
    directory = path.parent if one_file else path
    directory.mkdir(parents=True, exist_ok=True)
    writer = CompactWriter(directory, "1000TB" if one_file else max_shard_size, path.name if one_file else COMPACT_NAME)
    writer.add(_state_dict(model_or_state_dict))
    writer.close()
    return writer.formats


def load_compact(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A compact file or directory back to an ordinary dense state dict (bit-exact)."""
    reader = CompactReader(path)
    return {name: reader.read(name) for name in reader.names()}


def is_compact(path: str | os.PathLike) -> bool:
    path = Path(path)
    if path.is_file():
        return path.name.endswith(".safetensors") and META_KEY in (_metadata(path) or {})
    return (path / COMPACT_NAME).exists() or (path / f"{COMPACT_NAME}.index.json").exists()


def _metadata(file: Path) -> dict[str, str] | None:
    with safe_open(str(file), framework="pt") as f:
        return f.metadata()


# ---------------------------------------------------------------- converting checkpoint directories


def _dense_tensors(source: Path) -> Iterator[tuple[str, torch.Tensor]]:
    checkpoint = Checkpoint(source)
    for name in checkpoint.names():
        yield name, checkpoint.read([name])[name]


def _compact_tensors(source: Path) -> Iterator[tuple[str, torch.Tensor]]:
    reader = CompactReader(source)
    for name in reader.names():
        yield name, reader.read(name)


def convert(
    source: str | os.PathLike,
    out: str | os.PathLike,
    to: str = "dense",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> dict[str, str]:
    """Convert a checkpoint directory between the dense Hugging Face layout and the compact format,
    one tensor at a time, copying config and tokenizer files. Returns ``{tensor name: file}``."""
    if to not in ("dense", "compact"):
        raise PrunekitError(f"unknown target format {to!r}; choose dense or compact")
    source = Path(source)
    with claim_output(out, {"source": source}, overwrite) as claim, claim.staging() as tmp:
        tensors = _compact_tensors(source) if is_compact(source) else _dense_tensors(source)
        writer = CompactWriter(tmp, max_shard_size) if to == "compact" else ShardWriter(tmp, max_shard_size)
        for name, tensor in tensors:
            writer.add({name: tensor})
        weight_map = writer.close()
        copy_side_files(source, tmp)
        if to == "compact":
            write_notice(tmp)
    log.info("converted %s -> %s (%s, %d tensors)", source, out, to, len(weight_map))
    return weight_map
