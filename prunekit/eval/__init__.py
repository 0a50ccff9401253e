"""Evaluation: perplexity, zero-shot (lm-eval), image classification."""

from .perplexity import perplexity, token_windows

__all__ = ["perplexity", "token_windows"]
