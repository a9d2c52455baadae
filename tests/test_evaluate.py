"""Win-rate evaluation end to end on tiny models written by transformers, with judges whose
verdicts are known in advance (rigged weights) and a transformers reference for the pairwise
judge's label probabilities."""

import json

import numpy as np
import pytest
import torch
from scipy import special

from lsp_jax import cli, data
from lsp_jax.eval import answers as answers_lib
from lsp_jax.eval import evaluate, judges, winrate
from lsp_jax.eval.judges import PairwisePrompt

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_ID, IM_START_ID, IM_END_ID = 256, 257, 258
VOCAB = 260
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Short enough for byte-level tokens; same fields as the default template.
SHORT_PAIRWISE = PairwisePrompt(
    template="{instruction}\n{label_a}: {response_a}\n{label_b}: {response_b}\nBetter?"
)
MARK = "#"  # The token the rigged reward model rewards.
HIDDEN = 64  # tiny_hf_config's hidden size.
INSTRUCTIONS = ["Say hi.", "Name a fruit.", "Count to three.", "Why is the sky blue?"]
# One answer budget and batch size throughout, so the tests share compiled programs.
NEW_TOKENS, BASELINE_TOKENS, BATCH = 6, 2, 3


@pytest.fixture(scope="module")
def hf():
    import hf_models

    return hf_models


def byte_level_backend():
    """A byte-level tokenizer without merges (one token per byte) plus ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIALS))
    assert [backend.token_to_id(s) for s in SPECIALS] == [PAD_ID, IM_START_ID, IM_END_ID]
    return backend


def write_tokenizer(folder):
    byte_level_backend().save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def token_id(text):
    ids = byte_level_backend().encode(text).ids
    assert len(ids) == 1
    return ids[0]


def tiny_fields():
    return dict(
        vocab_size=VOCAB,
        bos_token_id=IM_START_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=PAD_ID,
        max_position_embeddings=1024,
    )


def save(model, folder):
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def lm(hf, tmp_path_factory):
    """A random tiny causal LM folder and its transformers model."""
    model = hf.causal_lm(seed=3, **tiny_fields())
    return model, save(model, tmp_path_factory.mktemp("lm"))


def _silence_layers(model):
    """Zeroes every attention output and MLP output: the residual stream stays the token
    embedding."""
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


@pytest.fixture(scope="module")
def biased_judge(hf, tmp_path_factory):
    """A causal LM that prefers label "A" over "B" by the same margin after any text:
    layers silenced, every embedding has 2.0 in dim 0, and the LM head rows of "A"/"B"
    read +/-0.5 of dim 0 (a margin of about 2 nats, far from saturation)."""
    model = hf.causal_lm(seed=4, **tiny_fields())
    with torch.no_grad():
        _silence_layers(model)
        model.model.embed_tokens.weight[:, 0] = 2.0
        model.model.norm.weight.fill_(1.0)
        head = model.lm_head.weight
        head[token_id("A")] = 0.0
        head[token_id("B")] = 0.0
        head[token_id("A"), 0] = 0.5
        head[token_id("B"), 0] = -0.5
    return model, save(model, tmp_path_factory.mktemp("biased_judge"))


@pytest.fixture(scope="module")
def stopper(hf, tmp_path_factory):
    """A causal LM whose next token is always <|im_end|> (it answers with nothing)."""
    model = hf.causal_lm(seed=5, **tiny_fields())
    with torch.no_grad():
        _silence_layers(model)
        model.model.embed_tokens.weight[:, 0] = 2.0
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight[IM_END_ID, 0] = 100.0
    return model, save(model, tmp_path_factory.mktemp("stopper"))


@pytest.fixture(scope="module")
def mark_reward_model(hf, tmp_path_factory):
    """A LlamaForSequenceClassification whose score is > 0 iff MARK occurs in the sequence
    and exactly 0 otherwise.

    Dim 0 of every embedding is 0 except MARK's (3.0). Layer 0's values read only dim 0
    (into kv head 0, component 0), its output projection writes query heads 0 and 1 (kv
    head 0's group) back to dim 0, all MLPs and later attention are silenced, and the score
    head reads dim 0. So the last token's dim 0 is a positive attention-weighted sum over
    the MARK tokens it sees, and exactly 0 without any.
    """
    import transformers

    config = hf.tiny_hf_config(num_labels=1, **tiny_fields())
    model = hf.randomize(transformers.LlamaForSequenceClassification(config), seed=6)
    head_dim = 16
    with torch.no_grad():
        _silence_layers(model)
        embed = model.model.embed_tokens.weight
        embed[:, 0] = 0.0
        embed[token_id(MARK), 0] = 3.0
        first = model.model.layers[0]
        first.input_layernorm.weight[0] = 1.0
        first.self_attn.v_proj.weight.zero_()
        first.self_attn.v_proj.weight[0, 0] = 1.0
        first.self_attn.o_proj.weight[0, 0] = 1.0
        first.self_attn.o_proj.weight[0, head_dim] = 1.0
        model.model.norm.weight[0] = 1.0
        model.score.weight.zero_()
        model.score.weight[0, 0] = 1.0
    return model, save(model, tmp_path_factory.mktemp("mark_rm"))


@pytest.fixture(scope="module")
def loaded(lm, biased_judge, mark_reward_model):
    return {
        "lm": answers_lib.load_eval_model(lm[1]),
        "biased": answers_lib.load_eval_model(biased_judge[1]),
        "reward": answers_lib.load_eval_model(mark_reward_model[1]),
    }


def hf_chat_ids(folder, messages, add_generation_prompt):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# Batching helpers.


def test_bucket_lengths():
    assert [answers_lib.bucket_length(n) for n in (1, 16, 17, 24, 25, 33, 49, 65, 97, 200)] == [
        16,
        16,
        24,
        24,
        32,
        48,
        64,
        96,
        128,
        256,
    ]


def test_left_pad_and_length_batches():
    tokens_BT, mask_BT = answers_lib.left_pad([[5, 6], [7], []], 3, pad_id=9)
    np.testing.assert_array_equal(tokens_BT, [[9, 5, 6], [9, 9, 7], [9, 9, 9]])
    np.testing.assert_array_equal(mask_BT, [[0, 1, 1], [0, 0, 1], [0, 0, 0]])
    rows = [[1] * 3, [1] * 40, [1] * 20, [1] * 5, [1] * 17]
    assert answers_lib.length_batches(rows, 2) == [([1, 2], 48), ([4, 3], 24), ([0], 16)]


# Generation.


def test_greedy_answers_match_transformers_and_do_not_depend_on_batching(lm, loaded):
    model = loaded["lm"]
    prompts = [data.Prompt(text, "c") for text in INSTRUCTIONS]
    options = dict(max_new_tokens=NEW_TOKENS, temperature=0.0, seed=0)
    by_one = answers_lib.sample_answers(
        model.config, model.params, model.chat, prompts, batch_size=1, **options
    )
    by_three = answers_lib.sample_answers(
        model.config, model.params, model.chat, prompts, batch_size=BATCH, **options
    )
    assert by_one.token_ids == by_three.token_ids
    for k, text in enumerate(INSTRUCTIONS):
        ids = hf_chat_ids(lm[1], [{"role": "user", "content": text}], True)
        assert answers_lib.prompt_ids(model.chat, text) == ids
        with torch.no_grad():
            out = lm[0].generate(
                torch.tensor([ids]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=IM_END_ID,
                pad_token_id=PAD_ID,
            )
        expected = out[0, len(ids) :].tolist()
        stopped = IM_END_ID in expected
        assert by_one.stopped[k] == stopped
        assert by_one.token_ids[k] == (
            expected[: expected.index(IM_END_ID)] if stopped else expected
        )
        assert by_one.texts[k] == model.tokenizer.decode(by_one.token_ids[k], skip_special=True)


def test_stop_token_is_removed(stopper):
    model = answers_lib.load_eval_model(stopper[1])
    answers = answers_lib.sample_answers(
        model.config,
        model.params,
        model.chat,
        INSTRUCTIONS[:2],
        max_new_tokens=NEW_TOKENS,
        batch_size=BATCH,
    )
    assert answers.texts == ["", ""]
    assert answers.token_ids == [[], []]
    assert answers.stopped == [True, True]


# Reward-model judge.


def test_reward_model_judge_gives_the_rigged_verdicts(mark_reward_model, loaded):
    judge = loaded["reward"]
    model_answers = ["a#b", "x#", "plain", "text", "same", "both#"]
    baseline_answers = ["abc", "xy", "pl#in", "text2", "same", "#both"]
    result = judges.judge_pairs(
        judge,
        INSTRUCTIONS + ["Echo.", "Echo."],
        model_answers,
        baseline_answers,
        kind="reward_model",
        batch_size=BATCH,
        skip_identical=False,
    )
    # Scores are exactly 0 without MARK and positive with it.
    has_mark = lambda texts: np.array([MARK in t for t in texts])
    np.testing.assert_array_equal(np.array(result["score_model"]) > 0, has_mark(model_answers))
    np.testing.assert_array_equal(
        np.array(result["score_baseline"]) > 0, has_mark(baseline_answers)
    )
    assert [result["score_model"][i] for i in (2, 3, 4)] == [0.0, 0.0, 0.0]
    assert result["preference"][:5] == [1.0, 1.0, 0.0, 0.5, 0.5]
    # Both answers carry MARK: the higher score wins, whichever it is.
    sm, sb = result["score_model"][5], result["score_baseline"][5]
    assert result["preference"][5] == (1.0 if sm > sb else 0.0 if sm < sb else 0.5)
    # The scores are transformers' on the chat-formatted pairs.
    for i, answer in ((0, model_answers[0]), (2, baseline_answers[2]), (5, model_answers[5])):
        messages = [
            {"role": "user", "content": (INSTRUCTIONS + ["Echo.", "Echo."])[i]},
            {"role": "assistant", "content": answer},
        ]
        ids = hf_chat_ids(mark_reward_model[1], messages, False)
        assert judges.reward_model_rows(judge.chat, messages[0]["content"], answer) == ids
        with torch.no_grad():
            expected = mark_reward_model[0](torch.tensor([ids])).logits[0, 0].item()
        key = "score_model" if answer == model_answers[i] else "score_baseline"
        assert result[key][i] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_reward_model_win_rate_is_the_hand_count(loaded):
    model_answers = ["#1", "#2", "#3", "four", "five", "six"]
    baseline_answers = ["one", "two", "three", "#4", "5", "6"]
    categories = ["x", "x", "x", "y", "y", "y"]
    result = judges.judge_pairs(
        loaded["reward"],
        INSTRUCTIONS + ["Echo.", "Echo."],
        model_answers,
        baseline_answers,
        kind="reward_model",
        batch_size=BATCH,
    )
    assert result["preference"] == [1.0, 1.0, 1.0, 0.0, 0.5, 0.5]
    summary = winrate.summarize(result["preference"], categories, [1] * 6, [1] * 6, tie_value=0.0)
    assert summary["overall"]["win_rate"] == pytest.approx(100 * 3 / 6)
    assert summary["categories"]["x"]["win_rate"] == pytest.approx(100.0)
    assert summary["categories"]["y"]["win_rate"] == pytest.approx(0.0)
    assert (
        summary["overall"]["wins"],
        summary["overall"]["losses"],
        summary["overall"]["ties"],
    ) == (3, 1, 2)


# Pairwise judge.


def test_pairwise_orders_swap_the_answers(loaded):
    chat = loaded["lm"].chat
    first = judges.pairwise_rows(chat, SHORT_PAIRWISE, "Q?", "one", "two")
    second = judges.pairwise_rows(chat, SHORT_PAIRWISE, "Q?", "two", "one")
    assert first != second
    decode = lambda ids: chat.tokenizer.decode(ids)
    assert decode(first) == (
        "<|im_start|>user\nQ?\nA: one\nB: two\nBetter?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert decode(second) == (
        "<|im_start|>user\nQ?\nA: two\nB: one\nBetter?<|im_end|>\n<|im_start|>assistant\n"
    )


def hf_label_probability(model, folder, instruction, first, second):
    """transformers' P(label A | first shown as A), renormalized over the two labels."""
    content = SHORT_PAIRWISE.template.format(
        instruction=instruction, response_a=first, response_b=second, label_a="A", label_b="B"
    )
    ids = hf_chat_ids(folder, [{"role": "user", "content": content}], True)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double().numpy()
    return special.expit(logits[token_id("A")] - logits[token_id("B")])


def test_pairwise_preference_averages_both_orders_like_transformers(lm, loaded):
    model_answers = ["yes", "a long answer", "red", "x"]
    baseline_answers = ["no", "short", "blue", "y"]
    result = judges.judge_pairs(
        loaded["lm"],
        INSTRUCTIONS,
        model_answers,
        baseline_answers,
        kind="pairwise",
        batch_size=BATCH,
        pairwise_prompt=SHORT_PAIRWISE,
    )
    for i, instruction in enumerate(INSTRUCTIONS):
        p_first = hf_label_probability(
            lm[0], lm[1], instruction, model_answers[i], baseline_answers[i]
        )
        p_second = hf_label_probability(
            lm[0], lm[1], instruction, baseline_answers[i], model_answers[i]
        )
        assert result["p_model_as_a"][i] == pytest.approx(p_first, abs=1e-5)
        assert result["p_model_as_b"][i] == pytest.approx(1.0 - p_second, abs=1e-5)
        assert result["preference"][i] == pytest.approx((p_first + 1.0 - p_second) / 2, abs=1e-5)
        assert 0.0 < result["label_mass"][i] <= 1.0


def test_position_biased_judge_cancels_to_half(loaded):
    model_answers = ["good", "fine answer", "ok", "great"]
    baseline_answers = ["bad", "poor", "meh", "awful"]
    result = judges.judge_pairs(
        loaded["biased"],
        INSTRUCTIONS,
        model_answers,
        baseline_answers,
        kind="pairwise",
        batch_size=BATCH,
        pairwise_prompt=SHORT_PAIRWISE,
    )
    # Whichever answer is shown as A is preferred with the same probability sigmoid(margin).
    head = loaded["biased"].params["lm_head"]["kernel"]
    assert float(head[0, token_id("A")]) == pytest.approx(0.5)
    p_a = np.array(result["p_model_as_a"])
    assert np.all(p_a > 0.8)
    np.testing.assert_allclose(result["p_model_as_b"], 1.0 - p_a, atol=1e-6)
    np.testing.assert_allclose(result["preference"], 0.5, atol=1e-6)
    summary = winrate.summarize(result["preference"], ["c"] * 4, [1] * 4, [1] * 4)
    assert summary["overall"]["win_rate"] == pytest.approx(50.0, abs=1e-4)


def test_identical_answers_judged_as_ties_by_the_judges_too(loaded):
    answers = ["same answer", "again", "x", "y"]
    for kind, judge in (("pairwise", loaded["lm"]), ("reward_model", loaded["reward"])):
        result = judges.judge_pairs(
            judge,
            INSTRUCTIONS,
            answers,
            list(answers),
            kind=kind,
            pairwise_prompt=SHORT_PAIRWISE,
            skip_identical=False,
            batch_size=BATCH,
        )
        np.testing.assert_allclose(result["preference"], 0.5, atol=1e-6)
        skipped = judges.judge_pairs(judge, INSTRUCTIONS, answers, list(answers), kind=kind)
        assert skipped["preference"] == [0.5] * 4 and skipped["identical"] == [True] * 4


def test_wrong_judge_kind_is_explained(loaded):
    with pytest.raises(evaluate.UserError, match="sequence classifier"):
        judges.judge_pairs(loaded["lm"], ["q"], ["a"], ["b"], kind="reward_model")
    with pytest.raises(evaluate.UserError, match="reward_model"):
        judges.judge_pairs(loaded["reward"], ["q"], ["a"], ["b"], kind="pairwise")
    with pytest.raises(evaluate.UserError, match="single tokens"):
        judges.judge_pairs(
            loaded["lm"], ["q"], ["a"], ["b"], pairwise_prompt=PairwisePrompt(labels=("AB", "C"))
        )


# The whole evaluation.


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    categories = ["helpful_base", "koala", "helpful_base", "vicuna"]
    with open(path, "w") as f:
        for text, category in zip(INSTRUCTIONS, categories):
            f.write(json.dumps({"prompt": text, "category": category}) + "\n")
    return path


@pytest.fixture(scope="module")
def ifeval_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ifeval") / "ifeval.jsonl"
    records = [
        {
            "prompt": "Say hi in lowercase.",
            "instruction_id_list": ["change_case:english_lowercase"],
            "kwargs": [{}],
        },
        {
            "prompt": "Say hi without commas.",
            "instruction_id_list": ["punctuation:no_comma"],
            "kwargs": [{}],
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("kind", ["pairwise", "reward_model"])
def test_model_against_itself_is_all_ties(
    kind, lm, mark_reward_model, prompt_file, ifeval_file, tmp_path
):
    judge = lm[1] if kind == "pairwise" else mark_reward_model[1]
    summary = evaluate.evaluate(
        lm[1],
        lm[1],
        judge,
        prompt_file,
        judge_kind=kind,
        out_dir=tmp_path,
        max_new_tokens=NEW_TOKENS,
        temperature=0.0,
        batch_size=BATCH,
        n_boot=50,
        progress=False,
        pairwise_prompt=SHORT_PAIRWISE,
        ifeval=ifeval_file if kind == "pairwise" else None,
        log=lambda _: None,
    )
    overall = summary["overall"]
    assert overall["win_rate"] == 50.0 and overall["lc_win_rate"] == pytest.approx(50.0)
    assert (overall["wins"], overall["losses"], overall["ties"]) == (0, 0, 4)
    assert set(summary["categories"]) == {"helpful_base", "koala", "vicuna"}
    assert set(summary["wall_times_s"]) >= {"load", "generate model", "generate baseline", "judge"}
    records = [json.loads(line) for line in open(tmp_path / "answers.jsonl")]
    assert [r["preference"] for r in records] == [0.5] * 4
    assert all(r["output"] == r["baseline_output"] for r in records)
    assert [r["instruction"] for r in records] == INSTRUCTIONS
    for name in ("winrate.json", "winrate.md", "winrate.png"):
        assert (tmp_path / name).is_file()
    if kind == "pairwise":
        for role in ("model", "baseline"):
            assert (tmp_path / f"ifeval_{role}" / "ifeval.json").is_file()
            assert summary["ifeval"][role]["n_prompts"] == 2
        assert summary["ifeval"]["model"] == summary["ifeval"]["baseline"]
        assert "IFEval" in (tmp_path / "winrate.md").read_text()


def test_truncated_baseline_answers_are_prefixes(lm, biased_judge, prompt_file, tmp_path):
    summary = evaluate.evaluate(
        lm[1],
        lm[1],
        biased_judge[1],
        prompt_file,
        out_dir=tmp_path,
        max_new_tokens=NEW_TOKENS,
        baseline_max_new_tokens=BASELINE_TOKENS,
        temperature=0.0,
        batch_size=BATCH,
        n_boot=20,
        progress=False,
        pairwise_prompt=SHORT_PAIRWISE,
        log=lambda _: None,
    )
    records = [json.loads(line) for line in open(tmp_path / "answers.jsonl")]
    for r in records:
        assert r["output"].startswith(r["baseline_output"])
        if r["output"] != r["baseline_output"]:
            # A pure position bias: both orders recorded, averaging to a tie.
            assert r["judge"]["p_model_as_a"] > 0.8 and r["judge"]["p_model_as_b"] < 0.2
            assert r["preference"] == pytest.approx(0.5, abs=1e-6)
    assert summary["overall"]["win_rate"] == pytest.approx(50.0, abs=1e-4)
    assert summary["setup"]["names"]["baseline"].endswith(f"({BASELINE_TOKENS} tokens)")


def test_evaluate_policy_against_its_own_reference(loaded):
    model = loaded["lm"]
    summary = evaluate.evaluate_policy(
        model.config,
        model.params,
        model.params,
        model.chat,
        INSTRUCTIONS[:3],
        max_new_tokens=NEW_TOKENS,
        temperature=0.0,
        batch_size=BATCH,
        n_boot=20,
        pairwise_prompt=SHORT_PAIRWISE,
    )
    assert summary["overall"]["win_rate"] == 50.0 and summary["overall"]["ties"] == 3


def test_cli(lm, mark_reward_model, prompt_file, tmp_path, capsys):
    argv = [
        "eval",
        "--model",
        str(lm[1]),
        "--baseline",
        str(lm[1]),
        "--judge",
        str(mark_reward_model[1]),
        "--judge-kind",
        "reward_model",
        "--prompts",
        str(prompt_file),
        "--out",
        str(tmp_path),
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--baseline-max-new-tokens",
        str(BASELINE_TOKENS),
        "--temperature",
        "0",
        "--limit",
        "2",
        "--batch-size",
        str(BATCH),
        "--n-boot",
        "10",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    saved = json.loads((tmp_path / "winrate.json").read_text())
    assert saved["overall"]["n"] == 2
    assert saved["setup"]["sampling"]["max_new_tokens"] == {
        "model": NEW_TOKENS,
        "baseline": BASELINE_TOKENS,
    }
    assert "win rate" in capsys.readouterr().out


def test_majority_preferences_round_to_sides():
    rounded = evaluate.majority_preferences([0.7, 0.2, 0.5, None, 0.5000001])
    assert rounded[:3] == [1.0, 0.0, 0.5] and np.isnan(rounded[3]) and rounded[4] == 1.0
