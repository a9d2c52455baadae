"""LoRA adapters (model.lora): the adapted model starts as the base, only the adapters
train, the base is the reference, exports load in transformers and PEFT, resume is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from lsp_jax.model import Llama, LlamaConfig, LoraConfig, lora
from lsp_jax.train import loop
from lsp_jax.train import placement as placement_lib
from lsp_jax.train import run as run_lib
from lsp_jax.weights import sources
from tests.test_train import tiny_config

RANK = 4
LORA = {"model.lora.rank": RANK, "model.lora.alpha": 8.0, "optim.lr": 1e-2}


def tokens(batch=2, length=7, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, 500, (batch, length)))


def random_b(adapters, seed=1, scale=0.3):
    """The adapters with every B drawn at random (as after training), A kept."""
    rng = np.random.default_rng(seed)
    draw = lambda x: (scale * rng.standard_normal(x.shape)).astype(np.asarray(x).dtype)
    return {
        key: random_b(value, seed, scale)
        if isinstance(value, dict)
        else (draw(value) if key.endswith(lora.B_SUFFIX) else value)
        for key, value in adapters.items()
    }


@pytest.mark.parametrize("scan_layers", [False, True])
def test_zero_b_adapters_leave_the_logits_exactly_the_base(scan_layers):
    config = LlamaConfig.tiny(scan_layers=scan_layers)
    adapted = config.replace(lora=LoraConfig(rank=RANK, alpha=8.0))
    base = meta.unbox(Llama(config).init(jax.random.key(0), tokens())["params"])
    adapters = lora.init_adapters(adapted, seed=3)
    a_leaves = [x for path, x in _named_leaves(adapters) if path.endswith(lora.A_SUFFIX)]
    assert len(a_leaves) == 7 * (1 if scan_layers else config.num_layers)
    assert all(np.abs(a).max() > 0 for a in a_leaves)  # A random: only B keeps them equal.
    want = Llama(config).apply({"params": base}, tokens())
    got = Llama(adapted).apply({"params": lora.combine(base, adapters)}, tokens())
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # With B drawn at random the adapters do change the output.
    moved = Llama(adapted).apply({"params": lora.combine(base, random_b(adapters))}, tokens())
    assert np.abs(np.asarray(moved) - np.asarray(want)).max() > 1e-2


def _named_leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _named_leaves(value, f"{prefix}{key}/")
        else:
            yield prefix + key, value


def _leaf_bytes(tree):
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def test_one_iteration_trains_only_the_adapters_and_keeps_one_copy_of_the_base():
    config = tiny_config(**LORA, **{"eval.num_prompts": 2, "eval.max_new_tokens": 3})
    run = run_lib.build_run(config)
    assert run.frozen.ref_params is None  # The reference is the base: no second copy.
    base_before = jax.tree.map(np.array, run.frozen.base_params)
    source = sources.load_model("tiny-random")[1]
    jax.tree.map(np.testing.assert_array_equal, base_before, source)
    adapters_before = jax.tree.map(np.array, run.params)
    assert all(lora.is_adapter(p.rsplit("/", 1)[-1]) for p, _ in _named_leaves(run.params))
    mesh = run_lib.make_mesh(config)
    placement = placement_lib.plan(
        run.step_cfg, run.optimizer, run.frozen, mesh, run_lib.mesh_rules(config)
    )
    frozen = placement_lib.place_frozen(run.frozen, placement)
    state = placement_lib.place_state(run.params, run.optimizer, 0, placement)
    # The optimizer holds moments of the adapters alone (Adam: two per adapter leaf).
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert _leaf_bytes(moments) == 2 * _leaf_bytes(adapters_before)
    compiled, _ = loop.compile_step(run, placement, state, 1)
    state, metrics, _ = compiled(state, frozen)
    assert np.isfinite(metrics["loss/total"]).all() and metrics["optim/skipped"][0] == 0
    # The base (an input of the program, also the reference) is bitwise what was loaded.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen.base_params), base_before)
    trained = jax.device_get(state.params)
    assert jax.tree.structure(trained) == jax.tree.structure(adapters_before)
    for (path, new), old in zip(_named_leaves(trained), jax.tree.leaves(adapters_before)):
        if path.endswith(lora.B_SUFFIX):
            assert not np.array_equal(new, old), path  # Every B moved,
        else:  # while A's gradient, x^T (dy B^T), is zero as long as B is.
            np.testing.assert_array_equal(new, old, path)
    # The periodic evaluation plays the adapted policy against the base.
    row = loop.run_eval(config, run, state, 1, log=lambda *_: None)
    assert 0.0 <= row["eval/win_rate"] <= 100.0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A LoRA run's export (merged folder + PEFT adapter) of adapters with random B, and
    the adapted JAX model's logits."""
    run = run_lib.build_run(tiny_config(**LORA))
    adapters = random_b(run.params)
    workdir = tmp_path_factory.mktemp("lora_export")
    folder = loop.export(str(workdir), run, adapters, 1, log=lambda *_: None)
    params = lora.combine(run.frozen.base_params, adapters)
    logits = np.asarray(Llama(run.step_cfg.policy).apply({"params": params}, tokens()))
    base_logits = np.asarray(
        Llama(run.step_cfg.reference).apply({"params": run.frozen.base_params}, tokens())
    )
    assert np.abs(logits - base_logits).max() > 1e-2  # The adapters matter.
    return folder, logits


def test_merged_export_loads_in_transformers_with_the_adapted_logits(exported):
    from tests import hf_models

    folder, want = exported
    model = hf_models.load_transformers(folder)
    got = hf_models.hf_forward(model, np.array(tokens()))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_peft_adapter_loads_on_the_base_with_the_adapted_logits(exported):
    import json
    from pathlib import Path

    import peft  # The test extra.

    from tests import hf_models

    folder, want = exported
    adapter = Path(folder) / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == 8.0
    base = hf_models.load_transformers(sources.resolve("tiny-random").path)
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    loaded = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert len(loaded) == 7 * 2  # Every projection of both layers got its adapter.
    got = hf_models.hf_forward(model, np.array(tokens()))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_resume_with_lora_gives_bitwise_the_uninterrupted_run(tmp_path):
    quiet = dict(log=lambda *_: None)
    split, whole = tmp_path / "split", tmp_path / "whole"
    config = lambda steps: tiny_config(**LORA, **{"train.num_steps": steps})
    assert loop.train(config(2), str(split), **quiet) == 0
    assert loop.train(config(4), str(split), **quiet) == 0
    assert loop.train(config(4), str(whole), **quiet) == 0
    # A LoRA run as a model source: its adapters merged into the source's weights.
    a, b = sources.load_model(str(split))[1], sources.load_model(str(whole))[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    base = sources.load_model("tiny-random")[1]
    assert not np.array_equal(a["layers_0"]["attn"]["q"], base["layers_0"]["attn"]["q"])
    # The checkpoint holds adapters and their moments, less than one copy of the model
    # (full fine-tuning writes three: parameters and two moments).
    checkpoint = sum(p.stat().st_size for p in (whole / "checkpoints" / "4").rglob("*"))
    assert checkpoint < _leaf_bytes(base), (checkpoint, _leaf_bytes(base))


def test_adapters_shard_like_their_kernels_with_the_rank_replicated():
    from lsp_jax.runtime import sharding
    from lsp_jax.train import config as config_lib

    config = LlamaConfig.tiny().replace(lora=LoraConfig(rank=RANK))
    mesh = jax.sharding.AbstractMesh((1, 4, 2), ("data", "fsdp", "tensor"))
    rules = run_lib.rules_table(config_lib.default_config().mesh.rules)
    adapters = placement_lib.trained_params(config)["layers_0"]
    spec = lambda box: tuple(sharding.spec_for(box.names, box.value.shape, mesh, rules))
    attn, mlp = adapters["attn"], adapters["mlp"]
    kernels = placement_lib.boxed_params(config)["layers_0"]
    assert spec(kernels["attn"]["q"]) == ("fsdp", "tensor", None)
    assert spec(attn["q_lora_a"]) == ("fsdp", None)  # in axis as W's D, rank whole
    assert spec(attn["q_lora_b"]) == (None, "tensor", None)  # out axes as W's N, H
    assert spec(attn["o_lora_a"]) == ("tensor", None, None)
    assert spec(attn["o_lora_b"]) == (None, "fsdp")
    assert spec(mlp["down_lora_a"]) == ("tensor", None)
    assert spec(mlp["gate_lora_b"]) == (None, "tensor")


def test_bad_lora_options_give_one_clear_error(capsys):
    from tests.test_train import _fail

    code, err = _fail(capsys, "--config.model.lora.rank=4", "--config.model.lora.targets=q,lm")
    assert code == 2 and "model.lora.targets" in err and "lm" in err and "gate" in err, err
    code, err = _fail(capsys, "--config.model.lora.rank=-1")
    assert code == 2 and "model.lora.rank=-1" in err, err
    code, err = _fail(capsys, "--config.model.lora.rank=4", "--config.model.lora.alpha=0")
    assert code == 2 and "model.lora.alpha" in err and "Traceback" not in err, err
    targets = run_lib.lora_config(
        tiny_config(**{"model.lora.rank": 2, "model.lora.targets": "q_proj, v"}).model
    )
    assert targets == LoraConfig(rank=2, alpha=16.0, targets=("q", "v"))
