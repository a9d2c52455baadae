"""The Flax Llama: KV-cache decoding equals the full forward, causality, scan/remat
layouts, and real-size parameter counts (shapes only, no memory)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from lsp_jax.model import Llama, LlamaConfig, init_cache
from lsp_jax.weights import stack_layers, unstack_layers

CONFIG = LlamaConfig.tiny()
PROMPT = 12
DECODE = 6
LENGTHS = [PROMPT, 7, 3]  # Real prompt tokens per row; the rest is left padding.


def random_params(config: LlamaConfig, seed: int = 0) -> dict:
    """Unscanned params at a scale that keeps activations O(1) (the default init's
    std 0.02 gives near-constant logits that would hide layout or cache mistakes)."""
    shapes = jax.eval_shape(
        lambda: meta.unbox(Llama(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    )["params"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    values = []
    for path, leaf in leaves:
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            values.append(1.0 + 0.2 * noise)
        elif "embedding" in name:
            values.append(noise)
        else:
            values.append(noise / math.sqrt(config.dim))
    return jax.tree.unflatten(treedef, values)


@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG)


@pytest.fixture(scope="module")
def batch():
    """Left-padded prompts [B, PROMPT] followed by DECODE real tokens."""
    rng = np.random.default_rng(1)
    tokens_BT = rng.integers(3, CONFIG.vocab_size, size=(3, PROMPT + DECODE))
    pad_B = PROMPT - np.array(LENGTHS)
    mask_BT = np.arange(PROMPT + DECODE)[None, :] >= pad_B[:, None]
    return np.where(mask_BT, tokens_BT, 0), mask_BT


@functools.cache
def _forward(config):
    def forward(params, tokens_BT, mask_BT):
        return Llama(config).apply({"params": params}, tokens_BT, mask_BT=mask_BT)

    return jax.jit(forward)


@functools.cache
def _cached_step(config, attend_bound):
    def step(params, tokens_BT, mask_BT, cache):
        return Llama(config).apply(
            {"params": params}, tokens_BT, mask_BT=mask_BT, cache=cache, attend_bound=attend_bound
        )

    return jax.jit(step)


def decode_logits(config, params, tokens_BT, mask_BT, *, num_slots, attend_bound, chunks):
    """Logits [B, T, V] from prefilling the prompt in `chunks` then decoding one token
    at a time through the KV cache."""
    cache = init_cache(config, tokens_BT.shape[0], num_slots)
    step = _cached_step(config, attend_bound)
    logits, start = [], 0
    for end in [*chunks, *range(PROMPT + 1, PROMPT + DECODE + 1)]:
        out_BTV, cache = step(params, tokens_BT[:, start:end], mask_BT[:, start:end], cache)
        logits.append(np.asarray(out_BTV))
        start = end
    assert int(cache.end) == PROMPT + DECODE
    np.testing.assert_array_equal(np.asarray(cache.mask_BS)[:, : PROMPT + DECODE], mask_BT)
    return np.concatenate(logits, axis=1)


@pytest.mark.parametrize(
    "num_slots, attend_bound, chunks",
    [(PROMPT + DECODE, None, [PROMPT]), (32, None, [PROMPT]), (32, 24, [8, PROMPT])],
    ids=["exact", "spare_slots", "bound_chunked_prefill"],
)
def test_cache_decoding_matches_full_forward(params, batch, num_slots, attend_bound, chunks):
    tokens_BT, mask_BT = batch
    want = np.asarray(_forward(CONFIG)(params, tokens_BT, mask_BT))
    got = decode_logits(
        CONFIG,
        params,
        tokens_BT,
        mask_BT,
        num_slots=num_slots,
        attend_bound=attend_bound,
        chunks=chunks,
    )
    assert np.abs(want).max() > 1.0  # The check is not vacuous.
    np.testing.assert_allclose(got[mask_BT], want[mask_BT], atol=1e-5, rtol=0)


def test_left_padding_is_invisible(params, batch):
    """A left-padded row gives the same logits as the same tokens unpadded."""
    tokens_BT, mask_BT = batch
    padded = np.asarray(_forward(CONFIG)(params, tokens_BT, mask_BT))
    row = 2
    real_T = tokens_BT[row, mask_BT[row]][None]
    alone = np.asarray(_forward(CONFIG)(params, real_T, np.ones(real_T.shape, bool)))
    np.testing.assert_allclose(padded[row, mask_BT[row]], alone[0], atol=1e-5, rtol=0)


def test_causality(params, batch):
    tokens_BT, _ = batch
    mask_BT = np.ones(tokens_BT.shape, bool)
    cut = 9
    changed_BT = tokens_BT.copy()
    changed_BT[:, cut + 1 :] = (tokens_BT[:, cut + 1 :] + 5) % CONFIG.vocab_size
    before = np.asarray(_forward(CONFIG)(params, tokens_BT, mask_BT))
    after = np.asarray(_forward(CONFIG)(params, changed_BT, mask_BT))
    np.testing.assert_array_equal(after[:, : cut + 1], before[:, : cut + 1])
    assert np.abs(after[:, cut + 1 :] - before[:, cut + 1 :]).max() > 1e-2


LAYOUTS = {
    "scan": dict(scan_layers=True),
    "remat": dict(remat=True),
    "scan_remat": dict(scan_layers=True, remat=True),
}


def _layout_params(config, params):
    return stack_layers(params) if config.scan_layers else params


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_scan_and_remat_match_plain_model(params, batch, layout):
    tokens_BT, mask_BT = batch
    config = CONFIG.replace(**LAYOUTS[layout])
    want = np.asarray(_forward(CONFIG)(params, tokens_BT, mask_BT))
    got = np.asarray(_forward(config)(_layout_params(config, params), tokens_BT, mask_BT))
    np.testing.assert_allclose(got[mask_BT], want[mask_BT], atol=1e-5, rtol=0)


def test_scanned_init_has_stacked_layout():
    def shapes(config):
        init = lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
        variables = meta.unbox(jax.eval_shape(init))
        return jax.tree.map(lambda x: x.shape, variables["params"])

    plain = shapes(CONFIG)
    scanned = shapes(CONFIG.replace(scan_layers=True))
    want = {k: v for k, v in plain.items() if not k.startswith("layers_")}
    want["layers"] = jax.tree.map(
        lambda s: (CONFIG.num_layers, *s), plain["layers_0"], is_leaf=lambda x: isinstance(x, tuple)
    )
    assert scanned == want


def test_scan_remat_gradients_match_plain_model(params, batch):
    tokens_BT, mask_BT = batch
    config = CONFIG.replace(scan_layers=True, remat=True)

    def loss(config, params):
        logits_BTV = Llama(config).apply({"params": params}, tokens_BT, mask_BT=mask_BT)
        log_probs_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
        return jnp.sum(jnp.where(mask_BT[..., None], log_probs_BTV[..., :7], 0.0))

    want = jax.jit(jax.grad(functools.partial(loss, CONFIG)))(params)
    got = jax.jit(jax.grad(functools.partial(loss, config)))(stack_layers(params))
    for x, y in zip(jax.tree.leaves(unstack_layers(got)), jax.tree.leaves(want)):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["plain", "scan"])
def test_cache_decoding_with_scanned_remat_layers(params, batch, layout):
    tokens_BT, mask_BT = batch
    config = CONFIG.replace(scan_layers=layout == "scan", remat=True)
    want = np.asarray(_forward(CONFIG)(params, tokens_BT, mask_BT))
    got = decode_logits(
        config,
        _layout_params(config, params),
        tokens_BT,
        mask_BT,
        num_slots=32,
        attend_bound=24,
        chunks=[PROMPT],
    )
    np.testing.assert_allclose(got[mask_BT], want[mask_BT], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "preset, count",
    [("llama3_2_1b", 1_235_814_400), ("llama3_2_3b", 3_212_749_824)],
)
@pytest.mark.parametrize("scan_layers", [False, True])
def test_real_size_parameter_counts(preset, count, scan_layers):
    config = getattr(LlamaConfig, preset)(scan_layers=scan_layers)
    shapes = jax.eval_shape(
        lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    )
    leaves = jax.tree.leaves(meta.unbox(shapes))
    assert sum(math.prod(leaf.shape) for leaf in leaves) == count
    assert "lm_head" not in shapes["params"]  # Llama-3.2 ties the head to the embedding.
