"""Judges of answer pairs: a reward model or a pairwise instruct model, read in-graph.

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
Preferences follow `lsp_jax.eval.winrate`: 1 model better, 0 baseline better, 0.5 tie.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from lsp_jax.errors import UserError
from lsp_jax.eval.answers import DEFAULT_BATCH_SIZE, EvalModel, pad_id, prompt_texts, run_batched
from lsp_jax.game.rewards import reward_model_scores
from lsp_jax.model import Llama, LlamaConfig, vocab_logits

REWARD_MODEL, PAIRWISE = "reward_model", "pairwise"
JUDGE_KINDS = (REWARD_MODEL, PAIRWISE)

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
    instructions = prompt_texts(instructions)
    if not len(instructions) == len(model_answers) == len(baseline_answers):
        raise ValueError(
            f"{len(instructions)} prompts, {len(model_answers)} model answers and "
            f"{len(baseline_answers)} baseline answers must agree."
        )
    check_judge(judge, kind)
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


def check_judge(judge: EvalModel, kind: str):
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
