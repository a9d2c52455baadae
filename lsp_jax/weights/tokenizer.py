"""The Tokenizer interface and its implementations over the `tokenizers`, tiktoken and
sentencepiece libraries (loading them from files: lsp_jax.weights.tokenizer_files).

Special tokens written in text (e.g. "<|im_end|>") are parsed as their single ids, as
transformers does.
"""

import dataclasses
import re
from collections.abc import Sequence

from lsp_jax.errors import UserError

# Llama-3's pre-tokenizer split (the regex of Meta's tiktoken tokenizer).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
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
