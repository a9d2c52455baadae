"""lsp_jax: Language Self-Play (arXiv 2509.07414) for Llama models in JAX/Flax."""

__version__ = "0.1.0"
