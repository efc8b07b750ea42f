"""VQ-VAE tokenizer (see the tokenizer issue)."""
