"""Training: the device step (step.py), the host loop (loop.py), pre-training and fine-tuning,
checkpoints, sharding and multi-host setup."""
