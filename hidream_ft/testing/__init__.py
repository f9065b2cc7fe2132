"""Tiny random HiDream-O1 checkpoints in the official layout, for tests and the CPU demo."""
