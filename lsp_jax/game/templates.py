"""The game's prompts as token templates, built once on the host.

Every variable part (a generated query or answer) sits between fixed token pieces;
the step splices them in-graph (lsp_jax.game.splice). Pieces are (tokens_1L,
lengths_1) pairs so they splice like any generated segment.
"""

import dataclasses

import jax
import numpy as np
from flax import struct

from lsp_jax.errors import UserError
from lsp_jax.game import prompts
from lsp_jax.game.rewards import MAX_QUALITY_SCORE

DIGITS = tuple(str(s) for s in range(MAX_QUALITY_SCORE + 1))  # The paper's scores 0..7.


@struct.dataclass
class GameTemplates:
    challenger_prompt: jax.Array  # [P] the Challenger's whole prompt, ready to generate.
    user_prefix: tuple  # Solver prompt = user_prefix + query + user_suffix.
    user_suffix: tuple
    judge_prefix: tuple  # Judge input = prefix + query + middle + answer + suffix.
    judge_middle: tuple
    judge_suffix: tuple
    rm_prefix: tuple  # Reward-model input, same shape, in the RM's chat format.
    rm_middle: tuple
    rm_suffix: tuple
    digit_ids: jax.Array  # [8] token ids of "0".."7".
    special_ids: jax.Array  # [K] every special token id, neutralized in generated text.
    neutral_id: jax.Array  # [] the plain token (a space) that replaces them.
    score_tags: tuple = struct.field(pytree_node=False, default=())


def piece(ids) -> tuple:
    ids = np.asarray(ids, np.int32).reshape(1, -1)
    return ids, np.asarray([ids.shape[1]], np.int32)


@dataclasses.dataclass(frozen=True)
class TemplateTexts:
    challenger_prompt: str
    judge_prompt: str
    task: str = ""
    template: str = ""
    expected_judge: bool = True
    # The judge's score is read after `score_tag`: the token of score_tokens[s] scores s.
    score_tag: str = prompts.SCORE_TAG
    score_tokens: tuple[str, ...] = DIGITS


def build_templates(policy_chat, texts: TemplateTexts, rm_chat=None) -> GameTemplates:
    """Token templates from the policy's chat format (and the reward model's, if any)."""
    tokenizer = policy_chat.tokenizer
    encode = lambda text: tokenizer.encode(text)
    challenger_text = prompts.fill(
        texts.challenger_prompt, task=texts.task, template=texts.template
    )
    challenger_ids = policy_chat.render(
        [{"role": "user", "content": challenger_text}], add_generation_prompt=True
    )
    user_prefix, user_suffix = policy_chat.user_prompt_pieces()
    _check_judge_prompt(texts.judge_prompt)
    # The judge prompt is one user turn, rendered by the template like any other.
    judge_prefix, judge_middle, judge_suffix = policy_chat.prompt_pieces(
        [{"role": "user", "content": texts.judge_prompt}], ["{instruction}", "{response}"]
    )
    if not texts.expected_judge and not texts.score_tag.strip():
        raise UserError(
            "reward.judge_mode=sampled reads the score token that follows "
            "reward.judge_score_tag in the judgement, but the tag is empty. Fix: use "
            "reward.judge_mode=expected, or a judge whose prompt ends with a score tag "
            "(e.g. the paper's <Score>)."
        )
    score_tag = encode(texts.score_tag) if texts.expected_judge else []
    judge_suffix = judge_suffix + score_tag
    rm_pieces = [[], [], []]
    if rm_chat is not None:
        conversation = [
            {"role": "user", "content": "{query}"},
            {"role": "assistant", "content": "{answer}"},
        ]
        rm_pieces = rm_chat.prompt_pieces(
            conversation, ["{query}", "{answer}"], add_generation_prompt=False
        )
    return GameTemplates(
        challenger_prompt=np.asarray(challenger_ids, np.int32),
        user_prefix=piece(user_prefix),
        user_suffix=piece(user_suffix),
        judge_prefix=piece(judge_prefix),
        judge_middle=piece(judge_middle),
        judge_suffix=piece(judge_suffix),
        rm_prefix=piece(rm_pieces[0]),
        rm_middle=piece(rm_pieces[1]),
        rm_suffix=piece(rm_pieces[2]),
        digit_ids=np.asarray(digit_ids(tokenizer, texts.score_tokens), np.int32),
        special_ids=np.asarray(sorted(set(tokenizer.special_tokens.values())) or [-1], np.int32),
        neutral_id=np.asarray(encode(" ")[0], np.int32),
        score_tags=score_tag_variants(tokenizer, texts.score_tag, texts.score_tokens),
    )


def _check_judge_prompt(judge_prompt: str) -> None:
    for slot in ("{instruction}", "{response}"):
        if judge_prompt.count(slot) != 1:
            raise UserError(
                f"game.judge_prompt must contain {slot} exactly once (found "
                f"{judge_prompt.count(slot)}); it marks where the query / answer go."
            )
    if judge_prompt.index("{response}") < judge_prompt.index("{instruction}"):
        raise UserError("game.judge_prompt must put {instruction} before {response}.")


def digit_ids(tokenizer, score_tokens=DIGITS) -> list[int]:
    """Token id of each score token (the digits 0..7 by default); each must be a single
    token."""
    if len(score_tokens) < 2:
        raise UserError(
            f"reward.judge_scores={tuple(score_tokens)!r} has fewer than two scores; list "
            "the judge's answers from worst to best, e.g. ('No', 'Yes') or ('0', '1', '2')."
        )
    ids = []
    for digit in score_tokens:
        encoded = tokenizer.encode(str(digit))
        if len(encoded) != 1:
            raise UserError(
                f"The tokenizer splits the score {digit!r} into {len(encoded)} tokens; the "
                "quality judge reads one token per score. Choose single-token scores in "
                "reward.judge_scores (digits, or words such as 'Yes'/'No')."
            )
        ids.append(encoded[0])
    return ids


SCORE_SEPARATORS = ("", " ", "  ", "\n", "\n\n", " \n")  # Between the tag and the score.


def score_tag_variants(
    tokenizer, score_tag=prompts.SCORE_TAG, score_tokens=DIGITS
) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Token spellings of the score tag (`<Score>`) followed by a score as they may appear
    in generated text, for reading sampled judgements: pairs (tag ids, the ids of the
    score tokens score_tokens[0..S-1] right after that tag, -1 where a score is spelled
    otherwise).

    The tag may stand at the start of a line, after a space or after other text, and
    whitespace may separate it from the score ("<Score> 5", "<Score>\n5"). BPE may fold
    that whitespace into the tag's last token (Llama-3 has one token for ">\n") or into
    the score's, so each spelling is read from the tokenizer, not assumed.
    """
    digits_of = {}
    for before in ("", " ", "\n", "x"):
        prefix_ids = tokenizer.encode(before) if before else []
        for between in SCORE_SEPARATORS:
            for value, token in enumerate(score_tokens):
                ids = tokenizer.encode(before + score_tag + between + token)
                if ids[: len(prefix_ids)] == prefix_ids:
                    ids = ids[len(prefix_ids) :]
                if len(ids) < 2 or not tokenizer.decode(ids[-1:]).endswith(token):
                    continue
                digits = digits_of.setdefault(tuple(ids[:-1]), [-1] * len(score_tokens))
                digits[value] = ids[-1]
    return tuple(sorted((tag, tuple(digits)) for tag, digits in digits_of.items()))
