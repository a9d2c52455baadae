"""GGUF loading: SmolLM2 parity with transformers, tiny files written with gguf.GGUFWriter,
llama.cpp's q/k row order, llama3 RoPE factors, and clear errors for bad files."""

import math

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smollm2
from flax.linen import meta
from gguf_files import byte_level_tokens, llama_cpp_permute, write_llama_gguf

from lsp_jax.errors import UserError
from lsp_jax.model import Llama, LlamaConfig, RopeScaling
from lsp_jax.weights import hf_state_from_params, load_gguf
from lsp_jax.weights.gguf import unpermute_rope_rows
from lsp_jax.weights.gguf_config import llama3_scaling_from_divisors
from lsp_jax.weights.gguf_tokenizer import load_gguf_tokenizer


def llama_cpp_rope_divisors(config, scaling):
    """llama.cpp's rope_freqs for llama3 scaling (its convert script's formula)."""
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim)
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    divisors = []
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            divisors.append(1.0)
        elif wavelen > low_wavelen:
            divisors.append(scaling.factor)
        else:
            smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            divisors.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return np.asarray(divisors, np.float32)


def random_model(config, seed=0):
    """Random params (norm scales near 1) and their Hugging Face tensors. Shapes come from
    jax.eval_shape: nothing is compiled."""
    init = lambda: Llama(config).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
    shapes = meta.unbox(jax.eval_shape(init)["params"])
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        mean, std = (1.0, 0.1) if path[-1].key == "scale" else (0.0, 0.05)
        return rng.normal(mean, std, shape.shape).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(leaf, shapes)
    return params, hf_state_from_params(config, params)


@pytest.fixture(scope="module")
def tiny():
    config = LlamaConfig.tiny(vocab_size=320)
    params, hf_state = random_model(config)
    return config, params, hf_state


def assert_trees_close(a, b, **tolerance):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)


# SmolLM2 from the package.


def test_smollm2_logits_match_transformers():
    model = smollm2.load()
    ids = model.prompt_ids()
    assert len(ids) >= 40
    ours = np.asarray(model.forward(jnp.asarray([ids])))
    reference = smollm2.reference_logits(smollm2.reference_model(), ids)
    assert ours.shape == reference.shape == (1, len(ids), 49152)
    assert np.abs(ours - reference).max() < 1e-3
    np.testing.assert_array_equal(ours.argmax(-1), reference.argmax(-1))


def test_smollm2_config_from_metadata():
    config = smollm2.load().config
    expected = LlamaConfig.smollm2_135m()  # Numbers from the model card.
    for field in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        assert getattr(config, field) == getattr(expected, field), field
    assert (config.mlp_dim, config.rope_theta, config.tie_embeddings) == (1536, 100_000.0, True)
    assert config.rope_scaling is None
    assert (config.bos_token_id, config.eos_token_ids, config.pad_token_id) == (1, (2,), 2)


# llama.cpp layout.


def test_unpermute_by_hand():
    # One head, head_dim 4: HF pairs rows (0, 2) and (1, 3); llama.cpp stores them
    # interleaved as rows 0, 2, 1, 3.
    hf_rows = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    llama_cpp_rows = hf_rows[[0, 2, 1, 3]]
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_rows, 1), hf_rows)


def test_unpermute_inverts_llama_cpp_permute():
    weight = np.random.default_rng(0).normal(size=(3 * 64, 576)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(weight, 3), 3), weight)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_f32_gguf_round_trip(tmp_path, tiny, tied):
    config, params, hf_state = tiny
    if tied:
        config = config.replace(tie_embeddings=True)
        params = {k: v for k, v in params.items() if k != "lm_head"}
        hf_state = {k: v for k, v in hf_state.items() if k != "lm_head.weight"}
    divisors = llama_cpp_rope_divisors(config, config.rope_scaling)
    path = write_llama_gguf(tmp_path / "tiny.gguf", config, hf_state, rope_divisors=divisors)
    loaded_config, loaded = load_gguf(path)
    assert_trees_close(loaded, params, rtol=0, atol=0)
    assert loaded_config.tie_embeddings is tied
    assert loaded_config.max_position_embeddings == config.max_position_embeddings
    assert (loaded_config.bos_token_id, loaded_config.eos_token_ids) == (256, (257, 258))
    assert loaded_config.pad_token_id == 257  # No pad in the metadata: the first stop id.
    np.testing.assert_allclose(loaded_config.rope_inv_freq(), config.rope_inv_freq(), rtol=1e-5)


@pytest.mark.parametrize(
    "qtype, tolerance",
    [
        (gguf.GGMLQuantizationType.F16, 1e-3),
        (gguf.GGMLQuantizationType.BF16, 1e-2),
        (gguf.GGMLQuantizationType.Q8_0, 2e-2),
    ],
)
def test_quantized_gguf_close_to_float(tmp_path, tiny, qtype, tolerance):
    config, params, hf_state = tiny
    path = write_llama_gguf(tmp_path / "q.gguf", config, hf_state, qtype=qtype)
    _, loaded = load_gguf(path, scan_layers=True)
    scanned_layers = jax.tree.map(
        lambda *xs: np.stack(xs), *[params[f"layers_{i}"] for i in range(config.num_layers)]
    )
    expected = {k: v for k, v in params.items() if not k.startswith("layers_")}
    expected["layers"] = scanned_layers
    # Quantization error is relative to each block's largest value (weights ~N(0, 0.02..1)).
    assert_trees_close(loaded, expected, rtol=tolerance, atol=tolerance * 0.1)


def test_llama3_rope_scaling_recovered_from_rope_freqs():
    config = LlamaConfig.llama3_2_1b()
    divisors = llama_cpp_rope_divisors(config, config.rope_scaling)
    assert llama3_scaling_from_divisors(divisors, config) == RopeScaling(32.0, 1.0, 4.0, 8192)
    plain = np.ones(config.head_dim // 2, np.float32)
    assert llama3_scaling_from_divisors(plain, config) is None


def test_gguf_tokenizer_stop_ids_from_metadata(tmp_path, tiny):
    config, _, hf_state = tiny
    path = write_llama_gguf(tmp_path / "tok.gguf", config, hf_state)
    tokenizer = load_gguf_tokenizer(path)
    assert tokenizer.eos_ids == (257, 258)  # eos and eot.
    assert (tokenizer.bos_id, tokenizer.pad_id, tokenizer.vocab_size) == (256, 257, 320)
    byte_of = {symbol: i for i, symbol in enumerate(byte_level_tokens(320)[0][:256])}
    assert tokenizer.encode("hi<|eot|>") == [byte_of["h"], byte_of["i"], 258]
    assert tokenizer.decode(tokenizer.encode("héllo <|end|>")) == "héllo <|end|>"


# Errors.


def test_non_llama_architecture_is_named(tmp_path, tiny):
    config, _, hf_state = tiny
    path = write_llama_gguf(tmp_path / "other.gguf", config, hf_state, arch="mamba")
    with pytest.raises(UserError, match=r"holds a 'mamba' model; .* architectures llama only"):
        load_gguf(path)


def test_unsupported_tensor_type_is_named(tmp_path, tiny):
    config, _, hf_state = tiny
    hf_state = {**hf_state, "model.norm.weight": np.arange(config.dim, dtype=np.int32)}
    path = write_llama_gguf(tmp_path / "int.gguf", config, hf_state)  # Stored as type I32.
    with pytest.raises(UserError, match=r"'output_norm.weight' .* GGML type I32"):
        load_gguf(path)


def test_truncated_and_corrupt_files(tmp_path, tiny):
    config, _, hf_state = tiny
    data = write_llama_gguf(tmp_path / "full.gguf", config, hf_state).read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 2000, 40, 10):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(UserError, match=r"is truncated or corrupt") as error:
            load_gguf(path)
        assert str(path) in str(error.value)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=r"truncated or corrupt \(the file is empty\)"):
        load_gguf(empty)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04" + data[4:100])
    with pytest.raises(UserError, match=r"is not a GGUF file"):
        load_gguf(other)
    with pytest.raises(UserError, match=r"GGUF file not found: .*missing.gguf"):
        load_gguf(tmp_path / "missing.gguf")
