"""A training run built from its config, once, before the loop: the policy, reference and
reward model loaded and placed, the token templates, the step's static options, the mesh,
and the prompt sets (GRPO, in-training evaluation)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lsp_jax import sampling
from lsp_jax.errors import UserError
from lsp_jax.game.advantages import check_group_size, check_mode
from lsp_jax.game.templates import TemplateTexts, build_templates
from lsp_jax.model import LoraConfig, lora
from lsp_jax.model.config import LORA_TARGETS
from lsp_jax.rl import check_loss_options
from lsp_jax.runtime import metrics as metrics_lib
from lsp_jax.runtime import sharding
from lsp_jax.train import placement as placement_lib
from lsp_jax.train.optim import make_optimizer
from lsp_jax.train.state import Frozen, StepConfig, init_state
from lsp_jax.weights import sources

REWARD_KINDS = ("model", "self_judge", "none")
EXPORT_DTYPES = (None, "float32", "bfloat16")
JUDGE_MODES = ("expected", "sampled")
TRUNCATED_REWARDS = ("group_min", "score")


@dataclasses.dataclass
class Run:
    """What the loop needs, built once from the config."""

    step_cfg: StepConfig
    optimizer: object
    frozen: Frozen
    params: object
    tokenizer: object
    source: str
    export_dtype: str | None = None  # train.export_dtype
    export_adapter: bool = True  # train.export_adapter (LoRA runs)


def check_config(config) -> None:
    """Fails before any loading or compiling on options that cannot work together."""
    check_mode(config.game.mode)
    check_group_size(config.game.answers_per_query, config.game.mode)
    check_loss_options(config.loss.kl_estimator, config.loss.aggregation)
    if config.reward.kind not in REWARD_KINDS:
        raise UserError(f"reward.kind={config.reward.kind!r}; choose one of {REWARD_KINDS}.")
    if config.reward.judge_mode not in JUDGE_MODES:
        raise UserError(f"reward.judge_mode={config.reward.judge_mode!r}; choose {JUDGE_MODES}.")
    if config.reward.kind == "model" and not config.reward.model:
        raise UserError(
            "reward.kind=model needs a reward model: pass --config.reward.model=PATH to a "
            "LlamaForSequenceClassification folder (e.g. Skywork-Reward-V2-Llama-3.2-3B). "
            "Without one: --config.reward.kind=self_judge --config.game.mode=lsp_zero (the "
            "reference judge's score is R) or --config.reward.kind=none (LSP on the quality "
            "self-reward alone)."
        )
    if config.reward.kind == "self_judge" and config.game.mode == "lsp":
        raise UserError(
            "reward.kind=self_judge with game.mode=lsp makes R and the quality self-reward "
            "R_Q the same judge score, so the Challenger's reward -V(q) + V_Q(q) is always 0 "
            "and it never learns. Fix: --config.game.mode=lsp_zero (R = the judge's score, "
            "Challenger reward -V(q)), or --config.reward.kind=none (LSP on R_Q alone), or "
            "a reward model (--config.reward.kind=model --config.reward.model=PATH)."
        )
    if config.game.num_queries < 1:
        raise UserError(f"game.num_queries={config.game.num_queries} must be at least 1.")
    if config.game.truncated_reward not in TRUNCATED_REWARDS:
        raise UserError(
            f"game.truncated_reward={config.game.truncated_reward!r}; choose one of "
            f"{', '.join(TRUNCATED_REWARDS)}."
        )
    if config.reward.judge_temperature < 0:
        raise UserError(
            f"reward.judge_temperature={config.reward.judge_temperature}; use a value >= 0 "
            "(0 = greedy)."
        )
    if config.game.num_queries < 2 and config.game.mode in ("lsp", "lsp_zero"):
        raise UserError(
            f"game.num_queries is {config.game.num_queries}, but mode {config.game.mode!r} "
            "needs at least 2 queries: the Challenger's baseline is the mean reward over "
            "the iteration's queries, so with a single query its advantage is always zero. "
            "Fix: set --config.game.num_queries=2 or more (the paper uses 8)."
        )
    k = config.train.update_microbatches
    if k < 1 or config.game.num_queries % k:
        raise UserError(
            f"train.update_microbatches={k} must be at least 1 and divide "
            f"game.num_queries={config.game.num_queries} (micro-batches are whole queries "
            "with their answers)."
        )
    lengths = {
        "game.max_query_tokens": config.game.max_query_tokens,
        "game.max_answer_tokens": config.game.max_answer_tokens,
        "reward.judge_max_tokens": config.reward.judge_max_tokens,
    }
    for key, value in lengths.items():
        if value < 1:
            raise UserError(f"{key}={value}; it must be at least 1. Fix: --config.{key}=N.")
    if config.train.get("wandb_project"):
        metrics_lib.check_wandb()
    lora_config(config.model)  # Refuses a bad model.lora before anything is loaded.
    if config.train.get("export_dtype") not in EXPORT_DTYPES:
        raise UserError(
            f"train.export_dtype={config.train.export_dtype!r}; choose one of "
            f"{', '.join(map(str, EXPORT_DTYPES))} (None: the parameters' dtype)."
        )


def lora_config(model_config) -> LoraConfig:
    """model.lora as a LoraConfig (rank 0: no adapters); UserError on bad values."""
    c = model_config.lora
    if not isinstance(c.rank, int) or c.rank < 0:
        raise UserError(f"model.lora.rank={c.rank!r}; use 0 (off) or a positive rank, e.g. 16.")
    if c.rank == 0:
        return LoraConfig()
    if not c.alpha > 0:
        raise UserError(f"model.lora.alpha={c.alpha!r} must be positive (e.g. 2 x rank).")
    names = [t.strip().removesuffix("_proj") for t in str(c.targets).split(",") if t.strip()]
    targets = LORA_TARGETS if names == ["all"] else tuple(names)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise UserError(
            f"model.lora.targets={c.targets!r}: {', '.join(unknown) or 'empty'} is not a "
            f"projection; use 'all' or a comma list of {', '.join(LORA_TARGETS)}."
        )
    return LoraConfig(rank=c.rank, alpha=float(c.alpha), targets=targets)


def _dtype(name: str):
    try:
        return jnp.dtype(name)
    except TypeError:
        raise UserError(f"Unknown dtype {name!r}; use float32 or bfloat16.") from None


def build_run(config, mesh=None) -> Run:
    """Loads every model the run needs and builds the static step configuration.

    With a mesh, weights are loaded straight into their shardings: each host reads only
    the slices of the checkpoint its devices hold (Hugging Face and GGUF sources).
    Without one, params are host arrays.
    """
    check_config(config)
    m = config.model
    shardings = None
    if mesh is not None:
        rules = mesh_rules(config)
        shardings = lambda cfg: sharding.logical_shardings(
            placement_lib.boxed_params(cfg), mesh, rules
        )
    load = functools.partial(sources.load_model, scan_layers=m.scan_layers, shardings=shardings)
    frozen_dtypes = _frozen_dtypes(m)
    adapters, base_params = lora_config(m), None
    # With LoRA the loaded weights are the frozen base: read in the frozen dtype.
    load_dtype = frozen_dtypes["param_dtype"] if adapters.rank else _dtype(m.param_dtype)
    policy_cfg, params = load(m.source, dtype=_dtype(m.dtype), param_dtype=load_dtype)
    chat = sources.load_chat_template(m.source)
    if adapters.rank:
        # The base is never updated nor donated; only the adapters (param_dtype) train.
        policy_cfg = policy_cfg.replace(param_dtype=_dtype(m.param_dtype), lora=adapters)
        base_params, params = params, lora.init_adapters(policy_cfg, m.lora.seed)
    if m.reference:
        ref_cfg, ref_params = load(m.reference, **frozen_dtypes)
    elif adapters.rank:
        # The reference is the base itself, read without the adapters: no second copy.
        ref_cfg, ref_params = lora.base_config(policy_cfg).replace(**frozen_dtypes), None
    else:
        # A copy (the policy's buffers are donated to the step), cast to the frozen dtype.
        ref_cfg = policy_cfg.replace(**frozen_dtypes)
        ref_params = jax.tree.map(lambda x: _copy_as(x, ref_cfg.param_dtype), params)
    rm_cfg, rm_params, rm_chat = None, None, None
    if config.reward.kind == "model":
        rm_cfg, rm_params = load(config.reward.model, **frozen_dtypes)
        if not rm_cfg.is_classifier:
            raise UserError(f"reward.model={config.reward.model} is not a sequence classifier.")
        rm_chat = sources.load_chat_template(config.reward.model)
        check_same_tokenizer(chat.tokenizer, rm_chat.tokenizer, config.reward.model)
    templates = build_templates(chat, template_texts(config), rm_chat)
    step_cfg = make_step_config(
        config, policy_cfg, ref_cfg, rm_cfg, chat.tokenizer, stop_ids=game_stop_ids(chat)
    )
    prompts = grpo_prompts(config, chat, config.game.max_query_tokens)
    frozen = Frozen(
        ref_params=ref_params,
        rm_params=rm_params,
        templates=templates,
        prompts=prompts,
        base_params=base_params,
    )
    optimizer = make_optimizer(config.optim, config.train.num_steps)
    t = config.train
    return Run(
        step_cfg,
        optimizer,
        frozen,
        params,
        chat.tokenizer,
        m.source,
        t.export_dtype,
        t.get("export_adapter", True),
    )


def _copy_as(x, dtype):
    if isinstance(x, jax.Array):
        return jnp.array(x, dtype=dtype, copy=True)  # Keeps its sharding.
    return np.array(x, dtype=dtype, copy=True)


def _frozen_dtypes(model_config) -> dict:
    frozen = model_config.frozen_param_dtype or model_config.param_dtype
    return dict(dtype=_dtype(model_config.dtype), param_dtype=_dtype(frozen))


def template_texts(config) -> TemplateTexts:
    g = config.game
    return TemplateTexts(
        challenger_prompt=g.challenger_prompt,
        judge_prompt=g.judge_prompt,
        task=g.task,
        template=g.template,
        expected_judge=config.reward.judge_mode == "expected",
        score_tag=config.reward.judge_score_tag,
        score_tokens=tuple(config.reward.judge_scores),
    )


def game_stop_ids(chat) -> tuple[int, ...]:
    """The tokens that end a Challenger query or a Solver answer: the chat template's
    end of turn (<|eot_id|>, <|im_end|>) always, whatever config.json and
    generation_config.json list (Llama-3.2's base files list only <|end_of_text|>), and
    the tokenizer's stop ids."""
    return tuple(dict.fromkeys([chat.end_of_turn_id, *chat.tokenizer.stop_ids]))


def make_step_config(
    config, policy_cfg, ref_cfg, rm_cfg, tokenizer, *, stop_ids=None
) -> StepConfig:
    """The static half of the step: model architectures, game sizes, sampler options.
    stop_ids: the rollouts' stop tokens (default: the tokenizer's)."""
    g, s = config.game, config.sampling
    sampler = functools.partial(
        sampling.SamplerConfig,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        stop_tokens=tuple(tokenizer.stop_ids if stop_ids is None else stop_ids),
        pad_token=tokenizer.pad_id,
        decode_buckets=s.decode_buckets,
    )
    return StepConfig(
        policy=policy_cfg.replace(remat=config.model.remat),
        reference=ref_cfg.replace(remat=False),
        reward_model=rm_cfg,
        mode=g.mode,
        reward_kind=config.reward.kind,
        judge_mode=config.reward.judge_mode,
        num_queries=g.num_queries,
        answers_per_query=g.answers_per_query,
        challenger=sampler(max_new_tokens=g.max_query_tokens),
        solver=sampler(max_new_tokens=g.max_answer_tokens),
        judge=sampler(
            max_new_tokens=config.reward.judge_max_tokens,
            temperature=config.reward.judge_temperature or 1.0,
            greedy=config.reward.judge_temperature == 0,
        ),
        judge_fallback=config.reward.judge_fallback,
        truncated_reward=g.truncated_reward,
        alpha_challenger=g.alpha_challenger,
        normalize_std=g.normalize_std,
        beta=config.loss.beta,
        kl_estimator=config.loss.kl_estimator,
        aggregation=config.loss.aggregation,
        logprob_chunk=config.loss.logprob_chunk,
        pad_id=tokenizer.pad_id,
        rollout_rules=rules_table(config.mesh.rollout_rules),
        update_microbatches=config.train.update_microbatches,
    )


def abstract_iteration(config, mesh):
    """The training iteration of `config` lowered against abstract inputs on `mesh`, for
    ahead-of-time compilation (`lsp-jax aot`): no weights are loaded. Architectures come
    from the sources' config.json when they exist, else from `model.preset` /
    `reward.preset`; token templates are sized from the prompt texts.

    Returns:
      (jitted iteration, (abstract state, abstract frozen), FLOPs per iteration by phase).
    """
    from lsp_jax.tpu import flop_counts
    from lsp_jax.train import estimate

    m = config.model
    dtypes = dict(dtype=_dtype(m.dtype), param_dtype=_dtype(m.param_dtype))
    policy_cfg = estimate.architecture(m.source, m.preset, scan_layers=m.scan_layers, **dtypes)
    frozen_dtypes = _frozen_dtypes(m)
    rm_cfg = None
    if config.reward.kind == "model":
        rm_cfg = estimate.architecture(
            config.reward.model,
            config.reward.preset,
            scan_layers=m.scan_layers,
            num_labels=1,
            **frozen_dtypes,
        )
    tokenizer = estimate.tokenizer_ids(policy_cfg)
    ref_cfg = policy_cfg.replace(**frozen_dtypes)
    adapters = lora_config(m)
    if adapters.rank:  # The base is also the reference: no second copy.
        policy_cfg = policy_cfg.replace(lora=adapters)
    step_cfg = make_step_config(config, policy_cfg, ref_cfg, rm_cfg, tokenizer)
    templates = estimate.templates(config, template_texts(config))
    prompts = None
    if config.game.mode == "grpo":
        prompts = (
            jax.ShapeDtypeStruct((estimate.GRPO_PROMPTS, config.game.max_query_tokens), jnp.int32),
            jax.ShapeDtypeStruct((estimate.GRPO_PROMPTS,), jnp.int32),
        )
    optimizer = make_optimizer(config.optim, config.train.num_steps)
    sharding.check_batch_divisible(
        mesh, num_queries=config.game.num_queries, answers_per_query=config.game.answers_per_query
    )
    frozen = Frozen(
        ref_params=None if adapters.rank else estimate.abstract_params(ref_cfg),
        rm_params=None if rm_cfg is None else estimate.abstract_params(rm_cfg),
        templates=templates,
        prompts=prompts,
        base_params=estimate.abstract_params(ref_cfg) if adapters.rank else None,
    )
    placement = placement_lib.plan(step_cfg, optimizer, frozen, mesh, mesh_rules(config))
    trained = estimate.abstract_params(policy_cfg)
    if adapters.rank:
        trained = lora.split(trained)[1]
    state = jax.eval_shape(lambda p: init_state(p, optimizer, 0), trained)
    with_sharding = lambda tree, shardings: jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings
    )
    abstract_frozen = with_sharding(jax.eval_shape(lambda f: f, frozen), placement.frozen)
    abstract_state = with_sharding(state, placement.state)
    jitted = placement_lib.jit_iterations(
        step_cfg, optimizer, placement, config.train.steps_per_jit
    )
    flops = flop_counts.step_flops(step_cfg, templates)
    return jitted, (abstract_state, abstract_frozen), flops


def make_mesh(config):
    """The config's device mesh; refuses batches that do not split evenly over it."""
    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.dcn_shape)
    sharding.check_batch_divisible(
        mesh,
        num_queries=config.game.num_queries,
        answers_per_query=config.game.answers_per_query,
    )
    return mesh


def mesh_rules(config):
    return rules_table(config.mesh.rules)


def rules_table(rules):
    """A config's rules as a hashable tuple of (name, axis or tuple of axes or None)."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def check_same_tokenizer(policy_tok, rm_tok, rm_source) -> None:
    """In-graph scoring feeds the policy's token ids to the reward model unchanged."""
    probe = "Language self-play: 123 tokens, ünïcode & <code>!"
    if policy_tok.vocab_size != rm_tok.vocab_size or policy_tok.encode(probe) != rm_tok.encode(
        probe
    ):
        raise UserError(
            f"The reward model {rm_source} uses another tokenizer than the policy "
            f"(vocabulary {rm_tok.vocab_size} vs {policy_tok.vocab_size}). In-graph scoring "
            "needs a shared vocabulary: pick a reward model built on the policy's base "
            "(for Llama-3.2 policies, e.g. Skywork-Reward-V2-Llama-3.2-3B)."
        )


def grpo_prompts(config, chat, max_tokens):
    """The prompt set as right-padded token rows [P, Q] and lengths [P] (GRPO only)."""
    if config.game.mode != "grpo":
        return None
    from lsp_jax import data

    prompts = data.load_prompts(config.data.prompts, data_dir=config.data.tfds_data_dir or None)
    if config.eval.every and config.eval.prompts == config.data.prompts:
        held_out = set(eval_indices(len(prompts), config.eval.num_prompts))
        prompts = [p for i, p in enumerate(prompts) if i not in held_out]
    rng = np.random.default_rng(config.data.shuffle_seed)
    order = rng.permutation(len(prompts))
    tokens = np.full((len(prompts), max_tokens), chat.tokenizer.pad_id, np.int32)
    lengths = np.zeros(len(prompts), np.int32)
    for row, index in enumerate(order):
        ids = chat.tokenizer.encode(prompts[index].text)[:max_tokens]
        tokens[row, : len(ids)] = ids
        lengths[row] = len(ids)
    return tokens, lengths


def eval_indices(num_prompts: int, count: int) -> list[int]:
    """The held-out slice for `eval.every`: `count` prompts spread evenly over the set
    (every k-th, so each category of the shipped set is represented). GRPO runs on the
    same prompt file leave these out of training."""
    count = min(count, num_prompts)
    return [i * num_prompts // count for i in range(count)]


def eval_prompts(config):
    from lsp_jax import data

    prompts = data.load_prompts(config.eval.prompts, data_dir=config.data.tfds_data_dir or None)
    return [prompts[i] for i in eval_indices(len(prompts), config.eval.num_prompts)]


def lora_info(config: LoraConfig) -> dict | None:
    """run.json's record of the adapters (None without LoRA), read by `load_run`."""
    if not config.rank:
        return None
    return {"rank": config.rank, "alpha": config.alpha, "targets": list(config.targets)}
