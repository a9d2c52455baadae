"""Tokenizers from files: tokenizer.json, GGUF, Llama-3 tiktoken and sentencepiece, picked
by the file; and the files that let transformers load one of them.

Stop tokens come from the model's files (generation_config.json, config.json,
tokenizer_config.json or GGUF metadata), never from a per-model table.
"""

import base64
import dataclasses
import json
import os
from pathlib import Path

from lsp_jax.errors import UserError
from lsp_jax.weights.gguf_tokenizer import load_gguf_tokenizer
from lsp_jax.weights.tokenizer import (
    LLAMA3_SPLIT_PATTERN,
    HFTokenizer,
    SentencePieceTokenizer,
    SpecialIds,
    TiktokenTokenizer,
    Tokenizer,
)

# Llama-3's special tokens, numbered after the base vocabulary of a tiktoken file.
LLAMA3_NUM_SPECIAL = 256
# The named Llama-3.1/3.2 special tokens by offset after the base vocabulary; every other
# offset k is <|reserved_special_token_{j}|>, numbered in order.
LLAMA3_NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}
# The special tokens transformers passes to a chat template by name (bos_token, ...).
TEMPLATE_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def load_tokenizer_file(path, *, model_folder=None) -> Tokenizer:
    """A tokenizer from one file: tokenizer.json, a GGUF file, a Llama-3 tiktoken
    tokenizer.model or a sentencepiece .model. Stop/pad ids and the chat template are
    read from `model_folder` (default: the file's folder) when it has HF json files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"Tokenizer file not found: {path}")
    folder = Path(model_folder) if model_folder else path.parent
    if path.suffix == ".json":
        return _load_tokenizer_json(path, folder)
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:4] == b"GGUF":
        return load_gguf_tokenizer(path)
    if _looks_like_tiktoken(head):
        return load_tiktoken(path, model_folder=folder)
    return load_sentencepiece(path, model_folder=folder)


def load_folder_tokenizer(folder) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder: tokenizer.json, else tokenizer.model
    (sentencepiece or tiktoken), else original/tokenizer.model (Meta's layout)."""
    folder = Path(folder).expanduser()
    for name in ("tokenizer.json", "tokenizer.model", "original/tokenizer.model"):
        if (folder / name).is_file():
            return load_tokenizer_file(folder / name, model_folder=folder)
    raise UserError(
        f"{folder} has no tokenizer: expected tokenizer.json, tokenizer.model or "
        f"original/tokenizer.model. Copy the tokenizer files of the base model into it."
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}).") from None


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _token_string(value) -> str | None:
    """A tokenizer_config.json special token: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _folder_ids(folder: Path, lookup) -> SpecialIds:
    """bos/stop/pad ids from config.json and generation_config.json (the stop ids are
    both files' eos ids, in order), else from tokenizer_config.json's token strings."""
    config = _read_json(folder / "config.json")
    generation = _read_json(folder / "generation_config.json")
    tok_config = _read_json(folder / "tokenizer_config.json")

    def from_string(key):
        token = _token_string(tok_config.get(key))
        return None if token is None else lookup(token)

    eos = list(
        dict.fromkeys(
            _as_list(config.get("eos_token_id")) + _as_list(generation.get("eos_token_id"))
        )
    )
    if not eos and from_string("eos_token") is not None:
        eos = [from_string("eos_token")]
    bos = generation.get("bos_token_id", config.get("bos_token_id"))
    if bos is None:
        bos = from_string("bos_token")
    pad = config.get("pad_token_id", generation.get("pad_token_id"))
    if pad is None:
        pad = from_string("pad_token")
    return SpecialIds(bos, tuple(eos), pad, _named_tokens(folder, tok_config))


def _named_tokens(folder: Path, tok_config: dict) -> dict[str, str | None]:
    """The special tokens by name as transformers reads them: tokenizer_config.json, else
    the legacy special_tokens_map.json."""
    legacy = _read_json(folder / "special_tokens_map.json")
    named = {}
    for name in TEMPLATE_TOKEN_NAMES:
        for source in (tok_config, legacy):
            if name in source:
                named[name] = _token_string(source[name])
                break
    return named


def _chat_template_of(folder: Path) -> str | None:
    """The chat template from tokenizer_config.json or chat_template.jinja."""
    template = _read_json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # Named templates: take "default".
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def _load_tokenizer_json(path: Path, folder: Path) -> HFTokenizer:
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_file(str(path))
    except Exception as error:  # The tokenizers library raises plain Exceptions.
        raise UserError(f"{path} is not a valid tokenizer.json ({error}).") from None
    ids = _folder_ids(folder, backend.token_to_id)
    return HFTokenizer(backend, ids, chat_template=_chat_template_of(folder), source=str(path))


def _looks_like_tiktoken(head: bytes) -> bool:
    line = head.split(b"\n", 1)[0].strip()
    parts = line.split(b" ")
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except ValueError:
        return False
    return True


def read_tiktoken_ranks(path) -> dict[bytes, int]:
    """The mergeable ranks of a tiktoken BPE file (base64 token, space, rank per line)."""
    ranks = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise UserError(
                    f"{path} line {number} is not '<base64 token> <rank>'; it is not a "
                    f"tiktoken BPE file."
                ) from None
    return ranks


def llama3_special_tokens(num_base: int) -> dict[str, int]:
    """Llama-3's 256 special tokens, numbered after the base vocabulary."""
    specials, reserved = {}, 0
    for offset in range(LLAMA3_NUM_SPECIAL):
        name = LLAMA3_NAMED_SPECIALS.get(offset)
        if name is None:
            name = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
        specials[name] = num_base + offset
    return specials


def load_tiktoken(path, *, model_folder=None, special_tokens=None) -> TiktokenTokenizer:
    """A Llama-3 tiktoken `tokenizer.model` read from a local file (nothing downloaded).

    Special tokens default to Llama-3's 256; stop ids come from the folder's
    generation_config.json / config.json, else <|end_of_text|> and <|eot_id|>.
    """
    import tiktoken

    path = Path(path)
    ranks = read_tiktoken_ranks(path)
    specials = special_tokens or llama3_special_tokens(len(ranks))
    encoding = tiktoken.Encoding(
        name=path.stem,
        pat_str=LLAMA3_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=specials,
    )
    folder = Path(model_folder) if model_folder else path.parent
    ids = _folder_ids(folder, specials.get)
    if not ids.eos_ids:
        eos = [specials[t] for t in ("<|end_of_text|>", "<|eot_id|>") if t in specials]
        ids = dataclasses.replace(ids, eos_ids=tuple(eos))
    if ids.bos_id is None:
        ids = dataclasses.replace(ids, bos_id=specials.get("<|begin_of_text|>"))
    return TiktokenTokenizer(
        encoding, ids, chat_template=_chat_template_of(folder), source=str(path)
    )


def load_sentencepiece(path, *, model_folder=None) -> SentencePieceTokenizer:
    """A sentencepiece model; ids from the folder's HF json files, else the model's own."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as error:
        raise UserError(
            f"{path} is neither a sentencepiece model nor a tiktoken BPE file ({error})."
        ) from None
    folder = Path(model_folder) if model_folder else Path(path).parent

    def lookup(token):
        i = processor.piece_to_id(token)
        return None if i == processor.unk_id() and token != processor.id_to_piece(i) else i

    ids = _folder_ids(folder, lookup)
    own = lambda i: None if i < 0 else i  # sentencepiece says -1 for "none".
    ids = dataclasses.replace(
        ids,
        bos_id=ids.bos_id if ids.bos_id is not None else own(processor.bos_id()),
        eos_ids=ids.eos_ids or tuple(i for i in [own(processor.eos_id())] if i is not None),
        pad_id=ids.pad_id if ids.pad_id is not None else own(processor.pad_id()),
    )
    return SentencePieceTokenizer(
        processor, ids, chat_template=_chat_template_of(folder), source=str(path)
    )


def save_hf_tokenizer_files(tokenizer: Tokenizer, folder, *, model_max_length=None) -> list[str]:
    """Writes tokenizer.json (or copies the tokenizer.model) and tokenizer_config.json so
    that transformers' AutoTokenizer loads the tokenizer. Returns the written paths."""
    folder = Path(folder)
    written = []
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.backend.save(str(folder / "tokenizer.json"))
        written.append(folder / "tokenizer.json")
    else:
        raise UserError(
            f"Writing a {type(tokenizer).__name__} ({tokenizer.source}) as a Hugging Face "
            f"tokenizer is not supported; copy its tokenizer files by hand."
        )
    names = {i: s for s, i in tokenizer.special_tokens.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    for key, token_id in (
        ("bos_token", tokenizer.bos_id),
        ("eos_token", next(iter(tokenizer.eos_ids), None)),
        ("pad_token", tokenizer.pad_id),
    ):
        if token_id is not None:
            config[key] = names.get(token_id) or tokenizer.decode([token_id])
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written.append(path)
    return [os.fspath(p) for p in written]
