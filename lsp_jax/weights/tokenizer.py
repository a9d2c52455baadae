"""Tokenizers behind one interface: HF tokenizer.json, GGUF-embedded BPE, Llama-3
tiktoken files and sentencepiece models.

Stop tokens come from the model's files (generation_config.json, config.json,
tokenizer_config.json or GGUF metadata), never from a per-model table. Special tokens
written in text (e.g. "<|im_end|>") are parsed as their single ids, as transformers does.
"""

import base64
import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from lsp_jax.errors import UserError

# Llama-3's pre-tokenizer split (the regex of Meta's tiktoken tokenizer).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
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
# GGUF `tokenizer.ggml.pre` values whose split is Llama-3's.
_GGUF_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")
_GGUF_GPT2_PRE = ("gpt-2", "gpt2", "default")
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4
_GGUF_NAMED_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
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


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Token ids a sampler and a chat template need (None when the model has none), and
    the special tokens a chat template reads by name (None: the files name none)."""

    bos_id: int | None
    eos_ids: tuple[int, ...]
    pad_id: int | None
    named_tokens: dict[str, str | None] = dataclasses.field(default_factory=dict)


class Tokenizer:
    """Text <-> token ids.

    Attributes:
      vocab_size: number of ids (including special tokens).
      bos_id: beginning-of-sequence id, or None.
      eos_ids: the stop ids (end of text and end of turn), a tuple.
      pad_id: padding id (the first stop id when the model names none).
      special_tokens: special token string -> id.
      chat_template: the Jinja chat template shipped with the tokenizer, or None.
      named_tokens: the special tokens a chat template reads by name ('bos_token',
        'eos_token', ...) as strings: as the tokenizer files name them, else the strings
        of bos_id and the first stop id.
      add_bos: whether `encode(..., add_special=True)` prepends BOS.
    """

    vocab_size: int
    special_tokens: dict[str, int]
    chat_template: str | None = None
    add_bos: bool = False
    source: str = ""

    def _set_ids(self, ids: SpecialIds) -> None:
        self.bos_id = ids.bos_id
        self.eos_ids = tuple(ids.eos_ids)
        self.pad_id = ids.pad_id if ids.pad_id is not None else next(iter(self.eos_ids), None)
        named = dict(ids.named_tokens)
        defaults = {"bos_token": self.bos_id, "eos_token": next(iter(self.eos_ids), None)}
        for name, token_id in defaults.items():
            if name not in named and token_id is not None:
                named[name] = self._string_of(token_id)
        self.named_tokens = {name: token for name, token in named.items() if token is not None}

    def _string_of(self, token_id: int) -> str:
        for token, i in self.special_tokens.items():
            if i == token_id:
                return token
        return self.decode([token_id])

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self.eos_ids

    def token_id(self, token: str) -> int:
        """The id of a special token given as its string, e.g. '<|im_end|>'."""
        if token not in self.special_tokens:
            known = ", ".join(sorted(self.special_tokens)[:12])
            raise UserError(
                f"The tokenizer of {self.source or 'this model'} has no special token "
                f"{token!r} (it has e.g. {known})."
            )
        return self.special_tokens[token]

    def has_token(self, token: str) -> bool:
        return token in self.special_tokens

    def encode(self, text: str, *, add_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids.
        `add_special` adds what the tokenizer adds to a sequence (BOS for Llama-3)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.source!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_ids={self.eos_ids}, pad_id={self.pad_id})"
        )


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from tokenizer.json, or built from a GGUF vocabulary)."""

    def __init__(self, backend, ids: SpecialIds, *, chat_template=None, source=""):
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {
            t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special
        }
        self.chat_template = chat_template
        self.source = source
        self._set_ids(ids)
        # Whatever the config files say, BOS is added iff the post-processor adds it.
        probe = backend.encode("a", add_special_tokens=True).ids
        self.add_bos = bool(probe) and probe[0] == self.bos_id

    def encode(self, text: str, *, add_special: bool = False) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special).ids)

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)


class _SplitSpecials:
    """Encodes text around special-token strings for backends that do not parse them."""

    special_tokens: dict[str, int]

    def _split(self, text: str):
        if not self.special_tokens:
            return [text]
        if not hasattr(self, "_pattern"):
            alternatives = sorted(self.special_tokens, key=len, reverse=True)
            self._pattern = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        return [piece for piece in self._pattern.split(text) if piece]


class TiktokenTokenizer(_SplitSpecials, Tokenizer):
    """A Llama-3 `tokenizer.model` (tiktoken BPE: base64 token and rank per line)."""

    def __init__(self, encoding, ids: SpecialIds, *, chat_template=None, source=""):
        self.encoding = encoding
        self.vocab_size = encoding.n_vocab
        self.special_tokens = dict(encoding._special_tokens)
        self.chat_template = chat_template
        self.add_bos = ids.bos_id is not None
        self.source = source
        self._set_ids(ids)

    def encode(self, text: str, *, add_special: bool = False) -> list[int]:
        ids = [self.bos_id] if add_special and self.add_bos else []
        return ids + self.encoding.encode(text, allowed_special="all", disallowed_special=())

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            special = set(self.special_tokens.values())
            ids = [i for i in ids if i not in special]
        return self.encoding.decode(ids, errors="replace")


class SentencePieceTokenizer(_SplitSpecials, Tokenizer):
    """A sentencepiece `.model` file. Control and unknown pieces (<s>, </s>, <unk>) written
    in text are parsed as their ids; each stretch between them is encoded on its own."""

    def __init__(self, processor, ids: SpecialIds, *, chat_template=None, source=""):
        self.processor = processor
        self.vocab_size = processor.get_piece_size()
        self.special_tokens = {
            processor.id_to_piece(i): i
            for i in range(self.vocab_size)
            if processor.is_control(i) or processor.is_unknown(i)
        }
        self.chat_template = chat_template
        self.add_bos = ids.bos_id is not None
        self.source = source
        self._set_ids(ids)

    def encode(self, text: str, *, add_special: bool = False) -> list[int]:
        ids = [self.bos_id] if add_special and self.add_bos else []
        for piece in self._split(text):
            if piece in self.special_tokens:
                ids.append(self.special_tokens[piece])
            else:
                ids.extend(self.processor.encode(piece))
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        special = set(self.special_tokens.values())
        parts, run = [], []
        for i in (int(i) for i in ids):
            if i in special:
                parts.append(self.processor.decode(run))
                run = []
                if not skip_special:
                    parts.append(self.processor.id_to_piece(i))
            else:
                run.append(i)
        parts.append(self.processor.decode(run))
        return "".join(parts)


# Loading.


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


def load_gguf_tokenizer(path_or_file) -> HFTokenizer:
    """The byte-level BPE tokenizer embedded in a GGUF file (tokenizer.ggml.model 'gpt2'),
    rebuilt with the `tokenizers` library. Stop ids: eos, eot and eom from the metadata."""
    from lsp_jax.weights.gguf import GGUFFile, _tokenizer_ids, read_gguf

    file = path_or_file if isinstance(path_or_file, GGUFFile) else read_gguf(path_or_file)
    meta = file.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(
            f"{file.path} embeds a {kind!r} tokenizer; lsp_jax reads only byte-level BPE "
            f"('gpt2') GGUF tokenizers. Point --model at a folder with the model's "
            f"tokenizer.json instead."
        )
    fields = _tokenizer_ids(meta)
    tokens = meta["tokenizer.ggml.tokens"]
    named = {}  # As transformers names them for a GGUF: the token of each metadata id.
    for name, key in _GGUF_NAMED_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        named[name] = None if token_id is None else tokens[int(token_id)]
    ids = SpecialIds(fields["bos_token_id"], fields["eos_token_ids"], fields["pad_token_id"], named)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    backend = build_byte_level_bpe(
        meta["tokenizer.ggml.tokens"],
        meta.get("tokenizer.ggml.merges", []),
        meta.get("tokenizer.ggml.token_type"),
        pre=meta.get("tokenizer.ggml.pre"),
        bos_id=ids.bos_id if add_bos else None,
        source=file.path,
    )
    chat_template = meta.get("tokenizer.chat_template")
    return HFTokenizer(backend, ids, chat_template=chat_template, source=file.path)


def build_byte_level_bpe(tokens, merges, token_types=None, *, pre=None, bos_id=None, source=""):
    """A `tokenizers.Tokenizer` for a GPT-2-style byte-level BPE vocabulary.

    Args:
      tokens: token strings in byte-level spelling ('Ġthe'), index = id.
      merges: "left right" strings, best first.
      token_types: GGUF token types per id; CONTROL (3) tokens become special tokens,
        USER_DEFINED (4) tokens plain added tokens (both matched whole in text).
      pre: the GGUF pre-tokenizer name (tokenizer.ggml.pre).
      bos_id: prepend this id when encoding with special tokens.
    """
    from tokenizers import AddedToken, decoders, models, processors
    from tokenizers import Tokenizer as Backend

    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    llama3 = pre in _GGUF_LLAMA3_PRE
    model = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=llama3)
    backend = Backend(model)
    backend.pre_tokenizer = _gguf_pre_tokenizer(pre, source)
    backend.decoder = decoders.ByteLevel()
    types = list(token_types) if token_types is not None else [1] * len(tokens)
    added = lambda kind, special: [
        AddedToken(tokens[i], special=special, normalized=False)
        for i, t in enumerate(types)
        if t == kind
    ]
    backend.add_special_tokens(added(_GGUF_CONTROL, True))
    backend.add_tokens(added(_GGUF_USER_DEFINED, False))
    if bos_id is not None:
        bos = tokens[bos_id]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return backend


def _gguf_pre_tokenizer(pre, source):
    """How text is split before BPE, per llama.cpp's pre-tokenizer name."""
    from tokenizers import Regex, pre_tokenizers

    if pre in (None, *_GGUF_GPT2_PRE):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # GPT-2's split after isolating every digit (SmolLM's tokenizer.json).
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _GGUF_LLAMA3_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    supported = sorted({*_GGUF_GPT2_PRE, "smollm", *_GGUF_LLAMA3_PRE})
    raise UserError(
        f"{source}: GGUF pre-tokenizer {pre!r} is not supported (supported: "
        f"{', '.join(supported)}); its text splitting would differ from the model's."
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
