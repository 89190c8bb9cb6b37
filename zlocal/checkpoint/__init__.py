"""Checkpoint files: safetensors reading and writing, manifests, model resolution and checks."""
