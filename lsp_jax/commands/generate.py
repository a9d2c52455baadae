"""`lsp-jax generate`: sample completions of prompts from any model source.

Prompts are wrapped in the model's chat template (unless --raw), batched, left-padded to
one shape (one compilation for the whole run) and sampled with `lsp_jax.sampling`.
Completions are printed at the end, one block per prompt and sample.
"""

import json
import sys
import time
from pathlib import Path

from lsp_jax.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"
EPILOG = """\
examples:
  lsp-jax generate --model smollm2-135m-instruct --prompt "Name three rivers."
  lsp-jax generate --model path/to/hf_folder --prompts-file prompts.jsonl --num-samples 4
  lsp-jax generate --model model.gguf --raw --prompt "Once upon a time" --temperature 0

--temperature 0 decodes greedily. A prompts file holds one prompt per line, or JSON lines
with a "prompt" field.
"""


def add_arguments(parser):
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="Hugging Face folder, .gguf file, run checkpoint or named model "
        f"(default {DEFAULT_MODEL}).",
    )
    parser.add_argument("--prompt", action="append", default=[], help="A prompt (repeatable).")
    parser.add_argument("--prompts-file", help="Prompts: one per line, or JSONL with 'prompt'.")
    parser.add_argument("--system", help="System message for the chat template.")
    parser.add_argument("--raw", action="store_true", help="Use the prompt text as is.")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy.")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off.")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off.")
    parser.add_argument("--num-samples", type=int, default=1, help="Completions per prompt.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch-size", type=int, default=8, help="Prompts per compiled call (default 8)."
    )
    parser.add_argument(
        "--unroll-layers",
        action="store_true",
        help="Unrolled layers: ~25%% faster decoding on CPU but minutes to compile "
        "(default: scanned layers, seconds to compile).",
    )
    parser.epilog = EPILOG
    parser.formatter_class = __import__("argparse").RawDescriptionHelpFormatter


def read_prompts(path) -> list[str]:
    """Prompts of a file: JSON lines with a 'prompt' field, or one prompt per line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts-file {path} does not exist.")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number} is not valid JSON ({error}).") from None
            if not isinstance(record.get("prompt"), str):
                raise UserError(f"{path}:{number} has no string field 'prompt'.")
            prompts.append(record["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise UserError(f"--prompts-file {path} holds no prompts.")
    return prompts


def encode_prompts(texts, tokenizer, chat, *, raw: bool, system: str | None):
    """Token ids of each prompt: chat-formatted (with the generation prompt) or raw."""
    if raw:
        return [tokenizer.encode(text, add_special=True) for text in texts]
    head = [] if system is None else [{"role": "system", "content": system}]
    return [chat.render([*head, {"role": "user", "content": text}]) for text in texts]


def stop_ids(tokenizer, chat) -> tuple[int, ...]:
    """The tokenizer's stop ids and, for chat prompts, the template's end of turn."""
    ids = list(tokenizer.stop_ids)
    if chat is not None:
        ids.append(chat.end_of_turn_id)
    return tuple(dict.fromkeys(ids))


def check_args(args) -> None:
    """Refuses bad flag values before anything is loaded."""
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature}; use a value >= 0 (0 = greedy).")
    if args.num_samples < 1 or args.batch_size < 1:
        raise UserError("--num-samples and --batch-size must be at least 1.")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}; it must be at least 1.")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}; use a value in (0, 1] (1 = off).")
    if args.top_k < 0:
        raise UserError(f"--top-k {args.top_k}; use a value >= 0 (0 = off).")


def sampler_from_args(args, stops, pad_id):
    from lsp_jax.sampling import SamplerConfig

    check_args(args)
    return SamplerConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        greedy=args.temperature == 0,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_tokens=stops,
        pad_token=pad_id,
    )


def left_pad(rows, width, pad_id):
    import numpy as np

    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        tokens[i, width - len(row) :] = row
        mask[i, width - len(row) :] = True
    return tokens, mask


def generate(config, params, rows, sampler, *, num_samples, batch_size, seed):
    """Samples `num_samples` completions of every prompt (lists of ids), batch by batch
    with one shape. Returns a list per prompt of (ids, stopped) per sample."""
    import jax
    import numpy as np

    from lsp_jax.sampling import jit_sample

    width = max(map(len, rows))
    if width + sampler.max_new_tokens > config.max_position_embeddings:
        raise UserError(
            f"The longest prompt ({width} tokens) plus --max-new-tokens "
            f"{sampler.max_new_tokens} exceeds the model's context of "
            f"{config.max_position_embeddings} tokens; shorten it or lower --max-new-tokens."
        )
    batch_size = min(batch_size, len(rows))
    rng = jax.random.key(seed)
    results = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        # The last batch is filled up with copies so that every call has one shape.
        filled = chunk + [chunk[0]] * (batch_size - len(chunk))
        tokens, mask = left_pad(filled, width, sampler.pad_token)
        first_row = start * num_samples
        row_ids = np.arange(first_row, first_row + batch_size * num_samples, dtype=np.int32)
        out = jit_sample(
            config, params, tokens, mask, rng, sampler, group_size=num_samples, row_ids_B=row_ids
        )
        out_tokens, lengths, truncated = jax.device_get(
            (out.tokens_BT, out.lengths_B, out.truncated_B)
        )
        for p in range(len(chunk)):
            samples = []
            for b in range(p * num_samples, (p + 1) * num_samples):
                ids = out_tokens[b, : lengths[b]].tolist()
                stopped = not truncated[b]
                samples.append((ids[:-1] if stopped else ids, stopped))
            results.append(samples)
    return results


def print_completions(texts, results, tokenizer, out=None):
    """One block per prompt ("=== prompt i/n: text") holding one section per sample
    ("--- sample j/k (n tokens, stopped)") with the decoded completion."""
    out = out or sys.stdout
    for p, (text, samples) in enumerate(zip(texts, results)):
        print(f"=== prompt {p + 1}/{len(texts)}: {text}", file=out)
        for s, (ids, stopped) in enumerate(samples):
            ending = "stopped" if stopped else "hit --max-new-tokens"
            print(f"--- sample {s + 1}/{len(samples)} ({len(ids)} tokens, {ending})", file=out)
            print(tokenizer.decode(ids, skip_special=True), file=out)
        print(file=out)
    out.flush()


def run(args) -> int:
    texts = list(args.prompt)
    if args.prompts_file:
        texts += read_prompts(args.prompts_file)
    if not texts:
        raise UserError("No prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE.")
    check_args(args)
    import jax

    from lsp_jax.weights import sources

    started = time.perf_counter()
    tokenizer = sources.load_tokenizer(args.model)
    chat = None if args.raw else sources.load_chat_template(args.model, tokenizer=tokenizer)
    rows = encode_prompts(texts, tokenizer, chat, raw=args.raw, system=args.system)
    empty = [i + 1 for i, row in enumerate(rows) if not row]
    if empty:
        raise UserError(
            f"Prompt {empty[0]} is empty: with --raw it becomes no tokens at all, and the "
            "model needs at least one to continue. Give it some text."
        )
    pad_id = 0 if tokenizer.pad_id is None else int(tokenizer.pad_id)
    sampler = sampler_from_args(args, stop_ids(tokenizer, chat), pad_id)
    config, params = sources.load_model(args.model, scan_layers=not args.unroll_layers)
    params = jax.device_put(params)
    loaded = time.perf_counter()
    results = generate(
        config,
        params,
        rows,
        sampler,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    done = time.perf_counter()
    print_completions(texts, results, tokenizer)
    num_tokens = sum(len(ids) for samples in results for ids, _ in samples)
    print(
        f"[{len(texts)} prompts x {args.num_samples} samples, {num_tokens} tokens; "
        f"loading {loaded - started:.1f} s, compiling and sampling {done - loaded:.1f} s]",
        file=sys.stderr,
    )
    return 0
