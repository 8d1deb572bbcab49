"""Flax NNX ports of Hugging Face model families."""
