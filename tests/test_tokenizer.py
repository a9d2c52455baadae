"""Tokenizers: SmolLM2's GGUF tokenizer against transformers', Hugging Face tokenizer.json
folders, Llama-3 tiktoken files and sentencepiece models made in the tests."""

import base64
import json

import pytest
import smollm2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from lsp_jax.errors import UserError
from lsp_jax.weights.gguf import read_gguf
from lsp_jax.weights.tokenizer import LLAMA3_SPLIT_PATTERN
from lsp_jax.weights.tokenizer_files import load_folder_tokenizer, load_tokenizer_file

TEXTS = [
    "Hello world",
    "  leading, and   runs of   spaces\t\ttabs\n\n\nnewlines \n",
    "héllo wörld — naïve café, 日本語のテキスト, Ελληνικά, ǅ ﬁ Å",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷!",
    'def f(x):\n    return {"a": x ** 2}  # square\n\tpass\r\n',
    "digits 0 12 345 6789 3.14159 1,000,000 v2.0 abc123def",
    "I'm sure you're right; they'll see. WE'LL SEE",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <|im_end|>x<file_sep>y",
    "",
    " ",
    "\n",
]


# SmolLM2 (the GGUF's embedded byte-level BPE).


def test_smollm2_ids_equal_transformers():
    tokenizer = smollm2.tokenizer()
    reference = smollm2.reference_tokenizer()
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == reference(text, add_special_tokens=False)["input_ids"], text
        assert tokenizer.encode(text, add_special=True) == reference(text)["input_ids"], text
        assert tokenizer.decode(ids) == text
        assert reference.decode(ids) == text


def test_smollm2_special_ids_and_decoding():
    tokenizer = smollm2.tokenizer()
    assert (tokenizer.bos_id, tokenizer.eos_ids, tokenizer.pad_id) == (1, (2,), 2)
    assert tokenizer.stop_ids == (2,)
    assert tokenizer.token_id("<|im_start|>") == 1 and tokenizer.token_id("<|im_end|>") == 2
    assert tokenizer.vocab_size == 49152 and not tokenizer.add_bos
    with pytest.raises(UserError, match=r"no special token '<\|eot_id\|>'"):
        tokenizer.token_id("<|eot_id|>")
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids, skip_special=True) == "user\nHi"


def test_smollm2_digits_split_like_its_tokenizer_json():
    # SmolLM2's tokenizer.json (and llama.cpp's 'smollm' pre-tokenizer) isolate every digit
    # before the GPT-2 split, so a run of spaces before a digit stays one piece ("ĠĠ").
    # transformers' GGUF loader omits the digit step and gives "Ġ", "Ġ" instead.
    vocab = {
        t: i
        for i, t in enumerate(
            read_gguf(smollm2.require_package()).metadata["tokenizer.ggml.tokens"]
        )
    }
    expected = [vocab[t] for t in ["4", "5", "ĠĠ", "8", "9"]]
    assert smollm2.tokenizer().encode("45  89") == expected


# Hugging Face folders.


def train_byte_level_bpe(texts, vocab_size=400):
    """A small Llama-3-style byte-level BPE (its split regex, no prefix space)."""
    backend = Backend(models.BPE(ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return backend


CORPUS = [t for t in TEXTS if t.strip()] * 3 + [
    "the quick brown fox jumps over the lazy dog " * 5,
    "hello world, hello there, say hello to the world",
]


def test_hf_folder_stop_ids_from_generation_config(tmp_path):
    backend = train_byte_level_bpe(CORPUS)
    base = backend.get_vocab_size()
    names = ["<s>", "</s>", "<eot>", "<pad>"]
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(
        json.dumps({"bos_token_id": base, "eos_token_id": base + 1})
    )
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [base + 1, base + 2]})
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    tokenizer = load_folder_tokenizer(tmp_path)
    assert (tokenizer.bos_id, tokenizer.eos_ids) == (base, (base + 1, base + 2))
    assert tokenizer.pad_id == base + 1  # No pad given: the first stop id.
    assert tokenizer.chat_template == "{{ x }}"
    assert tokenizer.encode("hello<eot>")[-1] == base + 2
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    (tmp_path / "generation_config.json").unlink()
    tokenizer = load_folder_tokenizer(tmp_path)
    assert (tokenizer.eos_ids, tokenizer.pad_id) == ((base + 1,), base + 3)


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(UserError, match=r"has no tokenizer: expected tokenizer.json"):
        load_folder_tokenizer(tmp_path)
    with pytest.raises(UserError, match=r"Tokenizer file not found: .*nope.model"):
        load_tokenizer_file(tmp_path / "nope.model")


# Llama-3 tiktoken files.


def write_tiktoken(path, ranks):
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in ranks.items()]
    path.write_text("\n".join(lines) + "\n")


def test_tiktoken_file_by_hand(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"he", b"ll", b"hell", b"hello", b" w", b"or"):
        ranks[token] = len(ranks)  # 256 .. 261
    write_tiktoken(tmp_path / "tokenizer.model", ranks)
    tokenizer = load_tokenizer_file(tmp_path / "tokenizer.model")
    bos, end_of_text, eot = 262, 263, 262 + 9  # Llama-3's specials follow the base vocab.
    assert tokenizer.vocab_size == 262 + 256
    assert (tokenizer.bos_id, tokenizer.eos_ids, tokenizer.pad_id) == (bos, (263, eot), 263)
    assert tokenizer.token_id("<|eot_id|>") == eot
    assert tokenizer.token_id("<|start_header_id|>") == 262 + 6
    # "hello": he, ll, hell, hello by rank; " world": " w", "or", then single bytes.
    assert tokenizer.encode("hello world") == [259, 260, 261, ord("l"), ord("d")]
    assert tokenizer.encode("hello<|eot_id|>", add_special=True) == [bos, 259, eot]
    assert tokenizer.decode([bos, 259, eot]) == "<|begin_of_text|>hello<|eot_id|>"
    assert tokenizer.decode([bos, 259, eot], skip_special=True) == "hello"
    assert end_of_text == tokenizer.token_id("<|end_of_text|>")
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot]}))
    assert load_tokenizer_file(tmp_path / "tokenizer.model").eos_ids == (eot,)


def test_tiktoken_bad_line_is_named(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("aGk= 0\nnot-a-line\n")
    with pytest.raises(UserError, match=r"line 2 is not '<base64 token> <rank>'"):
        load_tokenizer_file(path)


# sentencepiece.


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    import sentencepiece

    folder = tmp_path_factory.mktemp("sp")
    lines = [
        "the quick brown fox jumps over the lazy dog",
        "a language model plays a game against itself",
        "numbers like 12 and 345 appear in text",
        "questions, answers, and judgements of quality",
    ] * 20
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(folder / "sp"),
        vocab_size=400,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
    )
    return folder / "sp.model"


def test_sentencepiece_round_trip(sentencepiece_model):
    tokenizer = load_tokenizer_file(sentencepiece_model)
    assert (tokenizer.bos_id, tokenizer.eos_ids, tokenizer.pad_id) == (1, (2,), 3)
    assert tokenizer.vocab_size == 400
    for text in ["the quick brown fox", "a game of 12 and 345", "ünïcode and emoji 😀 too"]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    hello = tokenizer.encode("the fox")
    assert tokenizer.encode("the fox</s>", add_special=True) == [1, *hello, 2]
    assert tokenizer.decode([1, *hello, 2]) == "<s>the fox</s>"
    assert tokenizer.decode([1, *hello, 2], skip_special=True) == "the fox"
