"""Diffusion Transformer fallback (see the DiT issue)."""
