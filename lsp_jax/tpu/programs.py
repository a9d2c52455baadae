"""Stand-in programs to compile ahead of time: one supervised step of a Llama (what the
self-play iteration's policy update costs, without rollouts) and the jitted sampler alone.
Used by tests and benchmarks/aot_memory.py."""

import jax


def loss_grad_program(model_cfg, mesh, rules, *, batch: int, seq_len: int, learning_rate=1e-5):
    """A jitted next-token cross-entropy + AdamW step and its abstract arguments.

    Parameters and both Adam moments are sharded by their logical names (`rules`, e.g.
    config.mesh.rules: FSDP puts 'embed' on the 'fsdp' axis), tokens by rows over
    data × fsdp; parameters and optimizer state are donated.

    Returns:
      (jitted_fn, (params, opt_state, tokens_BT)) with ShapeDtypeStructs for arguments;
      jitted_fn(params, opt_state, tokens_BT) -> (params', opt_state', loss).
    """
    import flax.linen as nn
    import jax.numpy as jnp
    import optax

    from lsp_jax.model import Llama
    from lsp_jax.runtime import sharding

    model = Llama(model_cfg)
    optimizer = optax.adamw(learning_rate)
    tokens_BT = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

    def init(rng):
        params = model.init(rng, jnp.zeros(tokens_BT.shape, jnp.int32))["params"]
        return params, optimizer.init(params)  # Boxes carry over to the Adam moments.

    boxed = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )
    tokens_sharding = sharding.batch_sharding(mesh, 2)
    tokens_BT = jax.ShapeDtypeStruct(tokens_BT.shape, tokens_BT.dtype, sharding=tokens_sharding)

    def loss_fn(params, tokens_BT):
        logits_BTV = model.apply({"params": params}, tokens_BT[:, :-1])
        # float32 log-softmax: the loss of a bf16 model is summed over many tokens.
        logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
        target_BT = tokens_BT[:, 1:, None]
        return -jnp.mean(jnp.take_along_axis(logp_BTV, target_BT, axis=-1))

    def step(params, opt_state, tokens_BT):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens_BT)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state_shardings = jax.tree.map(lambda a: a.sharding, abstract)
    jitted = jax.jit(
        step,
        out_shardings=(*state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0, 1),
    )
    return jitted, (*abstract, tokens_BT)


def sampler_program(
    model_cfg,
    mesh,
    rules,
    *,
    rollout_rules=(),
    prompts: int = 1,
    group_size: int = 8,
    prompt_len: int = 16,
    new_tokens: int = 16,
):
    """A rollout compiled the way the self-play iteration runs one: float32 parameters
    sharded by `rules` (the training layout), optionally cast and resharded to
    `rollout_rules` first, then `prompts` prompts sampled `group_size` times each.

    Returns:
      (jitted_fn, (params, prompt_PT, key_data)) with ShapeDtypeStructs for arguments.
    """
    import flax.linen as nn
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from lsp_jax import sampling
    from lsp_jax.model import Llama, param_axes
    from lsp_jax.runtime import sharding

    init = lambda: Llama(model_cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    boxed = jax.eval_shape(init)["params"]
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    params = jax.tree.map(
        lambda b, s: jax.ShapeDtypeStruct(b.value.shape, jnp.float32, sharding=s),
        boxed,
        shardings,
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    prompt_PT = jax.ShapeDtypeStruct((prompts, prompt_len), jnp.int32, sharding=replicated)
    key_data = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    sampler = sampling.SamplerConfig(
        max_new_tokens=new_tokens, decode_buckets=1, stop_tokens=model_cfg.eos_token_ids
    )

    def sample(params, prompt_PT, key_data):
        key = jax.random.wrap_key_data(key_data)
        mask_PT = jnp.ones(prompt_PT.shape, bool)
        if rollout_rules:
            narrow = lambda x: x.astype(model_cfg.dtype) if x.ndim > 1 else x
            params = jax.tree.map(narrow, params)
            params = sharding.constrain_logical(params, param_axes(model_cfg), rollout_rules)
        with nn.logical_axis_rules(rollout_rules or rules):
            out = sampling.sample(
                model_cfg, params, prompt_PT, mask_PT, key, sampler, group_size=group_size
            )
        return out.tokens_BT, out.logprobs_BT

    return jax.jit(sample), (params, prompt_PT, key_data)
