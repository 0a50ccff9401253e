"""Helpers for testing prunekit (and models pruned with it) without downloading anything."""
