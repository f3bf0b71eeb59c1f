"""Experiments built from many runs: the Scratch-vs-Genesis trials and their reports."""
