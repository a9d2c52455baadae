"""Named quality judges: a prompt, the tag its score follows and the score tokens.

The `expected` judge reads one next-token distribution: the prompt's assistant turn is
opened with `score_tag`, and the score is Σ s·p(score_tokens[s]) renormalized over the
score tokens (lsp_jax.game.rewards.expected_judge_score). `paper` is the LSP paper's
seven-criteria judge (0..7); the others ask a small model a simpler question whose
answer is its first token. `lsp-jax reward-check --judges NAME,...` measures them.
"""

import dataclasses

from lsp_jax.errors import UserError
from lsp_jax.game import prompts


@dataclasses.dataclass(frozen=True)
class Judge:
    prompt: str  # With {instruction} and {response} slots.
    score_tag: str
    scores: tuple[str, ...]  # Single tokens, worst first: scores[s] is worth s.


_PAIR = """\
<User>
{instruction}
</User>

<Assistant>
{response}
</Assistant>"""

YES_NO_PROMPT = f"""\
Here is a user's message and an AI assistant's reply.

{_PAIR}

Is the reply a helpful answer to this user's message? Answer Yes or No."""

ON_TOPIC_PROMPT = f"""\
Here is a user's message and an AI assistant's reply.

{_PAIR}

Does the reply respond to this exact message, rather than to some other question? \
Answer Yes or No."""

SCALE_0_3_PROMPT = f"""\
Rate an AI assistant's reply to a user's message.

{_PAIR}

Rating scale:
0: empty, nonsense, or about something else
1: on topic but unhelpful
2: a partial answer
3: a complete, helpful answer
Reply with the rating only (0, 1, 2 or 3)."""

JUDGES = {
    "paper": Judge(prompts.JUDGE_PROMPT, prompts.SCORE_TAG, tuple("01234567")),
    "yes_no": Judge(YES_NO_PROMPT, "", ("No", "Yes")),
    "on_topic": Judge(ON_TOPIC_PROMPT, "", ("No", "Yes")),
    "scale_0_3": Judge(SCALE_0_3_PROMPT, "", tuple("0123")),
}


def get(name: str) -> Judge:
    if name not in JUDGES:
        raise UserError(
            f"Unknown judge {name!r}. Named judges: {', '.join(JUDGES)}. Fix: pick one of "
            "them, or set game.judge_prompt, reward.judge_score_tag and reward.judge_scores."
        )
    return JUDGES[name]


def apply(config, name: str) -> None:
    """Sets the config's judge prompt, score tag and score tokens to the named judge."""
    judge = get(name)
    with config.unlocked():
        config.game.judge_prompt = judge.prompt
        config.reward.judge_score_tag = judge.score_tag
        config.reward.judge_scores = judge.scores


def name_of(config) -> str:
    """The named judge a config uses, or 'custom'."""
    for name, judge in JUDGES.items():
        if (
            config.game.judge_prompt == judge.prompt
            and config.reward.judge_score_tag == judge.score_tag
            and tuple(config.reward.judge_scores) == judge.scores
        ):
            return name
    return "custom"
