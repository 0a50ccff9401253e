"""Progress where no terminal is attached: plain lines with an ETA, no escape codes (issue 28 item 16)."""

from __future__ import annotations

import logging

from prunekit import progress


def test_a_log_gets_plain_lines_with_an_eta_and_no_escape_codes(monkeypatch, caplog):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(progress, "_terminal", lambda: False)
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.0)
    with caplog.at_level(logging.INFO, logger="prunekit.progress"):
        assert list(progress.progress(range(4), "pruning model.layers", unit="block")) == [0, 1, 2, 3]
        assert list(progress.progress(range(3), "statistics", unit="step", inner=True)) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("pruning model.layers: 1/4 blocks, 0:00 elapsed, ETA ")
    assert lines[3] == "pruning model.layers: 4/4 blocks, 0:00 elapsed"
    assert len(lines) == 4  # an inner loop faster than a minute says nothing
    assert not any("\x1b" in line or "\r" in line for line in lines)


def test_a_terminal_gets_a_bar_and_tqdm_disable_silences_both(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(progress, "_terminal", lambda: True)
    from tqdm import tqdm

    assert isinstance(progress.progress(range(2), "x"), tqdm)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    items = range(2)
    assert progress.progress(items, "x") is items


def test_clock_and_eta():
    assert progress.clock(3725) == "1:02:05" and progress.clock(59.6) == "1:00"
    assert progress.line("perplexity", 1, 4, "batch", 30.0) == "perplexity: 1/4 batches, 0:30 elapsed, ETA 1:30"
