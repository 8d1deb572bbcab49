"""zhtune: fine-tuning Chinese pretrained language models with JAX/Flax."""
