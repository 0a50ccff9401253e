"""Progress of long work: a tqdm bar on a terminal; plain lines with an ETA everywhere else.

A CI log, ``nohup`` or ``2> log`` is not a terminal: there tqdm's redrawn (and nested) bars leave escape codes
and say nothing useful, while a prune of a large model takes minutes per block. There each loop logs
``desc: i/n unit, elapsed, ETA`` on the ``prunekit.progress`` logger (the CLI shows it at its default level), at
most every ``PLAIN_EVERY`` seconds for outer loops and ``PLAIN_EVERY_INNER`` for the steps inside a block.
``TQDM_DISABLE=1`` silences both.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("prunekit.progress")

PLAIN_EVERY = 10.0
PLAIN_EVERY_INNER = 60.0


def progress(items: Iterable, desc: str, total: int | None = None, unit: str = "it", inner: bool = False) -> Iterable:
    """``items``, showing progress: a bar on a terminal (an ``inner`` bar disappears when done), plain lines
    otherwise (an ``inner`` loop only when it runs long)."""
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return items
    if _terminal():
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, total=total, unit=unit, leave=not inner, mininterval=1.0)
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    return _plain(items, desc, total, unit, PLAIN_EVERY_INNER if inner else PLAIN_EVERY, final=not inner)


def _terminal() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


def _plain(items: Iterable, desc: str, total: int | None, unit: str, every: float, final: bool) -> Iterator[Any]:
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every or (final and done == total):
            log.info(line(desc, done, total, unit, now - start))
            last = now


def line(desc: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    """``pruning model.layers: 3/32 blocks, 0:41 elapsed, ETA 6:36``."""
    count = f"{done}/{total}" if total else str(done)
    text = f"{desc}: {count} {plural(unit)}, {clock(elapsed)} elapsed"
    if total and done < total:
        text += f", ETA {clock(elapsed / done * (total - done))}"
    return text


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
