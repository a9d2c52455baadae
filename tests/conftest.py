"""Shared test set-up: float32 CPU JAX, strict rank promotion, a persistent compile cache."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite's programs are small: XLA:CPU's backend optimisations cost them more compile
# time than they save at run time (measured: the tiny iteration compiles in 36 s instead
# of 67 s, and runs no slower). The older elemental emitters instead of the MLIR fusion
# emitters cut its compile's CPU time by a further third (25-26 s -> 16-18 s, idle 2-core
# machine). Subprocesses get the same flags (subprocess_xla_flags).
QUICK_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false"
)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {QUICK_COMPILE_FLAGS}".strip()


def subprocess_xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for a test's subprocess: the quick compile, and `devices` CPU devices
    (whatever device count the pytest process itself was given)."""
    count = f" --xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    return QUICK_COMPILE_FLAGS + count


import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
_CACHE = os.environ.get(
    "LSP_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lsp_jax_test_xla")
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# The files whose tests take longest (compiles of whole iterations, subprocess runs),
# longest first (seconds of a cold run on a 2-core machine: 360, 296, 266, 182, 141, 106,
# then 30-40 each). Under pytest-xdist (.ci/test: one worker per core, a file per worker,
# files handed out in this order with --no-loadscope-reorder) the longest start first and
# the short files fill the gaps, instead of one long file running alone at the end.
HEAVY_FIRST = (
    "test_train.py",
    "test_sharding.py",
    "test_learning.py",
    "test_preemption.py",
    "test_lora.py",
    "test_sampling.py",
    "test_microbatch.py",
    "test_aot.py",
    "test_step.py",
    "test_evaluate.py",
    "test_generate.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=rank)  # Stable: each file keeps its own order.
