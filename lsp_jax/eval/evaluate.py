"""Win-rate evaluation: a model and a baseline answer the same prompts, a local model judges.

Generation uses the jitted sampler (temperature 0.01 as in the paper's evaluation; 0 means
greedy) on batches of chat-formatted prompts, sorted by length, left-padded to a few bucket
lengths so that only a handful of shapes compile. Every row is seeded by its prompt's index,
so an answer does not depend on batching, and two runs of the same model agree.

Judges (`judge_kind`):

- `reward_model`: a Llama sequence classifier with one label scores each chat-formatted
  (prompt, answer) pair in its own chat template at the last token; the higher score wins,
  equal scores tie.
- `pairwise`: a Llama instruct model reads a comparison prompt (instruction, response A,
  response B, "reply with one letter") and we read its next-token log-probs of the two
  label tokens, renormalized over the two. Each pair is judged in both orders; with
  d = logit(A) - logit(B) in each order,

      P(model better) = (sigmoid(d_model_first) + 1 - sigmoid(d_model_second)) / 2,

  which cancels a constant position bias exactly (a judge that always says "A" scores 0.5).

Identical answers are ties without asking the judge (there is nothing to choose between).
Preferences follow `lsp_jax.eval.winrate`: 1 model better, 0 baseline better, 0.5 tie. Lengths
for the length-controlled win rate are counted in characters (comparable across tokenizers).
"""

import contextlib
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from lsp_jax import data
from lsp_jax.errors import UserError
from lsp_jax.eval import winrate
from lsp_jax.game.rewards import reward_model_scores
from lsp_jax.model import Llama, LlamaConfig, vocab_logits
from lsp_jax.sampling import SamplerConfig, jit_sample

REWARD_MODEL, PAIRWISE = "reward_model", "pairwise"
JUDGE_KINDS = (REWARD_MODEL, PAIRWISE)
DEFAULT_TEMPERATURE = 0.01  # The paper samples evaluation answers at 0.01.
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_BATCH_SIZE = 8
MIN_BUCKET = 16
LENGTH_UNIT = "characters"

PAIRWISE_TEMPLATE = """\
Two assistants answered the same instruction. Compare their responses and decide which one \
is better: which follows the instruction more faithfully and is more helpful, correct, \
complete and clear. Ignore the order in which they are shown; a longer response is not \
better for its length alone.

[Instruction]
{instruction}

[Response {label_a}]
{response_a}

[Response {label_b}]
{response_b}

Which response is better? Reply with a single letter, {label_a} or {label_b}, and nothing else."""


@dataclasses.dataclass(frozen=True)
class PairwisePrompt:
    """The wording a pairwise judge reads.

    template: user turn with the fields {instruction}, {response_a}, {response_b},
      {label_a}, {label_b}.
    labels: the two answer labels; each must be a single token of the judge's tokenizer.
    system: optional system turn (None: the chat template's default).
    answer_prefix: text placed at the start of the judge's reply before reading the label
      (e.g. "Better response:"); empty reads the reply's first token.
    """

    template: str = PAIRWISE_TEMPLATE
    labels: tuple[str, str] = ("A", "B")
    system: str | None = None
    answer_prefix: str = ""


@dataclasses.dataclass
class EvalModel:
    """A loaded model with its chat template (and through it, its tokenizer)."""

    name: str
    config: LlamaConfig
    params: Any
    chat: Any  # lsp_jax.weights.chat.ChatTemplate

    @property
    def tokenizer(self):
        return self.chat.tokenizer


@dataclasses.dataclass
class Answers:
    """Generated answers, aligned with the prompts.

    texts: decoded answers (special tokens and the stop token removed).
    token_ids: the answer ids without the stop token.
    stopped: True where the model ended its answer (False: cut at max_new_tokens).
    """

    texts: list[str]
    token_ids: list[list[int]]
    stopped: list[bool]


# Loading.


def load_eval_model(source, *, dtype=None, scan_layers=True, name=None) -> EvalModel:
    """Loads weights, tokenizer and chat template of any model source.

    scan_layers (default on) compiles the layers once as a loop: for SmolLM2 on CPU this
    cuts the sampler's compile time from about 90 s to about 12 s per prompt bucket, at
    some cost per decode step (the unrolled layout is the faster one for long runs).
    """
    from lsp_jax.weights import sources

    config, params = sources.load_model(source, dtype=dtype, scan_layers=scan_layers)
    chat = sources.load_chat_template(source)
    return EvalModel(name or source_name(source), config, params, chat)


def source_name(source) -> str:
    """A short display name of a model source (its file or folder name)."""
    text = os.fspath(source).rstrip("/")
    return os.path.basename(text) or text


class _ModelCache:
    """Loads each source once (a model, its baseline and its judge are often the same)."""

    def __init__(self, **options):
        self.options = options
        self.models = {}

    def get(self, source) -> EvalModel:
        key = os.fspath(source)
        if key not in self.models:
            self.models[key] = load_eval_model(source, **self.options)
        return self.models[key]


# Batching.


def bucket_length(length: int, *, minimum: int = MIN_BUCKET) -> int:
    """The smallest of minimum, 2^k and 3·2^(k-1) that is >= length (padding waste < 1/3)."""
    bucket = minimum
    while bucket < length:
        power = 1 << (bucket.bit_length() - 1)
        bucket = power * 3 // 2 if bucket == power and power >= 2 else power * 2
    return bucket


def left_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int):
    """Left-pads token lists into (tokens_BT int32, mask_BT bool) numpy arrays."""
    tokens_BT = np.full((len(rows), width), pad_id, np.int32)
    mask_BT = np.zeros((len(rows), width), bool)
    for b, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"A row of {len(row)} tokens does not fit in width {width}.")
        if len(row):
            tokens_BT[b, width - len(row) :] = row
            mask_BT[b, width - len(row) :] = True
    return tokens_BT, mask_BT


def length_batches(rows: Sequence[Sequence[int]], batch_size: int):
    """Groups row indices into batches of similar length, longest first.

    Returns:
      list of (indices, width): up to batch_size indices and their bucket length.
    """
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}; it must be at least 1.")
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batches.append((indices, bucket_length(max(len(rows[i]) for i in indices))))
    return batches


def _full_batch(indices, batch_size):
    """Indices filled up to batch_size with copies of the first (one shape per bucket)."""
    return list(indices) + [indices[0]] * (batch_size - len(indices))


def _progress(iterable, *, enabled, desc, total=None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="batch", dynamic_ncols=True)


# Generation.


def prompt_ids(chat, instruction: str) -> list[int]:
    """Ids of one user turn and the assistant header, in the model's chat template."""
    return chat.render([{"role": "user", "content": instruction}], add_generation_prompt=True)


def stop_ids(chat) -> tuple[int, ...]:
    """The tokenizer's stop ids and the template's end-of-turn id."""
    return tuple(dict.fromkeys([*chat.tokenizer.stop_ids, chat.end_of_turn_id]))


def pad_id(tokenizer) -> int:
    return 0 if tokenizer.pad_id is None else int(tokenizer.pad_id)


def sampler_config(chat, *, max_new_tokens: int, temperature: float) -> SamplerConfig:
    """Sampler options for evaluation; temperature 0 means greedy decoding."""
    if temperature < 0:
        raise UserError(f"temperature={temperature}; use a value >= 0 (0 = greedy).")
    return SamplerConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature if temperature > 0 else 1.0,
        greedy=temperature == 0,
        stop_tokens=stop_ids(chat),
        pad_token=pad_id(chat.tokenizer),
    )


def _texts(prompts) -> list[str]:
    return [getattr(p, "text", p) for p in prompts]


def _check_context(config, width, max_new_tokens):
    limit = config.max_position_embeddings
    if width + max_new_tokens > limit:
        raise UserError(
            f"A prompt of up to {width} tokens plus max_new_tokens={max_new_tokens} exceeds "
            f"the model's context of {limit} tokens; lower --max-new-tokens or shorten the "
            "prompts."
        )


def sample_answers(
    config: LlamaConfig,
    params,
    chat,
    prompts,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: bool = False,
    desc: str = "generate",
) -> Answers:
    """Answers every prompt (strings or data.Prompt) once; see `Answers`."""
    rows = [prompt_ids(chat, text) for text in _texts(prompts)]
    sampler = sampler_config(chat, max_new_tokens=max_new_tokens, temperature=temperature)
    rng = jax.random.key(seed)
    texts, token_ids, stopped = [None] * len(rows), [None] * len(rows), [None] * len(rows)
    batches = length_batches(rows, batch_size)
    for indices, width in _progress(batches, enabled=progress, desc=desc):
        _check_context(config, width, max_new_tokens)
        full = _full_batch(indices, batch_size)
        tokens_BT, mask_BT = left_pad([rows[i] for i in full], width, sampler.pad_token)
        out = jit_sample(
            config, params, tokens_BT, mask_BT, rng, sampler, row_ids_B=np.asarray(full, np.int32)
        )
        out_tokens_BT, lengths_B, truncated_B = jax.device_get(
            (out.tokens_BT, out.lengths_B, out.truncated_B)
        )
        for b, i in enumerate(indices):
            ids = out_tokens_BT[b, : lengths_B[b]].tolist()
            stopped[i] = not bool(truncated_B[b])
            token_ids[i] = ids[:-1] if stopped[i] else ids
            texts[i] = chat.tokenizer.decode(token_ids[i], skip_special=True)
    return Answers(texts, token_ids, stopped)


def generate_answers(
    config,
    params,
    chat,
    prompts,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: bool = False,
) -> list[str]:
    """The decoded answers to `prompts` (see `sample_answers`)."""
    return sample_answers(
        config,
        params,
        chat,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    ).texts


# Judge forward passes (in-graph reads of scores and label log-probs).


@functools.partial(jax.jit, static_argnames="config")
def reward_scores_B(config: LlamaConfig, params, tokens_BT, mask_BT):
    """float32 [B] scalar rewards of a sequence classifier at each row's last token."""
    scores_BTC = Llama(config).apply({"params": params}, tokens_BT, mask_BT=mask_BT)
    return reward_model_scores(scores_BTC, mask_BT)


@functools.partial(jax.jit, static_argnames="config")
def label_logprobs_B2(config: LlamaConfig, params, tokens_BT, mask_BT, label_ids_2):
    """float32 [B, 2] next-token log-probs (full-vocabulary softmax) of the two labels after
    each left-padded row; only the last position's logits are computed."""
    hidden_BTD = Llama(config).apply(
        {"params": params}, tokens_BT, mask_BT=mask_BT, return_hidden=True
    )
    logits_BV = vocab_logits(config, params, hidden_BTD[:, -1])
    # float32: log-softmax over the whole vocabulary, so label probabilities stay accurate.
    logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    return jnp.take(logp_BV, label_ids_2, axis=-1)


def run_batched(
    forward: Callable, rows: Sequence[Sequence[int]], *, pad: int, batch_size: int, **progress
) -> np.ndarray:
    """Applies forward(tokens_BT, mask_BT) -> [B, ...] to all rows in length-bucketed
    batches; returns the outputs in the order of `rows`."""
    outputs = [None] * len(rows)
    batches = length_batches(rows, batch_size)
    for indices, width in _progress(batches, **progress):
        full = _full_batch(indices, batch_size)
        tokens_BT, mask_BT = left_pad([rows[i] for i in full], width, pad)
        out = np.asarray(jax.device_get(forward(tokens_BT, mask_BT)))
        for b, i in enumerate(indices):
            outputs[i] = out[b]
    return np.stack(outputs) if outputs else np.zeros((0,))


# Judges.


def reward_model_rows(chat, instruction: str, answer: str) -> list[int]:
    """The judge's ids of the chat-formatted (instruction, answer) conversation."""
    messages = [
        {"role": "user", "content": instruction},
        {"role": "assistant", "content": answer},
    ]
    return chat.render(messages, add_generation_prompt=False)


def label_token_ids(tokenizer, labels) -> tuple[int, int]:
    """The single token id of each label; fails if a label is several tokens."""
    ids = []
    for label in labels:
        encoded = tokenizer.encode(label)
        if len(encoded) != 1:
            raise UserError(
                f"The pairwise label {label!r} is {len(encoded)} tokens in the judge's "
                f"tokenizer ({tokenizer.source}); choose labels that are single tokens "
                "(e.g. 'A'/'B' or '1'/'2')."
            )
        ids.append(encoded[0])
    if ids[0] == ids[1]:
        raise UserError(f"The pairwise labels {labels} map to the same token.")
    return ids[0], ids[1]


def pairwise_rows(chat, fmt: PairwisePrompt, instruction: str, first: str, second: str):
    """The judge's ids of one comparison: `first` shown as label A, `second` as label B."""
    content = fmt.template.format(
        instruction=instruction,
        response_a=first,
        response_b=second,
        label_a=fmt.labels[0],
        label_b=fmt.labels[1],
    )
    messages = [{"role": "user", "content": content}]
    if fmt.system is not None:
        messages.insert(0, {"role": "system", "content": fmt.system})
    ids = chat.render(messages, add_generation_prompt=True)
    if fmt.answer_prefix:
        ids = ids + chat.tokenizer.encode(fmt.answer_prefix)
    return ids


def pairwise_preference(logp_model_first_2, logp_model_second_2):
    """P(model better) from label log-probs of both orders, averaged (float64).

    Args:
      logp_model_first_2: [..., 2] log-probs of labels (A, B) with the model's answer as A.
      logp_model_second_2: the same with the model's answer as B.

    Returns:
      (preference, p_model_as_a, p_model_as_b): the average, and the two orders' own
      P(model better) (labels renormalized over the two).
    """
    first = np.asarray(logp_model_first_2, np.float64)
    second = np.asarray(logp_model_second_2, np.float64)
    p_a_first = special.expit(first[..., 0] - first[..., 1])
    p_a_second = special.expit(second[..., 0] - second[..., 1])
    # 0.5 + (p_a_first - p_a_second) / 2 equals (p_a_first + (1 - p_a_second)) / 2, and is
    # exactly 0.5 when both orders give the same label logits (pure position bias).
    preference = 0.5 + (p_a_first - p_a_second) / 2.0
    return preference, p_a_first, 1.0 - p_a_second


def _check_judge_context(judge, rows):
    longest = max((len(row) for row in rows), default=0)
    if longest > judge.config.max_position_embeddings:
        raise UserError(
            f"A judge input of {longest} tokens exceeds the context of the judge {judge.name} "
            f"({judge.config.max_position_embeddings} tokens); lower --max-new-tokens."
        )


def _reward_judgement(judge, pairs, batch_size, prog):
    """Rewards of both answers of each (instruction, model answer, baseline answer)."""
    rows = []
    for instruction, model_text, baseline_text in pairs:
        rows.append(reward_model_rows(judge.chat, instruction, model_text))
        rows.append(reward_model_rows(judge.chat, instruction, baseline_text))
    _check_judge_context(judge, rows)
    forward = functools.partial(reward_scores_B, judge.config, judge.params)
    scores = run_batched(forward, rows, pad=pad_id(judge.tokenizer), batch_size=batch_size, **prog)
    score_model, score_baseline = scores[0::2], scores[1::2]
    preference = np.where(
        score_model > score_baseline, 1.0, np.where(score_model < score_baseline, 0.0, 0.5)
    )
    return preference, {"score_model": score_model, "score_baseline": score_baseline}


def _pairwise_judgement(judge, pairs, batch_size, prog, fmt):
    """Label log-probs of each pair in both orders, combined by `pairwise_preference`."""
    label_ids_2 = jnp.asarray(label_token_ids(judge.tokenizer, fmt.labels), jnp.int32)
    rows = []
    for instruction, model_text, baseline_text in pairs:
        rows.append(pairwise_rows(judge.chat, fmt, instruction, model_text, baseline_text))
        rows.append(pairwise_rows(judge.chat, fmt, instruction, baseline_text, model_text))
    _check_judge_context(judge, rows)

    def forward(tokens_BT, mask_BT):
        return label_logprobs_B2(judge.config, judge.params, tokens_BT, mask_BT, label_ids_2)

    logp = run_batched(forward, rows, pad=pad_id(judge.tokenizer), batch_size=batch_size, **prog)
    logp = logp.reshape(len(pairs), 2, 2) if len(pairs) else np.zeros((0, 2, 2))
    preference, p_model_as_a, p_model_as_b = pairwise_preference(logp[:, 0], logp[:, 1])
    label_mass = np.exp(logp).sum(-1).mean(-1)  # How much the judge answers with a label.
    details = {"p_model_as_a": p_model_as_a, "p_model_as_b": p_model_as_b}
    return preference, details | {"label_mass": label_mass}


def judge_pairs(
    judge: EvalModel,
    instructions,
    model_answers: Sequence[str],
    baseline_answers: Sequence[str],
    *,
    kind: str = PAIRWISE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    pairwise_prompt: PairwisePrompt | None = None,
    skip_identical: bool = True,
    progress: bool = False,
) -> dict:
    """Judges every (model answer, baseline answer) pair.

    Args:
      judge: the judge model (a classifier for 'reward_model', an LM for 'pairwise').
      instructions: the prompts (strings or data.Prompt).
      model_answers, baseline_answers: answer texts aligned with the prompts.
      kind: 'reward_model' or 'pairwise'.
      batch_size: judge rows per forward pass (pairwise: two rows per pair).
      pairwise_prompt: the pairwise wording and labels (default PairwisePrompt()).
      skip_identical: identical answers are ties without a forward pass.

    Returns:
      dict of per-pair lists: 'preference' (1 model better, 0 baseline better, 0.5 tie),
      'identical', and for reward_model 'score_model', 'score_baseline'; for pairwise
      'p_model_as_a', 'p_model_as_b' (P(model better) in each order) and 'label_mass'
      (mean probability the judge put on the two labels). Skipped pairs hold None there.
    """
    instructions = _texts(instructions)
    if not len(instructions) == len(model_answers) == len(baseline_answers):
        raise ValueError(
            f"{len(instructions)} prompts, {len(model_answers)} model answers and "
            f"{len(baseline_answers)} baseline answers must agree."
        )
    _check_judge(judge, kind)
    identical = [a == b for a, b in zip(model_answers, baseline_answers)]
    todo = [i for i, same in enumerate(identical) if not (skip_identical and same)]
    pairs = [(instructions[i], model_answers[i], baseline_answers[i]) for i in todo]
    prog = dict(enabled=progress, desc=f"judge ({kind})")
    if kind == REWARD_MODEL:
        judged, details = _reward_judgement(judge, pairs, batch_size, prog)
    else:
        fmt = pairwise_prompt or PairwisePrompt()
        judged, details = _pairwise_judgement(judge, pairs, batch_size, prog, fmt)
    result = {"preference": [0.5] * len(instructions), "identical": identical}
    result |= {key: [None] * len(instructions) for key in details}
    for k, i in enumerate(todo):
        result["preference"][i] = float(judged[k])
        for key, values in details.items():
            result[key][i] = float(values[k])
    return result


def _check_judge(judge: EvalModel, kind: str):
    if kind not in JUDGE_KINDS:
        raise UserError(f"Unknown judge kind {kind!r}; use one of {', '.join(JUDGE_KINDS)}.")
    if kind == REWARD_MODEL and not judge.config.is_classifier:
        raise UserError(
            f"The judge {judge.name} is a causal LM, but judge kind 'reward_model' needs a "
            "sequence classifier (LlamaForSequenceClassification, num_labels=1); use "
            "--judge-kind pairwise for an instruct model."
        )
    if kind == PAIRWISE and judge.config.is_classifier:
        raise UserError(
            f"The judge {judge.name} is a sequence classifier; use --judge-kind reward_model."
        )
    if kind == REWARD_MODEL and judge.config.num_labels != 1:
        raise UserError(
            f"The reward model {judge.name} has num_labels={judge.config.num_labels}; "
            "a scalar reward model has exactly one."
        )


# The whole evaluation.


class _Clock:
    """Wall time per phase, printed as each phase ends."""

    def __init__(self, log):
        self.log, self.times = log, {}

    @contextlib.contextmanager
    def phase(self, name):
        start = time.perf_counter()
        yield
        self.times[name] = round(time.perf_counter() - start, 2)
        self.log(f"[eval] {name}: {self.times[name]:.1f} s")


def _answer_stats(answers: Answers) -> dict:
    lengths = [len(ids) for ids in answers.token_ids]
    return {
        "avg_tokens": float(np.mean(lengths)) if lengths else None,
        "stopped_fraction": float(np.mean(answers.stopped)) if lengths else None,
    }


def _ifeval_phase(models, source, *, limit, out_dir, generate):
    """Answers IFEval prompts with each model and scores them; writes one report per role."""
    from lsp_jax.eval import ifeval

    examples = ifeval.load_ifeval(source, limit=limit)
    results, texts = {}, {}
    for role, (model, max_new_tokens) in models.items():
        answers = generate(model, [e.prompt for e in examples], max_new_tokens, f"ifeval {role}")
        texts[role] = answers.texts
        results[role] = ifeval.score_ifeval(examples, answers.texts)
        if out_dir:
            ifeval.write_ifeval_report(results[role], os.path.join(out_dir, f"ifeval_{role}"))
    if out_dir:
        with open(os.path.join(out_dir, "ifeval_answers.jsonl"), "w", encoding="utf-8") as f:
            for k, example in enumerate(examples):
                record = {"key": example.key, "prompt": example.prompt}
                record |= {f"{role}_output": texts[role][k] for role in models}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    keys = ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict")
    keys += ("instruction_level_loose", "n_prompts", "n_instructions", "n_prompts_skipped")
    return {role: {k: result[k] for k in keys} for role, result in results.items()}


def format_ifeval_comparison(ifeval_summary: dict, names: dict) -> str:
    """Markdown table of the four IFEval accuracies of each model."""
    lines = [
        "| model | prompt strict | prompt loose | instruction strict | instruction loose | n |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    cell = lambda v: "n/a" if v is None else f"{v:.1f}"
    for role, r in ifeval_summary.items():
        lines.append(
            f"| {names[role]} | {cell(r['prompt_level_strict'])} | {cell(r['prompt_level_loose'])}"
            f" | {cell(r['instruction_level_strict'])} | {cell(r['instruction_level_loose'])}"
            f" | {r['n_prompts']} |"
        )
    return "\n".join(lines) + "\n"


def _write_outputs(out_dir, summary, prompts, answers, judgement, names):
    os.makedirs(out_dir, exist_ok=True)
    paths = winrate.write_report(
        summary, out_dir, model_name=names["model"], baseline_name=names["baseline"]
    )
    paths["answers"] = os.path.join(out_dir, "answers.jsonl")
    data.write_answers(
        paths["answers"],
        prompts,
        answers["model"].texts,
        generator=names["model"],
        baseline_outputs=answers["baseline"].texts,
        baseline_generator=names["baseline"],
        preferences=judgement["preference"],
    )
    _add_judge_details(paths["answers"], judgement)
    with open(paths["md"], "a", encoding="utf-8") as f:
        f.write("\n" + _setup_markdown(summary))
        if "ifeval" in summary:
            f.write("\nIFEval-format accuracy (percent):\n\n")
            f.write(format_ifeval_comparison(summary["ifeval"], names))
    return paths


def _add_judge_details(path, judgement):
    """Adds the judge's raw per-pair numbers (both orders, scores) to answers.jsonl."""
    keys = [k for k in judgement if k != "preference"]
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    with open(path, "w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            record["judge"] = {key: judgement[key][i] for key in keys}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _setup_markdown(summary) -> str:
    setup, lines = summary["setup"], ["Setup:", ""]
    for key in ("model", "baseline", "judge", "judge_kind", "prompts", "n_prompts"):
        lines.append(f"- {key}: {setup[key]}")
    lines.append(f"- sampling: {setup['sampling']}")
    for role, stats in summary["generation"].items():
        lines.append(
            f"- {role} answers: {stats['avg_tokens']:.1f} tokens on average, "
            f"{100 * stats['stopped_fraction']:.0f}% ended by the model"
        )
    if summary.get("judge_stats"):
        lines.append(f"- judge: {summary['judge_stats']}")
    if summary.get("majority"):
        overall = summary["majority"][winrate.OVERALL]
        lines.append(
            "- win rate of the preferences rounded to 0/0.5/1: "
            f"{_format_rate(overall['win_rate'], overall['win_rate_ci'])}"
        )
    times = ", ".join(f"{k} {v:.1f} s" for k, v in summary["wall_times_s"].items())
    lines += [f"- wall times: {times}", ""]
    return "\n".join(lines)


def _format_rate(value, interval) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f} [{interval[0]:.1f}, {interval[1]:.1f}]"


def _judge_stats(judgement) -> dict:
    stats = {"identical_pairs": int(sum(judgement["identical"]))}
    if "label_mass" in judgement:
        mass = [m for m in judgement["label_mass"] if m is not None]
        stats["mean_label_mass"] = float(np.mean(mass)) if mass else None
        a = [p for p in judgement["p_model_as_a"] if p is not None]
        b = [p for p in judgement["p_model_as_b"] if p is not None]
        # Position bias: how much more the judge favours whichever answer is shown first.
        stats["mean_p_model_as_a"] = float(np.mean(a)) if a else None
        stats["mean_p_model_as_b"] = float(np.mean(b)) if b else None
    return stats


def evaluate(
    model_source,
    baseline_source,
    judge_source,
    prompts=data.SHIPPED,
    *,
    judge_kind: str = PAIRWISE,
    out_dir=None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    baseline_max_new_tokens: int | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    judge_batch_size: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    tie_value: float = winrate.TIE,
    n_boot: int = 1000,
    ifeval=None,
    ifeval_limit: int | None = None,
    pairwise_prompt: PairwisePrompt | None = None,
    dtype=None,
    names: dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Win rate of a model against a baseline, judged by a local model.

    Args:
      model_source, baseline_source, judge_source: model sources (HF folder, .gguf, named).
      prompts: a prompt source for data.load_prompts, or a list of data.Prompt.
      judge_kind: 'pairwise' (instruct model, both orders) or 'reward_model' (classifier).
      out_dir: if given, winrate.{json,md,png}, answers.jsonl (and IFEval reports) go here.
      max_new_tokens: answer budget of the model (and of the baseline unless
        baseline_max_new_tokens is given, e.g. 8 for a truncated baseline).
      temperature: sampling temperature (0: greedy).
      batch_size, judge_batch_size: rows per generation / judge forward pass.
      seed: sampling seed (the same for both models).
      limit: use only the first `limit` prompts.
      tie_value: score of a tie in the win rate.
      n_boot: bootstrap replicates of the intervals.
      ifeval: None, 'shipped' or an IFEval JSONL path: also score both models on it
        (ifeval_limit: its first prompts only).
      pairwise_prompt: wording and labels of the pairwise judge.
      dtype: compute dtype of all three models (default float32).
      names: display names {'model': ..., 'baseline': ...} (default from the sources).
      progress: show tqdm bars; log: where phase wall times are printed.

    Returns:
      The summary of `winrate.summarize` plus 'setup', 'generation', 'judge_stats',
      'wall_times_s' and (with ifeval) 'ifeval'.
    """
    if judge_kind not in JUDGE_KINDS:
        raise UserError(f"Unknown judge kind {judge_kind!r}; use one of {', '.join(JUDGE_KINDS)}.")
    if ifeval:  # Before hours of generation: its checkers are an optional extra.
        from lsp_jax.eval import ifeval as ifeval_lib

        ifeval_lib.require_checkers()
    clock = _Clock(log)
    budgets = {"model": max_new_tokens, "baseline": baseline_max_new_tokens or max_new_tokens}
    names = names or _display_names(model_source, baseline_source, budgets)
    with clock.phase("load"):
        prompt_source, prompts = _load_prompt_list(prompts, limit)
        cache = _ModelCache(dtype=dtype)
        models = {"model": cache.get(model_source), "baseline": cache.get(baseline_source)}
        judge = cache.get(judge_source)
        _check_judge(judge, judge_kind)
    sampling = dict(temperature=temperature, batch_size=batch_size, seed=seed, progress=progress)
    generate = lambda model, texts, budget, desc: sample_answers(
        model.config, model.params, model.chat, texts, max_new_tokens=budget, desc=desc, **sampling
    )
    answers = {}
    for role, model in models.items():
        with clock.phase(f"generate {role}"):
            answers[role] = generate(model, prompts, budgets[role], f"generate {role}")
    with clock.phase("judge"):
        judgement = judge_pairs(
            judge,
            prompts,
            answers["model"].texts,
            answers["baseline"].texts,
            kind=judge_kind,
            batch_size=judge_batch_size or batch_size,
            pairwise_prompt=pairwise_prompt,
            progress=progress,
        )
    with clock.phase("statistics"):
        stats = dict(tie_value=tie_value, n_boot=n_boot, seed=seed)
        summary = _summarize(prompts, answers, judgement, **stats)
    summary["setup"] = {
        "model": os.fspath(model_source),
        "baseline": os.fspath(baseline_source),
        "judge": os.fspath(judge_source),
        "judge_kind": judge_kind,
        "prompts": prompt_source,
        "n_prompts": len(prompts),
        "sampling": dict(temperature=temperature, max_new_tokens=budgets, seed=seed),
        "length_unit": LENGTH_UNIT,
        "names": names,
    }
    if ifeval:
        roles = {role: (models[role], budgets[role]) for role in models}
        with clock.phase("ifeval"):
            summary["ifeval"] = _ifeval_phase(
                roles, ifeval, limit=ifeval_limit, out_dir=out_dir, generate=generate
            )
    summary["wall_times_s"] = dict(clock.times)
    if out_dir:
        paths = _write_outputs(out_dir, summary, prompts, answers, judgement, names)
        log("[eval] wrote " + ", ".join(paths.values()))
    return summary


def _load_prompt_list(prompts, limit):
    """(description, list[data.Prompt]) from a prompt source or a list of prompts."""
    if isinstance(prompts, str | os.PathLike):
        return os.fspath(prompts), data.load_prompts(prompts, limit=limit)
    prompts = [p if hasattr(p, "text") else data.Prompt(str(p)) for p in prompts]
    return "given", prompts[:limit]


def _summarize(prompts, answers, judgement, **options):
    """winrate.summarize on character lengths, plus answer and judge statistics."""
    summary = winrate.summarize(
        judgement["preference"],
        [p.category for p in prompts],
        [len(t) for t in answers["model"].texts],
        [len(t) for t in answers["baseline"].texts],
        **options,
    )
    summary["generation"] = {role: _answer_stats(answers[role]) for role in answers}
    summary["judge_stats"] = _judge_stats(judgement)
    summary["majority"] = _majority_summary(prompts, answers, judgement, **options)
    return summary


def majority_preferences(preferences):
    """Each soft preference rounded to its side: 1 above 0.5, 0 below, 0.5 at exactly 0.5.

    A weak pairwise judge gives soft preferences close to 0.5 (its two orders mostly
    disagree), so the soft win rate stays near 50 %; the rounded one counts on which side of
    0.5 each pair falls.
    """
    prefs_P = np.asarray([np.nan if p is None else p for p in preferences], np.float64)
    return np.where(prefs_P > 0.5, 1.0, np.where(prefs_P < 0.5, 0.0, prefs_P)).tolist()


def _majority_summary(prompts, answers, judgement, **options):
    """Win rates of the rounded preferences (overall and per category; no LC fit)."""
    full = winrate.summarize(
        majority_preferences(judgement["preference"]),
        [p.category for p in prompts],
        [len(t) for t in answers["model"].texts],
        [len(t) for t in answers["baseline"].texts],
        **options,
    )
    keep = ("n", "win_rate", "win_rate_ci")
    groups = {winrate.OVERALL: full[winrate.OVERALL]} | full["categories"]
    return {name: {k: stats[k] for k in keep} for name, stats in groups.items()}


def _display_names(model_source, baseline_source, budgets) -> dict:
    model, baseline = source_name(model_source), source_name(baseline_source)
    if baseline == model:
        if budgets["baseline"] != budgets["model"]:
            baseline = f"{baseline} ({budgets['baseline']} tokens)"
        else:
            baseline = f"{baseline} (baseline)"
    return {"model": model, "baseline": baseline}


def evaluate_policy(
    config: LlamaConfig,
    params,
    reference_params,
    chat,
    prompts,
    *,
    max_new_tokens: int = 256,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    tie_value: float = winrate.TIE,
    n_boot: int = 200,
    pairwise_prompt: PairwisePrompt | None = None,
    reference_config=None,
) -> dict:
    """Win rate of the current policy against the reference on held-out prompts, judged
    pairwise by the reference (for `eval.every` in the training loop). reference_config:
    the reference's architecture when it differs from `config` (a LoRA policy's base).

    Returns:
      The winrate summary dict plus 'judge_stats'; no files are written.
    """
    reference_config = reference_config or config
    reference = EvalModel("reference", reference_config, reference_params, chat)
    options = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed
    )
    policy_texts = generate_answers(config, params, chat, prompts, **options)
    reference_texts = generate_answers(reference_config, reference_params, chat, prompts, **options)
    judgement = judge_pairs(
        reference,
        prompts,
        policy_texts,
        reference_texts,
        kind=PAIRWISE,
        batch_size=batch_size,
        pairwise_prompt=pairwise_prompt,
    )
    summary = winrate.summarize(
        judgement["preference"],
        [getattr(p, "category", data.DEFAULT_CATEGORY) for p in prompts],
        [len(t) for t in policy_texts],
        [len(t) for t in reference_texts],
        tie_value=tie_value,
        n_boot=n_boot,
        seed=seed,
    )
    summary["judge_stats"] = _judge_stats(judgement)
    return summary
