"""The "torch" backend: every op composed from well-kept PyTorch ops. Supports every valid call."""
