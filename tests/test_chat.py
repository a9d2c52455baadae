"""Chat templates: ids equal transformers' apply_chat_template for SmolLM2 (ChatML) and for
Llama-3 templates written here on a Llama-3-style test tokenizer (tokenizer.json and the
same vocabulary as a tiktoken file); template pieces for in-graph splicing."""

import base64
import json

import pytest
import smollm2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from lsp_jax.errors import UserError
from lsp_jax.weights.chat import ChatFormat, ChatTemplate, detect_format
from lsp_jax.weights.tokenizer import LLAMA3_SPLIT_PATTERN, load_folder_tokenizer

SINGLE = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
MULTI = [
    {"role": "system", "content": "You are terse. Answer in one line."},
    {"role": "user", "content": "Name a prime number bigger than 10."},
    {"role": "assistant", "content": "11 is one; 13 is another."},
    {"role": "user", "content": "  And a square number? 😀\n"},
]
NO_SYSTEM_MULTI = MULTI[1:]
CONVERSATIONS = [SINGLE, MULTI, NO_SYSTEM_MULTI]

# Llama-3.2's template, without tool calling (the structure of Meta's, written here).
LLAMA32_TEMPLATE = r"""{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""

# Llama-3.0's template: no date block, BOS before the first turn.
LLAMA30_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] "
    "+ '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]

CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "You are a helpful assistant. Answer the question briefly and clearly.",
    "Cutting Knowledge Date: December 2023. Today Date: 26 Jul 2024.",
    "Name a prime number. 11 and 13 are prime numbers; 16 is a square number.",
    "system user assistant: the quick brown fox jumps over the lazy dog.",
] * 5


def reference_ids(tokenizer, messages, add_generation_prompt, **kwargs):
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, **kwargs
    )
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


# SmolLM2 (ChatML with a default system prompt).


def test_smollm2_template_detected():
    chat = smollm2.chat()
    # The text of the GGUF's tokenizer.chat_template, copied by hand.
    expected = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert chat.format == ChatFormat("chatml", default_system=expected)
    assert chat.end_of_turn_id == 2


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_smollm2_ids_equal_transformers(conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    ours = smollm2.chat().render(messages, add_generation_prompt=add_generation_prompt)
    reference = reference_ids(smollm2.reference_tokenizer(), messages, add_generation_prompt)
    assert ours == reference


def test_smollm2_prompt_pieces_splice_to_the_full_prompt():
    chat, tokenizer = smollm2.chat(), smollm2.tokenizer()
    query = SINGLE[0]["content"]
    reference = reference_ids(smollm2.reference_tokenizer(), SINGLE, True)
    prefix, suffix = chat.user_prompt_pieces()
    assert prefix + tokenizer.encode(query) + suffix == reference
    assert tokenizer.decode(suffix) == "<|im_end|>\n<|im_start|>assistant\n"

    # Placeholders after a newline: a piece ending in a space would tokenize apart from
    # the next word (" Why" is one token in the full text).
    judge = [{"role": "user", "content": "Question:\n{q}\nAnswer:\n{a}\nScore it."}]
    pieces = chat.prompt_pieces(judge, ["{q}", "{a}"])
    q, a = "Why is the sky blue?", "Rayleigh scattering."
    filled = [{"role": "user", "content": f"Question:\n{q}\nAnswer:\n{a}\nScore it."}]
    spliced = pieces[0] + tokenizer.encode(q) + pieces[1] + tokenizer.encode(a) + pieces[2]
    assert spliced == reference_ids(smollm2.reference_tokenizer(), filled, True)
    with pytest.raises(UserError, match=r"Placeholder '\{z\}' does not occur"):
        chat.prompt_pieces(judge, ["{z}"])


def test_smollm2_turn_pieces_compose_a_conversation():
    chat, tokenizer = smollm2.chat(), smollm2.tokenizer()
    user_open, user_close = chat.turn_pieces("user")
    question, answer = MULTI[1]["content"], MULTI[2]["content"]
    ids = chat.header(MULTI[0]["content"])
    ids += user_open + tokenizer.encode(question) + user_close
    ids += chat.assistant_turn(answer)
    ids += chat.user_turn(MULTI[3]["content"]) + chat.generation_prompt()
    assert ids == reference_ids(smollm2.reference_tokenizer(), MULTI, True)


# Llama-3 on a test tokenizer.


def build_llama3_tokenizer(folder, template):
    """A small byte-level BPE with Llama-3's split and 256 special tokens, as a HF folder
    (tokenizer.json + tokenizer_config.json) and as a tiktoken file in folder/tiktoken."""
    backend = Backend(models.BPE(ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer)
    base = backend.get_vocab_size()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", base)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    stops = {"eos_token_id": [base + 1, base + 8, base + 9]}
    (folder / "generation_config.json").write_text(json.dumps(stops))
    # The same vocabulary as tiktoken ranks: token bytes and id.
    byte_of = {symbol: b for b, symbol in _byte_symbols().items()}
    lines = []
    for token, rank in sorted(
        backend.get_vocab(with_added_tokens=False).items(), key=lambda x: x[1]
    ):
        raw = bytes(byte_of[c] for c in token)
        lines.append(f"{base64.b64encode(raw).decode()} {rank}")
    tiktoken_folder = folder / "tiktoken"
    tiktoken_folder.mkdir()
    (tiktoken_folder / "tokenizer.model").write_text("\n".join(lines) + "\n")
    for name in ("tokenizer_config.json", "generation_config.json"):
        (tiktoken_folder / name).write_text((folder / name).read_text())
    return base


def _byte_symbols():
    """GPT-2's byte -> printable symbol table (bytes_to_unicode)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


@pytest.fixture(scope="module", params=["llama3.2", "llama3.0"])
def llama3(request, tmp_path_factory):
    from transformers import AutoTokenizer

    template = LLAMA32_TEMPLATE if request.param == "llama3.2" else LLAMA30_TEMPLATE
    folder = tmp_path_factory.mktemp(request.param)
    base = build_llama3_tokenizer(folder, template)
    reference = AutoTokenizer.from_pretrained(str(folder))
    return request.param, base, folder, reference


@pytest.mark.parametrize("tokenizer_format", ["tokenizer.json", "tiktoken"])
def test_llama3_ids_equal_transformers(llama3, tokenizer_format):
    version, base, folder, reference = llama3
    source = folder if tokenizer_format == "tokenizer.json" else folder / "tiktoken"
    tokenizer = load_folder_tokenizer(source)
    assert (tokenizer.bos_id, tokenizer.eos_ids) == (base, (base + 1, base + 8, base + 9))
    chat = ChatTemplate.from_tokenizer(tokenizer)
    dated = version == "llama3.2"
    assert chat.format == ChatFormat("llama3", date_string="26 Jul 2024" if dated else None)
    assert chat.end_of_turn_id == base + 9
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            ours = chat.render(messages, add_generation_prompt=add_generation_prompt)
            assert ours == reference_ids(reference, messages, add_generation_prompt)
    if dated:
        other_day = ChatTemplate.from_tokenizer(tokenizer, date_string="01 Jan 2025")
        expected = reference_ids(reference, MULTI, True, date_string="01 Jan 2025")
        assert other_day.render(MULTI) == expected


def test_llama3_prompt_pieces(llama3):
    _, _, folder, reference = llama3
    tokenizer = load_folder_tokenizer(folder)
    chat = ChatTemplate.from_tokenizer(tokenizer)
    prefix, suffix = chat.user_prompt_pieces(system="You are terse.")
    query = "What is the capital of France?"
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": query}]
    assert prefix + tokenizer.encode(query) + suffix == reference_ids(reference, messages, True)
    assert tokenizer.decode(suffix) == (
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


# Choosing the layout.


def test_format_from_special_tokens_without_template(llama3):
    _, _, folder, _ = llama3
    tokenizer = load_folder_tokenizer(folder)
    assert detect_format(None, tokenizer) == ChatFormat("llama3")
    chatml = smollm2.tokenizer()
    assert detect_format(None, chatml) == ChatFormat("chatml")
    with pytest.raises(UserError, match=r"neither Llama-3 .* nor ChatML"):
        detect_format("{{ messages[0]['content'] }}</s>", chatml)


def test_no_template_and_no_chat_tokens_is_an_error(tmp_path):
    backend = Backend(models.BPE())
    backend.add_special_tokens([AddedToken("<s>", special=True)])
    backend.save(str(tmp_path / "tokenizer.json"))
    tokenizer = load_folder_tokenizer(tmp_path)
    with pytest.raises(UserError, match=r"no chat template and no Llama-3 or ChatML"):
        ChatTemplate.from_tokenizer(tokenizer)
