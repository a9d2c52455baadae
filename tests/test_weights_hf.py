"""Hugging Face checkpoints in and out: parity with transformers, exact round trips, errors."""

import copy
import functools
import json
import shutil
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from lsp_jax.errors import UserError
from lsp_jax.model import Llama, sequence_scores
from lsp_jax.weights import hf as hf_module
from lsp_jax.weights import (
    hf_state_from_params,
    load_hf,
    params_from_hf_state,
    save_hf,
    stack_layers,
)

LENGTH = 40  # Longer than the original RoPE context (32) of the tiny models.


@pytest.fixture(scope="module")
def hf():
    """The test-only helpers (importing them imports torch and transformers)."""
    import hf_models

    return hf_models


@functools.cache
def _forward(config):
    def forward(params, tokens_BT, mask_BT):
        return Llama(config).apply({"params": params}, tokens_BT, mask_BT=mask_BT)

    return jax.jit(forward)


def ours(config, params, tokens_BT, mask_BT=None):
    if mask_BT is None:
        mask_BT = np.ones(tokens_BT.shape, bool)
    return np.asarray(_forward(config)(params, tokens_BT, mask_BT))


def left_padded(tokens_BT, lengths, pad_id=0):
    mask_BT = (
        np.arange(tokens_BT.shape[1])[None, :] >= (tokens_BT.shape[1] - np.array(lengths))[:, None]
    )
    return np.where(mask_BT, tokens_BT, pad_id), mask_BT


def right_padded(tokens_BT, lengths, pad_id=0):
    mask_BT = np.arange(tokens_BT.shape[1])[None, :] < np.array(lengths)[:, None]
    return np.where(mask_BT, tokens_BT, pad_id), mask_BT


@pytest.fixture(scope="module")
def tokens_BT():
    # Ids from 3 up: no pad (0), bos (1) or eos (2), so padding is unambiguous.
    return np.random.default_rng(0).integers(3, 96, size=(3, LENGTH))


@pytest.fixture(scope="module")
def untied(hf, tmp_path_factory):
    """A sharded untied LlamaForCausalLM folder written by transformers."""
    model = hf.causal_lm(seed=0)
    folder = tmp_path_factory.mktemp("untied")
    model.save_pretrained(folder, max_shard_size="100KB")
    return model, folder


@pytest.fixture(scope="module")
def tied(hf, tmp_path_factory):
    """A single-file tied LlamaForCausalLM folder written by transformers."""
    model = hf.causal_lm(seed=1, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tied")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def reward(hf, tmp_path_factory):
    model = hf.classifier(seed=2)
    folder = tmp_path_factory.mktemp("reward")
    model.save_pretrained(folder)
    return model, folder


def test_fixture_layouts(untied, tied):
    assert (untied[1] / "model.safetensors.index.json").is_file()
    assert len(list(untied[1].glob("model-*.safetensors"))) > 1
    assert (tied[1] / "model.safetensors").is_file()


def test_rope_frequencies_cover_all_llama3_bands(untied):
    model, folder = untied
    config, _ = load_hf(folder)
    head_dim, theta, scaling = config.head_dim, config.rope_theta, config.rope_scaling
    wavelengths = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    high_band = scaling.original_max_position / scaling.high_freq_factor
    low_band = scaling.original_max_position / scaling.low_freq_factor
    assert np.any(wavelengths < high_band)
    assert np.any((wavelengths >= high_band) & (wavelengths <= low_band))
    assert np.any(wavelengths > low_band)
    assert LENGTH > scaling.original_max_position
    np.testing.assert_allclose(
        config.rope_inv_freq(), model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6
    )


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_logits_match_transformers(which, request, hf, tokens_BT):
    model, folder = request.getfixturevalue(which)
    config, params = load_hf(folder)
    assert config.tie_embeddings == (which == "tied")
    assert config.num_kv_heads < config.num_heads
    np.testing.assert_allclose(
        ours(config, params, tokens_BT), hf.hf_forward(model, tokens_BT), atol=1e-4, rtol=0
    )
    padded_BT, mask_BT = left_padded(tokens_BT, [LENGTH, 23, 5])
    got = ours(config, params, padded_BT, mask_BT)
    want = hf.hf_forward(model, padded_BT, mask_BT)
    np.testing.assert_allclose(got[mask_BT], want[mask_BT], atol=1e-4, rtol=0)


def test_bf16_checkpoint_loads_exactly(hf, tied, tmp_path):
    import torch

    model = copy.deepcopy(tied[0]).to(torch.bfloat16)  # The fixture is shared: copy it.
    model.save_pretrained(tmp_path)
    want = {k: v.float().numpy() for k, v in model.state_dict().items()}
    want.pop("lm_head.weight")  # Tied: the same tensor as the embedding.
    config, params = load_hf(tmp_path)
    got = hf_state_from_params(config, params)
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    config, params = load_hf(tmp_path, param_dtype=jnp.bfloat16)
    assert params["embed"]["embedding"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        params["embed"]["embedding"].astype(np.float32), want["model.embed_tokens.weight"]
    )
    out = save_hf(tmp_path / "export", config, params)
    with safe_open(tmp_path / "model.safetensors", framework="np") as a:  # Same bf16 bytes.
        with safe_open(out / "model.safetensors", framework="np") as b:
            assert sorted(a.keys()) == sorted(b.keys())  # noqa: SIM118
            for name in a.keys():  # noqa: SIM118
                assert a.get_tensor(name).dtype == b.get_tensor(name).dtype
                assert a.get_tensor(name).tobytes() == b.get_tensor(name).tobytes()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_reward_scores_match_transformers(hf, reward, tokens_BT):
    model, folder = reward
    config, params = load_hf(folder)
    assert config.is_classifier and config.pad_token_id == 0
    for pad in (left_padded, right_padded):
        padded_BT, mask_BT = pad(tokens_BT, [LENGTH, 17, 4])
        scores_BTC = _forward(config)(params, padded_BT, mask_BT)
        got_BC = np.asarray(sequence_scores(scores_BTC, mask_BT))
        want_BC = hf.hf_forward(model, padded_BT, mask_BT)
        assert got_BC.shape == want_BC.shape == (3, 1)
        np.testing.assert_allclose(got_BC, want_BC, atol=1e-4, rtol=0, err_msg=pad.__name__)


def _tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_export_loads_in_transformers(which, request, hf, tokens_BT, tmp_path):
    model, folder = request.getfixturevalue(which)
    config, params = load_hf(folder)
    out = save_hf(tmp_path / "export", config, params)
    exported = hf.load_transformers(out)
    want = hf.hf_forward(model, tokens_BT)
    np.testing.assert_allclose(hf.hf_forward(exported, tokens_BT), want, atol=1e-5, rtol=0)
    with safe_open(out / "model.safetensors", framework="np") as handle:
        assert ("lm_head.weight" in handle.keys()) == (which == "untied")  # noqa: SIM118
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2}
    config_back, params_back = load_hf(out)
    assert config_back == config
    _tree_equal(params_back, params)


def test_export_of_reward_model_loads_in_transformers(hf, reward, tokens_BT, tmp_path):
    import transformers

    model, folder = reward
    config, params = load_hf(folder)
    out = save_hf(tmp_path / "rm", config, params)
    exported = hf.load_transformers(out, transformers.AutoModelForSequenceClassification)
    padded_BT, mask_BT = right_padded(tokens_BT, [LENGTH, 9, 30])
    np.testing.assert_allclose(
        hf.hf_forward(exported, padded_BT, mask_BT),
        hf.hf_forward(model, padded_BT, mask_BT),
        atol=1e-5,
        rtol=0,
    )


def test_scanned_and_unscanned_exports_are_identical(untied, tmp_path):
    _, folder = untied
    config, params = load_hf(folder)
    scanned_config, scanned = load_hf(folder, scan_layers=True)
    assert scanned_config.scan_layers and set(scanned) >= {"layers"}
    assert scanned["layers"]["attn"]["q"].shape == (config.num_layers, 64, 4, 16)
    _tree_equal(stack_layers(params), scanned)
    a = save_hf(tmp_path / "a", config, params, max_shard_bytes=100_000)
    b = save_hf(tmp_path / "b", scanned_config, scanned, max_shard_bytes=100_000)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    _tree_equal(load_hf(b, scan_layers=True)[1], scanned)


def test_sharded_export_index(hf, untied, tokens_BT, tmp_path):
    model, folder = untied
    config, params = load_hf(folder)
    out = save_hf(tmp_path / "sharded", config, params, max_shard_bytes=60_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in state.values())
    for shard in shards:
        with safe_open(shard, framework="np") as handle:
            names = set(handle.keys())  # noqa: SIM118
            size = sum(handle.get_tensor(n).nbytes for n in names)
        assert names == {n for n, f in index["weight_map"].items() if f == shard.name}
        assert size <= 60_000 or len(names) == 1
    exported = hf.load_transformers(out)
    np.testing.assert_allclose(
        hf.hf_forward(exported, tokens_BT), hf.hf_forward(model, tokens_BT), atol=1e-5, rtol=0
    )
    _tree_equal(load_hf(out)[1], params)


def test_save_hf_into_an_existing_empty_folder(tmp_path, untied):
    _, folder = untied
    config, params = load_hf(folder)
    (tmp_path / "out").mkdir()
    out = save_hf(tmp_path / "out", config, params)
    _tree_equal(load_hf(out)[1], params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_is_atomic(untied, tmp_path, monkeypatch):
    _, folder = untied
    config, params = load_hf(folder)
    calls = []

    write = hf_module._write_safetensors

    def failing_write(path, exports):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # As if interrupted while writing the second shard.
        return write(path, exports)

    monkeypatch.setattr(hf_module, "_write_safetensors", failing_write)
    with pytest.raises(KeyboardInterrupt):
        save_hf(tmp_path / "out", config, params, max_shard_bytes=100_000)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # No final folder, no partial leftovers.
    monkeypatch.undo()
    out = save_hf(tmp_path / "out", config, params)
    with pytest.raises(UserError, match="already exists"):
        save_hf(out, config, params)
    (out / "stale.txt").write_text("from an older export")
    save_hf(out, config, params, overwrite=True, extra_files=[folder / "config.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (out / "stale.txt").exists()
    _tree_equal(load_hf(out)[1], params)


def test_reads_each_tensor_once_from_a_lazy_mapping(untied):
    _, folder = untied
    config, params = load_hf(folder)
    state = hf_state_from_params(config, params)
    reads = []

    class Lazy(Mapping):
        def __getitem__(self, name):
            reads.append(name)
            return state[name]

        def __iter__(self):
            return iter(state)

        def __len__(self):
            return len(state)

    for scan in (False, True):
        reads.clear()
        got = params_from_hf_state(config, Lazy(), scan_layers=scan)
        assert sorted(reads) == sorted(state)
        _tree_equal(got, stack_layers(params) if scan else params)


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_shape_mismatch_names_tensor_and_shapes(tied, tmp_path):
    folder = _copy(tied[1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 80
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as error:
        load_hf(folder)
    message = str(error.value)
    assert "model.layers.0.mlp.gate_proj.weight" in message
    assert "(80, 64)" in message and "(96, 64)" in message


def test_missing_tensor_is_named(tied, tmp_path):
    folder = _copy(tied[1], tmp_path)
    name = "model.layers.1.self_attn.v_proj.weight"
    with safe_open(folder / "model.safetensors", framework="np") as handle:
        state = {n: handle.get_tensor(n) for n in handle.keys() if n != name}  # noqa: SIM118
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError) as error:
        load_hf(folder)
    message = str(error.value)
    assert name in message and "missing" in message and "(32, 64)" in message


def test_unexpected_tensor_is_named(tied, tmp_path):
    folder = _copy(tied[1], tmp_path)
    with safe_open(folder / "model.safetensors", framework="np") as handle:
        state = {n: handle.get_tensor(n) for n in handle.keys()}  # noqa: SIM118
    state["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="q_proj.bias"):
        load_hf(folder)


def test_missing_folder_and_files_are_explained(tied, tmp_path):
    with pytest.raises(UserError, match="does not exist.*config.json"):
        load_hf(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no config.json"):
        load_hf(tmp_path)
    shutil.copy(tied[1] / "config.json", tmp_path / "config.json")
    with pytest.raises(UserError, match="No safetensors weights.*model.safetensors"):
        load_hf(tmp_path)


def test_stop_tokens_merge_generation_config(tied, tmp_path):
    folder = _copy(tied[1], tmp_path)
    generation = {"bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": 5}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    config, _ = load_hf(folder)
    assert config.eos_token_ids == (2, 7) and config.pad_token_id == 5
    out = save_hf(tmp_path / "out", config, load_hf(folder)[1])
    assert json.loads((out / "generation_config.json").read_text()) == generation


def test_streamed_safetensors_file_reads_back_with_safetensors(tmp_path):
    # The export writes safetensors files a tensor at a time (hf._write_safetensors);
    # safetensors' own reader must see the same names, dtypes, shapes and values.
    import ml_dtypes
    from safetensors.numpy import load_file

    from lsp_jax.weights.layout import HfExport

    rng = np.random.default_rng(0)
    arrays = {
        "a.weight": rng.normal(size=(3, 5)).astype(np.float32),
        "b.weight": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
        "c.weight": rng.normal(size=(2, 3, 1)).astype(np.float16),
    }
    exports = [HfExport(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()]
    hf_module._write_safetensors(tmp_path / "x.safetensors", exports)
    back = load_file(tmp_path / "x.safetensors")
    assert sorted(back) == sorted(arrays)
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)
