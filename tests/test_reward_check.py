"""lsp-jax reward-check: AUC math, degradations, named judges, and the whole check on
tiny models (a random reward model, and one built to prefer longer answers)."""

import numpy as np
import pytest

from lsp_jax import cli
from lsp_jax.errors import UserError
from lsp_jax.game import judges
from lsp_jax.game.templates import TemplateTexts, build_templates
from lsp_jax.train import config as config_lib
from lsp_jax.train import loop, reward_check, reward_check_report
from lsp_jax.train import run as run_lib
from lsp_jax.weights import sources
from tests import constructed_rewards as constructed
from tests.test_train import TINY


def tiny_config(**overrides):
    config = config_lib.load_config(TINY)
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])
    return config


def test_auc_counts_wins_and_half_ties():
    # 9 pairs: 3 > 2, 3 > 0 (x2), 2 = 2 (tie), 2 > 0 (x2), 1 < 2, 1 > 0 (x2): 7 wins, 1 tie.
    assert reward_check.auc([3, 2, 1], [2, 0, 0]) == pytest.approx(7.5 / 9)
    assert reward_check.auc([1, 1], [1, 1]) == 0.5
    assert reward_check.auc([0, 0], [1, 2]) == 0.0
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1.0, 1.0, 64), rng.normal(0.0, 1.0, 64)  # True AUC 0.76.
    low, high = reward_check.auc_interval(pos, neg)
    assert low < reward_check.auc(pos, neg) < high and 0.05 < high - low < 0.3
    assert reward_check.auc_interval([5.0] * 8, [1.0] * 8) == (1.0, 1.0)


def test_verdicts():
    assert reward_check.verdict([0.9, 0.7, 0.65, 1.0]) == "signal"
    assert reward_check.verdict([0.9, 0.5, 0.5, 0.5]) == "partial"
    assert reward_check.verdict([0.6, 0.5, 0.2, 0.64]) == "at chance"


def test_degradations_do_what_they_say():
    tokenizer = sources.load_tokenizer("tiny-random")
    answers = [tokenizer.encode(t) for t in ("one two three", "four five six seven", "x")]
    out = reward_check.degrade(answers, tokenizer, max_tokens=64, seed=1)
    assert out["other_prompt"] == answers[1:] + answers[:1]
    assert out["cut"] == [a[: reward_check.CUT_TOKENS] for a in answers]
    assert out["empty"] == [[], [], []]
    for original, shuffled in zip(answers, out["shuffled"]):
        words = tokenizer.decode(shuffled).split()
        assert sorted(words) == sorted(tokenizer.decode(original).split())
    assert tokenizer.decode(out["shuffled"][1]) != "four five six seven"  # Seeded: reordered.


def test_named_judges_set_prompt_tag_and_score_tokens():
    config = tiny_config(**{"reward.judge_mode": "expected"})
    judges.apply(config, "scale_0_3")
    assert judges.name_of(config) == "scale_0_3"
    chat = sources.load_chat_template("tiny-random")
    templates = build_templates(chat, run_lib.template_texts(config))
    assert [chat.tokenizer.decode([i]) for i in templates.digit_ids] == ["0", "1", "2", "3"]
    # The tag is empty: the judge turn ends with the assistant header, as the Solver's does.
    np.testing.assert_array_equal(
        templates.judge_suffix[0][0, -templates.user_suffix[0].shape[1] :],
        templates.user_suffix[0][0],
    )
    judges.apply(config, "yes_no")  # The byte-level tiny tokenizer spells "No" in 2 tokens.
    with pytest.raises(UserError, match="splits the score 'No' into 2 tokens"):
        build_templates(chat, run_lib.template_texts(config))
    with pytest.raises(UserError, match="Named judges: paper, yes_no"):
        judges.get("kind")
    with pytest.raises(UserError, match="fewer than two scores"):
        build_templates(chat, TemplateTexts("c", "{instruction} {response}", score_tokens=("1",)))


def test_a_reward_built_to_prefer_longer_answers_separates_cut_and_empty_ones():
    """The constructed reward model pays for the tokens the prompt and chat templates
    never use (English text and ChatML are ASCII bytes, newlines and spaces), which make
    up about 3/4 of the random policy's answers: the longer the answer, the higher their
    share, so cut and empty answers always score lower, and another prompt's answer,
    as long as the policy's, about as high. (Measured: empty 1.0, cut 0.74.)"""
    config = tiny_config()  # As the command test below: the same compiled programs.
    run = run_lib.build_run(config)
    tokenizer = sources.load_tokenizer("tiny-random")
    unused = np.ones(run.step_cfg.policy.vocab_size, np.float32)
    unused[: tokenizer.encode("~")[0] + 1] = 0.0  # Printable ASCII.
    unused[tokenizer.encode(" \n")] = 0.0
    unused[256:259] = 0.0  # ChatML's special tokens.
    rm = constructed.token_rate_reward_model(run.step_cfg.reward_model, unused)
    run.frozen = run.frozen.replace(rm_params=rm)
    report = reward_check.check(config, run, num_prompts=16, log=lambda *_: None)
    ((name, metrics, results),) = report.judges
    reward = results[0]
    assert name == "custom" and reward.name == "R (reward model)"
    assert 0 < metrics["digit_mass"] < 1 and metrics["parse_rate"] is None
    # Unpaired AUCs: prompts differ in length and in their answers' share of paid tokens.
    assert reward.auc("empty") == 1.0 and reward.auc("cut") >= reward_check.SIGNAL_AUC
    assert 0.25 < reward.auc("other_prompt") < 0.75
    assert reward.verdict == "partial"
    text = reward_check_report.format_report(report)
    assert "| R (reward model) | " in text and "verdict R (reward model): partial" in text


def test_command_prints_the_table_and_exits_1_at_chance(capsys):
    code = cli.main(["reward-check", "--config", TINY, "--num-prompts", "8"])
    out = capsys.readouterr().out
    assert "| R (reward model) |" in out and "| R_Q (judge custom) |" in out
    assert "judge custom: score-token mass" in out and "verdict R_Q (judge custom):" in out
    assert code == (1 if "AT CHANCE" in out else 0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--judges", "kind"], "Unknown judge 'kind'"),
        (
            ["--config.reward.kind=none", "--config.game.mode=lsp_zero"],
            "Nothing to check: reward.kind=none",
        ),
        (["--judges", "paper", "--config.game.mode=grpo"], "uses no judge"),
        (["--num-prompts", "1"], "at least 2 prompts"),
        (["--config.reward.judge_scores=('7',)"], "fewer than two scores"),
        (
            ["--config.reward.judge_mode=sampled", "--config.reward.judge_score_tag="],
            "the tag is empty",
        ),
    ],
)
def test_bad_input_gives_one_clear_error(capsys, args, message):
    code = cli.main(["reward-check", "--config", TINY, *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


class _Stop(Exception):
    pass


def test_train_checks_the_reward_first_when_asked(tmp_path, monkeypatch):
    def stop(*args, **kwargs):
        raise _Stop  # Right after the check: no need to compile the training step.

    monkeypatch.setattr(loop.placement_lib, "place_state", stop)
    lines = []
    config = tiny_config(**{"reward.check_before_train": True, "reward.check_prompts": 8})
    with pytest.raises(_Stop):
        loop.train(config, str(tmp_path), log=lines.append)
    text = "\n".join(lines)
    assert "Reward check on 8 prompts" in text and "verdict R (reward model)" in text
    assert ("WARNING: the reward" in text) == ("AT CHANCE" in text)


def test_fewer_prompts_than_a_batch_are_checked_as_one_smaller_batch():
    # --num-prompts 4 (< reward_check.BATCH) once failed with a reshape error: the batch
    # of 4 prompts went into programs built for 8 rows.
    config = tiny_config()
    run = run_lib.build_run(config)
    report = reward_check.check(config, run, num_prompts=4, log=lambda *_: None)
    ((_, _, results),) = report.judges
    assert all(0.0 <= r.auc("empty") <= 1.0 for r in results)
