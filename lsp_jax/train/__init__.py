"""Training: experiment configs, the one-program self-play step, the host loop."""
