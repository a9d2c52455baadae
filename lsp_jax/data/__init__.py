"""Prompt sets for evaluation and GRPO: JSONL, AlpacaEval JSON, TFDS, and the shipped set.

One entry point, `load_prompts(source)`, where `source` is

- `'shipped'`: the project's own prompt set (lsp_jax/data/prompts.jsonl), 260 instructions
  written for this project, in five categories that mirror AlpacaEval's subsets;
- a path ending in `.jsonl`: one JSON object per line with `prompt` and (optional)
  `category`;
- a path ending in `.json`: AlpacaEval's format, a JSON array of objects with `instruction`
  and (optional) `dataset` (extra fields such as `output` or `generator` are ignored), so the
  real 805-prompt AlpacaEval file can be dropped in;
- `'tfds:NAME'`: a TFDS dataset prepared in the array_record format, read through
  `tfds.data_source` (no TensorFlow needed). `lsp_jax.data.tfds_prompts` builds the shipped set as
  the TFDS dataset `lsp_prompts`.

The shipped categories mirror AlpacaEval's five subsets (the names are kept so per-category
results line up with AlpacaEval reports); the prompts themselves are original:

| category       | mirrors AlpacaEval subset | kind of instruction                           |
|----------------|---------------------------|-----------------------------------------------|
| helpful_base   | helpful_base              | everyday help and advice                      |
| koala          | koala                     | open questions, explanations, opinions        |
| oasst          | oasst                     | practical how-to (computing, making, fixing)  |
| selfinstruct   | selfinstruct              | varied task instructions, often with an input |
| vicuna         | vicuna                    | knowledge, writing and reasoning              |
"""

import dataclasses
import json
import os

from lsp_jax.errors import UserError

SHIPPED = "shipped"
DATA_DIR = os.path.dirname(os.path.abspath(__file__))  # The shipped files sit beside this module.
SHIPPED_PROMPTS = os.path.join(DATA_DIR, "prompts.jsonl")
DEFAULT_CATEGORY = "all"
TFDS_PREFIX = "tfds:"

# Category name -> what it mirrors; the keys are AlpacaEval's `dataset` values.
CATEGORIES = {
    "helpful_base": "everyday help and advice",
    "koala": "open questions, explanations, opinions",
    "oasst": "practical how-to",
    "selfinstruct": "varied task instructions",
    "vicuna": "knowledge, writing and reasoning",
}


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One instruction and the category it is reported under."""

    text: str
    category: str = DEFAULT_CATEGORY


def load_prompts(source=SHIPPED, *, data_dir=None, split="test", limit=None):
    """Loads a prompt set.

    Args:
      source: 'shipped', a `.jsonl` or `.json` (AlpacaEval) path, or 'tfds:NAME'.
      data_dir: TFDS data directory (only for 'tfds:NAME'; None uses TFDS's default).
      split: TFDS split (only for 'tfds:NAME').
      limit: keep only the first `limit` prompts (None keeps all).

    Returns:
      list[Prompt] in file order (TFDS: in the order of the `index` feature if present).
    """
    source = os.fspath(source)
    if source == SHIPPED:
        prompts = read_jsonl_prompts(SHIPPED_PROMPTS)
    elif source.startswith(TFDS_PREFIX):
        prompts = read_tfds_prompts(source[len(TFDS_PREFIX) :], data_dir=data_dir, split=split)
    elif source.endswith(".jsonl"):
        prompts = read_jsonl_prompts(source)
    elif source.endswith(".json"):
        prompts = read_alpaca_eval_json(source)
    else:
        raise UserError(
            f"Unknown prompt source {source!r}: use 'shipped', a .jsonl file (fields 'prompt', "
            "'category'), an AlpacaEval .json file (fields 'instruction', 'dataset') or "
            "'tfds:NAME' with a data_dir."
        )
    if not prompts:
        raise UserError(f"The prompt source {source!r} holds no prompts.")
    return prompts if limit is None else prompts[:limit]


def _record_to_prompt(record, where, text_field, category_field):
    """Checks one parsed record and turns it into a Prompt; `where` names file and line."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    if text_field not in record:
        raise UserError(
            f"{where}: missing field {text_field!r} (each record needs {text_field!r}"
            f" and optionally {category_field!r}); found fields {sorted(record)}."
        )
    text = record[text_field]
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: field {text_field!r} must be a non-empty string.")
    category = record.get(category_field, DEFAULT_CATEGORY)
    if not isinstance(category, str) or not category:
        raise UserError(f"{where}: field {category_field!r} must be a non-empty string.")
    return Prompt(text=text, category=category)


def _open_text(path):
    if not os.path.isfile(path):
        raise UserError(f"Prompt file {path} does not exist: check the path.")
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_jsonl_prompts(path):
    """Reads a JSONL prompt file (`prompt`, optional `category`); blank lines are skipped."""
    prompts = []
    for line_number, line in enumerate(_open_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg}).") from None
        prompts.append(_record_to_prompt(record, where, "prompt", "category"))
    return prompts


def _iter_json_array(text, path):
    """Yields (record, line_number) for each element of a top-level JSON array."""
    decoder = json.JSONDecoder()
    position = _skip_space(text, 0)
    if not text.startswith("[", position):
        raise UserError(f"{path}: an AlpacaEval file must be a JSON array of objects.")
    position = _skip_space(text, position + 1)
    if text.startswith("]", position):
        return
    while True:
        line_number = text.count("\n", 0, position) + 1
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}).") from None
        yield record, line_number
        position = _skip_space(text, position)
        if text.startswith("]", position):
            return
        if not text.startswith(",", position):
            line_number = text.count("\n", 0, position) + 1
            raise UserError(f"{path}, line {line_number}: expected ',' or ']' in the array.")
        position = _skip_space(text, position + 1)


def _skip_space(text, position):
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def read_alpaca_eval_json(path):
    """Reads AlpacaEval's JSON format: an array of {'instruction', 'dataset', ...}."""
    text = _open_text(path)
    return [
        _record_to_prompt(record, f"{path}, line {line_number}", "instruction", "dataset")
        for record, line_number in _iter_json_array(text, path)
    ]


def _decode(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_tfds_prompts(name, *, data_dir=None, split="test"):
    """Reads a prepared array_record TFDS dataset with `tfds.data_source` (no TensorFlow).

    The dataset needs a text feature `prompt` (or `instruction`); `category` (or `dataset`)
    and an integer `index` (for ordering) are optional.
    """
    import tensorflow_datasets as tfds  # Imported here: slow to import, and optional.

    try:
        source = tfds.data_source(name, data_dir=data_dir, split=split)
    except Exception as e:  # TFDS raises several types for a missing or unprepared dataset.
        raise UserError(
            f"Could not open the TFDS dataset {name!r} (split {split!r}) in data_dir "
            f"{data_dir or 'TFDS default'}: {type(e).__name__}: {str(e).splitlines()[0]}. "
            "Prepare it in the array_record format first (for the shipped set: "
            "`python -m lsp_jax.data.tfds_prompts --data_dir DIR`)."
        ) from None
    records = [source[i] for i in range(len(source))]
    if records and "index" in records[0]:
        records.sort(key=lambda record: int(record["index"]))
    prompts = []
    for i, record in enumerate(records):
        text_field = "prompt" if "prompt" in record else "instruction"
        category_field = "category" if "category" in record else "dataset"
        decoded = {key: _decode(value) for key, value in record.items()}
        where = f"TFDS dataset {name!r} (split {split!r}), example {i}"
        prompts.append(_record_to_prompt(decoded, where, text_field, category_field))
    return prompts


def write_prompts_jsonl(prompts, path):
    """Writes prompts as JSONL with `prompt` and `category` (the shipped format)."""
    with open(path, "w", encoding="utf-8") as f:
        for prompt in prompts:
            record = {"prompt": prompt.text, "category": prompt.category}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_alpaca_eval_json(prompts, path, *, outputs=None, generator=None):
    """Writes prompts (and optionally one output each) in AlpacaEval's JSON format."""
    if outputs is not None and len(outputs) != len(prompts):
        raise ValueError(f"{len(outputs)} outputs for {len(prompts)} prompts.")
    records = []
    for i, prompt in enumerate(prompts):
        record = {"instruction": prompt.text, "dataset": prompt.category}
        if outputs is not None:
            record.update(output=outputs[i], generator=generator)
        records.append(record)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=2)
        f.write("\n")


def write_answers(
    path,
    prompts,
    outputs,
    *,
    generator,
    baseline_outputs=None,
    baseline_generator=None,
    preferences=None,
):
    """Writes one JSONL line per prompt: the answers and, if given, the judge's preference.

    Each line has `instruction`, `dataset`, `output`, `generator` (AlpacaEval's field names),
    plus `baseline_output`, `baseline_generator` and `preference` (1 model better, 0 baseline
    better, 0.5 tie, null when the judge gave no verdict) when those are given.
    """
    columns = {"output": outputs, "baseline_output": baseline_outputs, "preference": preferences}
    for column, values in columns.items():
        if values is not None and len(values) != len(prompts):
            raise ValueError(f"{len(values)} values of {column} for {len(prompts)} prompts.")
    with open(path, "w", encoding="utf-8") as f:
        for i, prompt in enumerate(prompts):
            record = {"instruction": prompt.text, "dataset": prompt.category}
            record.update(output=outputs[i], generator=generator)
            if baseline_outputs is not None:
                record.update(
                    baseline_output=baseline_outputs[i], baseline_generator=baseline_generator
                )
            if preferences is not None:
                record["preference"] = _json_preference(preferences[i])
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _json_preference(value):
    value = None if value is None else float(value)
    return None if value is None or value != value else value  # NaN -> null


def category_counts(prompts):
    """Returns {category: number of prompts} in first-seen order."""
    counts = {}
    for prompt in prompts:
        counts[prompt.category] = counts.get(prompt.category, 0) + 1
    return counts
