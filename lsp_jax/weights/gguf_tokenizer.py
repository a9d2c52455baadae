"""The byte-level BPE tokenizer embedded in a GGUF file, rebuilt with the `tokenizers`
library."""

from lsp_jax.errors import UserError
from lsp_jax.weights.gguf import GGUFFile, read_gguf
from lsp_jax.weights.gguf_config import tokenizer_ids
from lsp_jax.weights.tokenizer import LLAMA3_SPLIT_PATTERN, HFTokenizer, SpecialIds

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


def load_gguf_tokenizer(path_or_file) -> HFTokenizer:
    """The byte-level BPE tokenizer embedded in a GGUF file (tokenizer.ggml.model 'gpt2'),
    rebuilt with the `tokenizers` library. Stop ids: eos, eot and eom from the metadata."""
    file = path_or_file if isinstance(path_or_file, GGUFFile) else read_gguf(path_or_file)
    meta = file.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(
            f"{file.path} embeds a {kind!r} tokenizer; lsp_jax reads only byte-level BPE "
            f"('gpt2') GGUF tokenizers. Point --model at a folder with the model's "
            f"tokenizer.json instead."
        )
    fields = tokenizer_ids(meta)
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
