"""Sharded iterations on 8 fake CPU devices equal the one-device iteration."""

import json
import os
import subprocess
import sys

import jax
import pytest

from lsp_jax import sharding
from lsp_jax.errors import UserError

MESHES = ["8x1x1", "1x8x1", "2x2x2", "1x2x4"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    script = os.path.join(os.path.dirname(__file__), "sharded_iteration.py")
    workdir = tmp_path_factory.mktemp("sharded")
    cache = jax.config.jax_compilation_cache_dir or ""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, script, str(workdir), cache],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS ") :])


def assert_same(a, b, atol=1e-5):
    for key, value in a["metrics"].items():
        assert b["metrics"][key] == pytest.approx(value, abs=atol, rel=1e-5), key
    # Every parameter element within atol of the reference run's, and the update is
    # much larger than that (so the comparison is not vacuous).
    assert b["max_param_diff"] <= atol
    assert b["max_param_change"] > 10 * atol


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_iteration_equals_one_device(results, mesh):
    assert_same(results["1x1x1"], results[mesh])


def test_parameters_are_really_sharded(results):
    # With FSDP over 8 devices the embedding table is split, not replicated.
    assert "fsdp" in results["fsdp_embedding_spec"]


def test_checkpoint_from_one_mesh_continues_identically_on_another(results):
    # Saved on (1, 8, 1); the next iteration on (2, 2, 2) equals the next on one device.
    assert_same(results["resumed_111"], results["resumed_222"])


def test_uneven_batch_is_refused_before_compiling(results):
    message = results["uneven_error"]
    assert "3·2 = 6" in message and "8" in message and "game.num_queries" in message


def test_mesh_shape_errors_name_the_sizes():
    with pytest.raises(UserError, match="covers 6 devices but 1"):
        sharding.resolve_shape((2, 3, 1), 1)
    assert sharding.resolve_shape((1, -1, 2), 8) == (1, 4, 2)
    with pytest.raises(UserError, match="at most one -1"):
        sharding.resolve_shape((-1, -1, 1), 8)


def test_multi_process_detection():
    detect = sharding.is_multi_process_environment
    assert not detect({})
    assert not detect({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1"})
    assert detect({"SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "n[1-4]"})
    assert detect({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert detect({"LSP_JAX_DISTRIBUTED": "1"}) and not detect(
        {"LSP_JAX_DISTRIBUTED": "0", "JAX_COORDINATOR_ADDRESS": "x"}
    )
