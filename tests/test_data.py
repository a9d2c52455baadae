"""Prompt sets: the shipped set, and JSONL, AlpacaEval JSON and TFDS loading it identically."""

import glob
import json
import math
import os
import sys

import pytest

from lsp_jax import data
from lsp_jax.errors import UserError


@pytest.fixture(scope="module")
def shipped():
    return data.load_prompts("shipped")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    from lsp_jax.data import tfds_prompts

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    source = tfds_prompts.build(data_dir)
    assert source == "tfds:lsp_prompts"
    return data_dir


def test_shipped_set(shipped):
    assert len(shipped) >= 250
    counts = data.category_counts(shipped)
    assert set(counts) == set(data.CATEGORIES)
    assert min(counts.values()) >= 50
    assert len({p.text for p in shipped}) == len(shipped)  # no duplicates
    # Interleaved: any prefix of 5k prompts holds k prompts of each category.
    assert data.category_counts(shipped[:25]) == dict.fromkeys(data.CATEGORIES, 5)


def test_jsonl_round_trip(shipped, tmp_path):
    path = str(tmp_path / "copy.jsonl")
    data.write_prompts_jsonl(shipped, path)
    assert data.load_prompts(path) == shipped


def test_alpaca_eval_json_loads_identically(shipped, tmp_path):
    path = str(tmp_path / "alpaca_eval.json")
    data.write_alpaca_eval_json(shipped, path, outputs=["x"] * len(shipped), generator="g")
    with open(path) as f:
        records = json.load(f)
    assert records[0] == {
        "instruction": shipped[0].text,
        "dataset": shipped[0].category,
        "output": "x",
        "generator": "g",
    }
    assert data.load_prompts(path) == shipped


def test_alpaca_eval_json_as_released(tmp_path):
    # AlpacaEval's file: a compact array with extra fields; 'dataset' names the subset.
    path = tmp_path / "eval.json"
    path.write_text(
        json.dumps(
            [
                {
                    "dataset": "helpful_base",
                    "instruction": "Hi?",
                    "output": "Hello.",
                    "generator": "m",
                },
                {"dataset": "vicuna", "instruction": "Sum 2+2.", "output": "4", "generator": "m"},
            ]
        )
    )
    assert data.load_prompts(str(path)) == [
        data.Prompt("Hi?", "helpful_base"),
        data.Prompt("Sum 2+2.", "vicuna"),
    ]


def test_tfds_data_source_loads_identically(shipped, tfds_dir):
    files = glob.glob(os.path.join(tfds_dir, "lsp_prompts", "*", "*.array_record*"))
    assert files, "the dataset should be written in the array_record format"
    assert data.load_prompts("tfds:lsp_prompts", data_dir=tfds_dir) == shipped
    # Neither building nor reading pulled TensorFlow in.
    assert "tensorflow" not in sys.modules


def test_tfds_missing_dataset(tfds_dir):
    with pytest.raises(UserError, match="'no_such_prompts'.*array_record"):
        data.load_prompts("tfds:no_such_prompts", data_dir=tfds_dir)


def test_limit(shipped):
    assert data.load_prompts("shipped", limit=7) == shipped[:7]


def test_jsonl_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [{"prompt": "a", "category": "c"}, {}, {"instruction": "b", "category": "c"}]
    path.write_text("\n".join(json.dumps(line) for line in lines[::2]) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl, line 2: missing field 'prompt'"):
        data.load_prompts(str(path))


def test_jsonl_bad_json_and_types(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b",\n')
    with pytest.raises(UserError, match=r"broken\.jsonl, line 3: not valid JSON"):
        data.load_prompts(str(path))
    path.write_text('{"prompt": 5}\n')
    with pytest.raises(UserError, match="line 1: field 'prompt' must be a non-empty string"):
        data.load_prompts(str(path))


def test_jsonl_category_optional(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text('{"prompt": "a"}\n')
    assert data.load_prompts(str(path)) == [data.Prompt("a", data.DEFAULT_CATEGORY)]


def test_alpaca_json_missing_field_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "dataset": "d"},\n  {"dataset": "d"}\n]\n')
    with pytest.raises(UserError, match=r"bad\.json, line 3: missing field 'instruction'"):
        data.load_prompts(str(path))
    path.write_text('{"instruction": "a"}')
    with pytest.raises(UserError, match="must be a JSON array"):
        data.load_prompts(str(path))
    path.write_text('[\n{"instruction": "a"}\n{"instruction": "b"}]')
    with pytest.raises(UserError, match="line 3: expected ',' or ']'"):
        data.load_prompts(str(path))


def test_unknown_source_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="Unknown prompt source"):
        data.load_prompts(str(tmp_path / "prompts.csv"))
    with pytest.raises(UserError, match="does not exist"):
        data.load_prompts(str(tmp_path / "nope.jsonl"))


def test_write_answers(shipped, tmp_path):
    prompts = shipped[:3]
    path = str(tmp_path / "answers.jsonl")
    data.write_answers(
        path,
        prompts,
        ["a0", "a1", "a2"],
        generator="m",
        baseline_outputs=["b0", "b1", "b2"],
        baseline_generator="base",
        preferences=[1.0, math.nan, 0.5],
    )
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    assert rows[1] == {
        "instruction": prompts[1].text,
        "dataset": prompts[1].category,
        "output": "a1",
        "generator": "m",
        "baseline_output": "b1",
        "baseline_generator": "base",
        "preference": None,
    }
    assert [row["preference"] for row in rows] == [1.0, None, 0.5]
