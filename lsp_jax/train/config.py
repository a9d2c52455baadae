"""Experiment configs: ml_collections files, `--config.a.b=v` overrides, defaults."""

import ast
import difflib
import importlib.util
import os
import traceback

import ml_collections

from lsp_jax.errors import UserError
from lsp_jax.game import prompts


def default_config() -> ml_collections.ConfigDict:
    """Every key a config may set, with the project's defaults. Config files start from
    this, so an unknown key (a typo) is rejected instead of silently ignored."""
    c = ml_collections.ConfigDict()
    c.model = dict(
        source="smollm2-135m-instruct",  # HF folder, .gguf, run workdir, or a named model.
        reference="",  # Frozen reference/judge model; "" = the starting point (model.source).
        preset="",  # LlamaConfig preset (e.g. llama3_2_3b) for `lsp-jax aot` without weights.
        dtype="float32",
        param_dtype="float32",
        # Storage dtype of the frozen reference and reward models ("" = param_dtype);
        # bfloat16 halves their memory, and they are never updated.
        frozen_param_dtype="",
        remat=False,
        scan_layers=False,
        # Low-rank adapters: rank > 0 trains only adapters on the chosen projections
        # (targets: "all" or a comma list of q,k,v,o,gate,up,down); the loaded weights
        # stay frozen and, without model.reference, are also the reference and judge
        # (one copy in memory). Each adapter adds (alpha/rank) (x A) B; seed draws A.
        lora=dict(rank=0, alpha=16.0, targets="all", seed=0),
    )
    c.reward = dict(
        # What R(q, a) is: model (reward.model scores), self_judge (the reference
        # judge's score; not with game.mode=lsp), none (0: LSP on the quality reward).
        kind="model",
        model="",  # A LlamaForSequenceClassification checkpoint, for kind=model.
        preset="",  # Its architecture as a LlamaConfig preset, for `lsp-jax aot`.
        judge_mode="expected",  # expected | sampled: how the reference judge scores.
        judge_max_tokens=160,  # Judgement length in sampled mode.
        judge_fallback=0.0,  # R_Q when a sampled judgement has no readable score.
        # The judge's score is read after this tag: the token judge_scores[s] scores s.
        # Named judges (paper, yes_no, scale_0_3, ...): lsp_jax/game/judges.py.
        judge_score_tag=prompts.SCORE_TAG,
        judge_scores=tuple(str(s) for s in range(8)),
        check_before_train=False,  # Run `lsp-jax reward-check` first; warn if at chance.
        check_prompts=32,  # Prompts (of data.prompts) that reward-check scores.
        # Sampling temperature of sampled judgements (0: greedy). Low, so that R_Q is the
        # judge's verdict rather than sampling noise; independent of sampling.temperature.
        judge_temperature=0.0,
        # Warn when more than this fraction of an iteration's sampled judgements has no
        # readable score (they get judge_fallback; judge/parse_failure_rate logs it).
        judge_parse_failure_warn=0.2,
    )
    c.game = dict(
        mode="lsp",  # lsp | lsp_zero | grpo
        num_queries=8,  # N: Challenger queries per iteration.
        answers_per_query=4,  # G: Solver answers per query.
        task="",
        template="",
        challenger_prompt=prompts.CHALLENGER_PROMPT,
        judge_prompt=prompts.JUDGE_PROMPT,
        max_query_tokens=256,
        max_answer_tokens=512,
        alpha_challenger=1.0,
        normalize_std=False,
        # What a truncated query or answer (no stop token within max_*_tokens) scores:
        # group_min, the minimum of its group (an unfinished text never beats a finished
        # one of its group), or score, as if it were complete.
        truncated_reward="group_min",
    )
    # decode_buckets: the decode loop attends to a growing prefix of the cache in this
    # many stages (cheaper attention, one more compiled loop body per stage; the TPU
    # configs use 1, see configs/lsp_llama3_2_3b.py).
    c.sampling = dict(temperature=1.0, top_p=1.0, top_k=0, decode_buckets=4)
    c.loss = dict(beta=0.05, kl_estimator="k3", aggregation="sequence_sum", logprob_chunk=0)
    c.optim = dict(
        lr=3e-6,
        schedule="constant",  # constant | cosine | linear
        warmup=0,
        clip=1.0,
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        grad_accum=1,
        # Adam's first moment in this dtype ("bfloat16" halves its memory: 6 GB less for
        # 3B); None keeps the parameters' dtype. The second moment stays in float32.
        mu_dtype=None,
    )
    c.train = dict(
        num_steps=100,
        seed=0,
        log_every=1,
        checkpoint_every=50,
        keep_checkpoints=3,
        export_every=0,  # 0: export only at the end.
        # The Hugging Face export's weight dtype ("bfloat16": half the size, what people
        # upload; "float32"); None writes the parameters' own dtype.
        export_dtype=None,
        # Also log the metrics to this Weights & Biases project (needs `pip install
        # wandb`; WANDB_MODE=offline logs locally). None: TensorBoard and JSONL only.
        wandb_project=None,
        # With model.lora.rank > 0: also write the adapters alone in PEFT's layout
        # (adapter_config.json + adapter_model.safetensors) to export/step_N/adapter.
        export_adapter=True,
        # Write checkpoints in a thread while training goes on (True), or wait for each
        # (False). None: in the background on TPUs and GPUs, not on CPU (see
        # lsp_jax.train.loop.save_in_background).
        save_in_background=None,
        steps_per_jit=1,
        # The loss and gradient over this many chunks of the queries (each with its G
        # answers), accumulated inside the iteration: peak activation memory / k for
        # the same gradient. Must divide game.num_queries.
        update_microbatches=1,
        samples_to_log=2,
        # Every N iterations, also time the phases as separate programs (0: never).
        # Costs one extra compile per phase and one extra iteration's work each time.
        phase_times_every=0,
        # Stop (exit 1) after this many iterations in a row whose loss or gradient was
        # not finite; such updates are always skipped in-graph (lsp_jax.train.optim).
        max_nonfinite_steps=3,
    )
    c.mesh = dict(
        shape=(1, -1, 1),  # ('data', 'fsdp', 'tensor'); -1 takes the remaining devices.
        dcn_shape=(1, 1, 1),
        rules=(
            ("batch", ("data", "fsdp")),
            ("vocab", "tensor"),
            ("embed", "fsdp"),
            ("heads", "tensor"),
            ("kv_heads", "tensor"),
            ("mlp", "tensor"),
            ("head_dim", None),
            ("layers", None),
            # Activations: rows over data x fsdp, heads and MLP over tensor.
            ("activation_batch", ("data", "fsdp")),
            ("activation_length", None),
            ("activation_embed", None),
            ("activation_heads", "tensor"),
            ("activation_kv_heads", "tensor"),
            ("activation_mlp", "tensor"),
        ),
        # The rollouts' layout (decode loops of the Challenger, the Solver and a sampled
        # judge). A decode step handles one token per row, so it must not gather
        # weights: the policy is resharded once per iteration so that heads, kv heads,
        # MLP and vocabulary split over the fsdp x tensor chips (tensor parallelism),
        # D takes whichever of those axes the heads could not use (a model whose heads
        # do not divide the chips), and rows split over data. Earlier rules have
        # priority when two dimensions want the same axis.
        rollout_rules=(
            ("vocab", ("fsdp", "tensor")),
            ("heads", ("fsdp", "tensor")),
            ("kv_heads", ("fsdp", "tensor")),
            ("mlp", ("fsdp", "tensor")),
            ("embed", ("fsdp", "tensor")),
            ("head_dim", None),
            ("layers", None),
            ("activation_batch", "data"),
            ("activation_length", None),
            ("activation_embed", None),
            ("activation_heads", ("fsdp", "tensor")),
            ("activation_kv_heads", ("fsdp", "tensor")),
            ("activation_mlp", ("fsdp", "tensor")),
        ),
    )
    c.data = dict(prompts="shipped", tfds_data_dir="", shuffle_seed=0)
    c.eval = dict(every=0, prompts="shipped", num_prompts=16, max_new_tokens=128)
    return c


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path.py` or `path.py:arg` by calling its `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"Config file not found: {path}. Pass --config configs/NAME.py.")
    module_spec = importlib.util.spec_from_file_location("lsp_jax_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise UserError(f"{path} defines no get_config(arg=None) function.")
        config = module.get_config(arg or None)
    except UserError:
        raise
    except Exception as error:  # The user's Python: say where it failed, in one line.
        raise UserError(_config_error_message(path, error)) from None
    _check_keys(config, default_config(), prefix="")
    config.lock()
    return config


def _config_error_message(path, error) -> str:
    """'Config file FILE:LINE: ErrorType: message' for an error raised by a config file
    (a syntax error, or an exception in its code)."""
    if isinstance(error, SyntaxError):
        line, detail = error.lineno, error.msg
    else:
        target = os.path.abspath(path)
        frames = [
            f
            for f in traceback.extract_tb(error.__traceback__)
            if os.path.abspath(f.filename) == target
        ]
        line, detail = (frames[-1].lineno if frames else None), str(error)
    where = f"{path}:{line}" if line else path
    return f"Config file {where}: {type(error).__name__}: {detail}. Fix the file and rerun."


def _check_keys(config, reference, prefix):
    for key in config.keys():
        if key not in reference:
            raise UserError(_unknown_key_message(prefix + key, key, reference.keys()))
        if isinstance(config[key], ml_collections.ConfigDict):
            _check_keys(config[key], reference[key], prefix + key + ".")


def _unknown_key_message(full_key, key, known):
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"Unknown config key '{full_key}'.{hint} Known keys here: {', '.join(sorted(known))}."


def config_from_command_line(path: str, arguments: list[str], command: str):
    """The config of `--config path` with the command's `--config.a.b=v` arguments applied;
    any other leftover argument is a usage error naming `command`'s help."""
    overrides = []
    for item in arguments:
        if not item.startswith("--config."):
            raise UserError(
                f"unrecognized argument {item!r}; overrides are written "
                f"--config.SECTION.KEY=VALUE (see lsp-jax {command} --help)."
            )
        overrides.append(item[len("--config.") :])
    config = load_config(path)
    apply_overrides(config, overrides)
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Applies `a.b=value` strings; the value is parsed to the type the key holds."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"Override '--config.{item}' has no '='; write --config.{key}=VALUE.")
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                known = node.keys() if isinstance(node, ml_collections.ConfigDict) else []
                raise UserError(_unknown_key_message(".".join(parts[: i + 1]), part, known))
            if i < len(parts) - 1:
                node = node[part]
        with node.unlocked():
            node[parts[-1]] = _parse_value(text, node[parts[-1]], key)


def _parse_value(text, current, key):
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise UserError(f"--config.{key} takes true or false, not {text!r}.")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise UserError(
            f"--config.{key} expects a {type(current).__name__}, got {text!r}."
        ) from None
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if current is not None and not isinstance(value, type(current)):
        if isinstance(current, tuple) and isinstance(value, list):
            return tuple(value)
        raise UserError(
            f"--config.{key} expects a {type(current).__name__}, got {text!r} "
            f"({type(value).__name__})."
        )
    return value
