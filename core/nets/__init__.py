"""Networks and their files: the diffusion model and minority classifier, checkpoints, training loops."""
