"""What is on disk: checkpoint layout, model and training checkpoints, manifests, model sources, HF conversion."""
