"""Subcommands of `lsp-jax` (see lsp_jax/cli.py)."""
