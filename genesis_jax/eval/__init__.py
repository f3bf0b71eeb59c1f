"""Evaluation: metrics, sliding-window inference and restoration/segmentation pictures."""
