"""Calibration and evaluation data."""

from .calib import calibration_batches
from .text import load_text, random_windows, tokenize

__all__ = ["calibration_batches", "load_text", "random_windows", "tokenize"]
