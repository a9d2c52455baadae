"""Does a reward carry signal? The policy's own answers against degraded ones, scored
in-graph exactly as training scores them (lsp_jax.train.step.score_answers).

For each of P prompts of the config's prompt set the policy answers once, as its Solver
does in training (same sampler, temperature and length). Each answer is then degraded
four ways: the answer to another prompt, the answer cut to its first few tokens, its
words shuffled, and an empty answer. Every (prompt, answer) pair is scored by each
reward the config trains on: R (reward model or self-judge) and R_Q (the reference
judge's quality score, in `lsp` mode). Per reward and degradation, the AUC is the
probability that the policy's answer to a prompt outscores a degraded answer (ties count
half): 0.5 is chance, 1 a perfect separation, below 0.5 a preference for the degraded
answer. Intervals are percentile bootstraps over prompts. The report is put in words by
lsp_jax.train.reward_check_report.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lsp_jax import data
from lsp_jax.errors import UserError
from lsp_jax.game import judges
from lsp_jax.game.splice import content_lengths, splice_segments
from lsp_jax.game.templates import build_templates
from lsp_jax.model import vocab_logits
from lsp_jax.sampling import SampleOutput
from lsp_jax.train import forward as forward_lib
from lsp_jax.train import state as state_lib
from lsp_jax.train import step
from lsp_jax.train.run import build_run, eval_indices, template_texts
from lsp_jax.weights import sources

DEGRADATIONS = {
    "other_prompt": "the answer to another prompt",
    "cut": "the answer cut to its first {cut} tokens",
    "shuffled": "the answer's words shuffled",
    "empty": "an empty answer",
}
CUT_TOKENS = 4
SIGNAL_AUC = 0.65  # A degradation counts as separated at this AUC or more.
BATCH = 8
BOOTSTRAP = 1000
CONFIDENCE = 0.95


@dataclasses.dataclass
class RewardResult:
    """One reward's scores [P] per answer kind ('policy' and each degradation)."""

    name: str
    scores: dict
    judge: str | None = None  # The judge's name, for judge-read rewards.

    def auc(self, kind):
        return auc(self.scores["policy"], self.scores[kind])

    def interval(self, kind, *, seed=0):
        return auc_interval(self.scores["policy"], self.scores[kind], seed=seed)

    @property
    def verdict(self) -> str:
        return verdict([self.auc(kind) for kind in DEGRADATIONS])


def auc(positive_P, negative_P) -> float:
    """P(positive > negative) + P(tie) / 2 over all pairs (the Mann-Whitney AUC)."""
    pos, neg = np.asarray(positive_P, np.float64), np.asarray(negative_P, np.float64)
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def auc_interval(positive_P, negative_P, *, seed=0, n_boot=BOOTSTRAP, confidence=CONFIDENCE):
    """Percentile bootstrap interval of `auc`, resampling prompts (each prompt keeps its
    own answer and its degraded answer together)."""
    pos, neg = np.asarray(positive_P, np.float64), np.asarray(negative_P, np.float64)
    rng = np.random.default_rng(seed)
    index_BP = rng.integers(0, len(pos), (n_boot, len(pos)))
    pos_BP, neg_BP = pos[index_BP], neg[index_BP]
    greater_B = (pos_BP[:, :, None] > neg_BP[:, None, :]).mean((1, 2))
    ties_B = (pos_BP[:, :, None] == neg_BP[:, None, :]).mean((1, 2))
    values_B = greater_B + 0.5 * ties_B
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values_B, [tail, 100 - tail])
    return float(low), float(high)


def verdict(aucs) -> str:
    """'signal' when every degradation is separated (AUC >= SIGNAL_AUC), 'at chance'
    when none is, 'partial' otherwise."""
    separated = [a >= SIGNAL_AUC for a in aucs]
    if all(separated):
        return "signal"
    return "partial" if any(separated) else "at chance"


def degrade(answers, tokenizer, *, max_tokens: int, seed: int = 0) -> dict:
    """The degraded versions of each answer (lists of token ids), by DEGRADATIONS key."""
    rng = np.random.default_rng(seed)
    shuffled = []
    for ids in answers:
        words = tokenizer.decode(ids).split()
        rng.shuffle(words)
        shuffled.append(tokenizer.encode(" ".join(words))[:max_tokens])
    return {
        "other_prompt": answers[1:] + answers[:1],
        "cut": [ids[:CUT_TOKENS] for ids in answers],
        "shuffled": shuffled,
        "empty": [[] for _ in answers],
    }


def _right_padded(rows, width: int, pad_id: int):
    tokens = np.full((len(rows), width), pad_id, np.int32)
    lengths = np.zeros(len(rows), np.int32)
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)] = ids
        lengths[i] = len(ids)
    return tokens, lengths


def _batch_config(step_cfg, batch: int):
    """The step's configuration for `batch` queries with one answer each."""
    return dataclasses.replace(step_cfg, num_queries=batch, answers_per_query=1)


def policy_answers(run, params, query_rows, *, seed: int):
    """The policy's answer (token ids, stop token excluded) to each query, sampled as the
    Solver samples in training."""
    batch = min(BATCH, len(query_rows))  # Fewer prompts than a batch: one smaller batch.
    cfg = _batch_config(run.step_cfg, batch)
    width = cfg.challenger.max_new_tokens

    @jax.jit
    def answer(params, frozen, tokens, lengths, key):
        queries = {"tokens": tokens, "content_lengths": lengths}
        policy = step.rollout_params(cfg, params)  # As training samples: its rollout copy.
        out = step.solver_rollout(cfg, policy, frozen, queries, key)["answers"]
        return out.tokens_BT, content_lengths(out.lengths_B, ~out.truncated_B)

    answers = []
    key = jax.random.key(seed)
    for start in range(0, len(query_rows), batch):
        tokens, lengths = _right_padded(query_rows[start : start + batch], width, cfg.pad_id)
        out, out_lengths = jax.device_get(
            answer(params, run.frozen, tokens, lengths, jax.random.fold_in(key, start))
        )
        answers += [list(row[:n]) for row, n in zip(out, out_lengths)]
    return answers


def score_pairs(run, frozen, query_rows, answer_rows, *, seed: int, digit_mass=True):
    """(R [P], R_Q [P] or None, judge metrics) of each (query, answer) pair, through
    `lsp_jax.train.step.score_answers`. Judge metrics: 'digit_mass' (expected judge:
    the probability of the score tokens where the score is read) and 'parse_rate'
    (sampled judge: judgements with a readable score); `digit_mass=False` skips the
    extra judge forward pass that measures it."""
    batch = min(BATCH, len(query_rows))  # check_prompts: whole batches, or fewer prompts.
    cfg = _batch_config(run.step_cfg, batch)
    score = _jitted_score(cfg, digit_mass)
    rewards, qualities, mass, parse = [], [], [], []
    for start in range(0, len(query_rows), batch):
        q, q_len = _right_padded(
            query_rows[start : start + batch], cfg.challenger.max_new_tokens, cfg.pad_id
        )
        a, a_len = _right_padded(
            answer_rows[start : start + batch], cfg.solver.max_new_tokens, cfg.pad_id
        )
        key = jax.random.fold_in(jax.random.key(seed), start)
        reward, quality, metrics = jax.device_get(score(frozen, q, q_len, a, a_len, key))
        rewards.append(reward)
        qualities.append(quality)
        mass.append(metrics.get("judge/digit_mass"))
        failures = metrics.get("judge/parse_failure_rate")
        parse.append(None if failures is None else 1.0 - failures)
    judge = {
        "digit_mass": None if mass[0] is None else float(np.mean(mass)),
        "parse_rate": None if parse[0] is None else float(np.mean(parse)),
    }
    quality = None if qualities[0] is None else np.concatenate(qualities)
    return np.concatenate(rewards), quality, judge


@functools.lru_cache(maxsize=8)
def _jitted_score(cfg, digit_mass: bool):
    """One compiled scorer per step configuration (shared by all answer kinds)."""
    return jax.jit(functools.partial(_score_batch, cfg, digit_mass=digit_mass))


def _score_batch(cfg, frozen, q_BQ, q_len_B, a_BA, a_len_B, key, *, digit_mass):
    queries = {"tokens": q_BQ, "content_lengths": q_len_B}
    # Only tokens, lengths and the truncation flags are read; truncated rows hold no stop
    # token, so every token counts as content.
    answers = SampleOutput(
        tokens_BT=a_BA,
        logprobs_BT=jnp.zeros(a_BA.shape, jnp.float32),
        mask_BT=jnp.arange(a_BA.shape[1])[None, :] < a_len_B[:, None],
        lengths_B=a_len_B,
        truncated_B=jnp.ones(a_len_B.shape, bool),
    )
    reward_NG, quality_NG, metrics = step.score_answers(cfg, frozen, queries, answers, key)
    metrics = dict(metrics)
    expected = cfg.uses_judge and cfg.judge_mode == "expected"
    if digit_mass and expected and "judge/digit_mass" not in metrics:
        metrics["judge/digit_mass"] = _digit_mass(cfg, frozen, queries, answers)
    quality = None if quality_NG is None else quality_NG[:, 0]
    return reward_NG[:, 0], quality, metrics


def _digit_mass(cfg, frozen, queries, answers):
    """Mean probability the expected judge puts on its score tokens where it reads the
    score (the judge's input as score_answers builds it)."""
    t = frozen.templates
    pair = [
        (queries["tokens"], queries["content_lengths"]),
        t.judge_middle,
        (answers.tokens_BT, answers.lengths_B),
        t.judge_suffix,
    ]
    tokens, mask = splice_segments(pair, pad_id=cfg.pad_id)
    prefix_1P = t.judge_prefix[0]
    ref_params = state_lib.reference_params(frozen)
    last_BD = forward_lib.forward_with_prefix(
        cfg.reference, ref_params, prefix_1P, jnp.ones(prefix_1P.shape, bool), tokens, mask
    )[1]
    # float32: a small model's score tokens may hold tiny probabilities.
    probs_BV = jax.nn.softmax(vocab_logits(cfg.reference, ref_params, last_BD), axis=-1)
    return jnp.mean(jnp.sum(jnp.take(probs_BV, t.digit_ids, axis=-1), axis=-1))


@dataclasses.dataclass
class Report:
    """What `check` measured: per judge tried, its metrics and every reward's scores."""

    num_prompts: int
    prompt_source: str
    sampling: str
    judges: list  # [(judge name or None, judge metrics dict, [RewardResult])]

    @property
    def at_chance(self) -> list[str]:
        """Names of the rewards whose verdict is 'at chance'."""
        return [
            r.name for _, _, results in self.judges for r in results if r.verdict == "at chance"
        ]


def check_prompts(config, count: int) -> list[str]:
    """`count` prompts spread over the config's prompt set (data.prompts), each category
    represented, rounded down to whole batches."""
    prompts = data.load_prompts(config.data.prompts, data_dir=config.data.tfds_data_dir or None)
    count = min(count, len(prompts))
    count -= count % BATCH if count >= BATCH else 0
    if count < 2:
        raise UserError(
            f"reward-check needs at least 2 prompts (it pairs each answer with another "
            f"prompt's); got {count}. Fix: raise --num-prompts (or reward.check_prompts), "
            f"or use a larger data.prompts set."
        )
    return [prompts[i].text for i in eval_indices(len(prompts), count)]


def check(config, run=None, *, num_prompts=None, judge_names=None, log=print) -> Report:
    """Scores the policy's answers and their degradations with every reward the config
    trains on, for the config's judge or each named judge (lsp_jax.game.judges).

    Args:
      config: a training config (locked ml_collections ConfigDict).
      run: an already built lsp_jax.train.run.Run (`train` passes its own), else built.
      num_prompts: prompts to score (default reward.check_prompts).
      judge_names: named judges to compare (default: the config's judge as it is).
      log: where progress lines go.
    """
    uses_judge = config.game.mode == "lsp" or config.reward.kind == "self_judge"
    if config.reward.kind == "none" and not uses_judge:
        raise UserError(
            f"Nothing to check: reward.kind=none and game.mode={config.game.mode} train on no "
            "reward. Fix: set reward.kind=model (with reward.model) or self_judge, or "
            "game.mode=lsp."
        )
    if judge_names and not uses_judge:
        raise UserError(
            f"--judges compares quality judges, but game.mode={config.game.mode} with "
            f"reward.kind={config.reward.kind} uses no judge. Fix: drop --judges, or check an "
            "lsp-mode or reward.kind=self_judge config."
        )
    for name in judge_names or ():
        judges.get(name)  # Unknown names fail before any model is loaded.
    run = run or build_run(config)
    tokenizer = run.tokenizer
    max_query = run.step_cfg.challenger.max_new_tokens
    texts = check_prompts(config, num_prompts or config.reward.check_prompts)
    queries = [tokenizer.encode(text)[:max_query] for text in texts]
    solver = run.step_cfg.solver
    log(f"reward-check: the policy answers {len(queries)} prompts ...")
    policy = state_lib.policy_params(run.frozen, run.params)
    answers = policy_answers(run, policy, queries, seed=config.train.seed)
    kinds = {"policy": answers}
    kinds.update(degrade(answers, tokenizer, max_tokens=solver.max_new_tokens))
    report = Report(
        num_prompts=len(queries),
        prompt_source=str(config.data.prompts),
        sampling=f"temperature {solver.temperature}, up to {solver.max_new_tokens} tokens",
        judges=[],
    )
    for i, name in enumerate(judge_names or [None]):
        frozen = run.frozen
        if name is not None:
            variant = config.copy_and_resolve_references()
            judges.apply(variant, name)
            frozen = _with_templates(run, variant)
        label = name or (judges.name_of(config) if uses_judge else None)
        log(
            f"reward-check: scoring {5 * len(queries)} pairs"
            + (f" (judge {label})" if label else "")
        )
        # The judge's score-token mass is measured on the policy's own answers only.
        scored = {
            kind: score_pairs(
                run, frozen, queries, rows, seed=config.train.seed, digit_mass=kind == "policy"
            )
            for kind, rows in kinds.items()
        }
        results = _results(config, scored, label, include_model=(i == 0))
        report.judges.append((label, scored["policy"][2], results))
    return report


def _with_templates(run, config):
    """The run's frozen inputs with the token templates of `config`'s judge."""
    rm_chat = None
    if run.frozen.rm_params is not None:
        rm_chat = sources.load_chat_template(config.reward.model)
    chat = sources.load_chat_template(run.source)
    return run.frozen.replace(templates=build_templates(chat, template_texts(config), rm_chat))


def _results(config, scored, judge, *, include_model):
    """RewardResults of the rewards a config trains on, from {kind: (R, R_Q, metrics)}."""
    reward = {kind: v[0] for kind, v in scored.items()}
    quality = {kind: v[1] for kind, v in scored.items()}
    results = []
    if config.reward.kind == "model" and include_model:
        results.append(RewardResult("R (reward model)", reward))
    if config.reward.kind == "self_judge":
        results.append(RewardResult(f"R (self-judge {judge})", reward, judge))
    elif config.game.mode == "lsp":
        results.append(RewardResult(f"R_Q (judge {judge})", quality, judge))
        if config.reward.kind == "model":
            total = {kind: reward[kind] + quality[kind] for kind in reward}
            results.append(RewardResult(f"R + R_Q (Solver, judge {judge})", total, judge))
    return results
