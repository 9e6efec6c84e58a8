"""Test and demo helpers: tiny checkpoints in the published layouts."""
