"""Chat templates: ids equal transformers' apply_chat_template for the real Jinja templates
of Llama-3.2, Llama-3.0, ChatML (SmolLM2's from its GGUF, Qwen2.5's), Llama-2, Zephyr,
Mistral-7B-Instruct-v0.1 and Mistral-Nemo, typed here, on test tokenizers built here
(byte-level BPE with Llama-3's specials; a Llama-2-style sentencepiece BPE); prompt pieces
splice back to the full rendering; template errors and the sandbox speak as UserErrors."""

import base64
import copy
import dataclasses
import json

import jinja2
import pytest
import smollm2
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers import Tokenizer as Backend

from lsp_jax.errors import UserError
from lsp_jax.weights.chat import ChatTemplate
from lsp_jax.weights.tokenizer import LLAMA3_SPLIT_PATTERN
from lsp_jax.weights.tokenizer_files import load_folder_tokenizer

SINGLE = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
MULTI = [
    {"role": "system", "content": "You are terse. Answer in one line."},
    {"role": "user", "content": "Name a prime number bigger than 10."},
    {"role": "assistant", "content": "11 is one; 13 is another."},
    {"role": "user", "content": "  And a square number? 😀\n"},
]
NO_SYSTEM_MULTI = MULTI[1:]
ANSWERED = [*MULTI, {"role": "assistant", "content": "16 is a square number."}]
NO_SYSTEM_ANSWERED = ANSWERED[1:]
CONVERSATIONS = [SINGLE, MULTI, NO_SYSTEM_MULTI, ANSWERED, NO_SYSTEM_ANSWERED]

# The templates as the models ship them (tokenizer_config.json / GGUF), typed here.

# Llama-3.2-Instruct's, tool calling included.
LLAMA32_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""  # noqa: E501 (the template as shipped)

# Llama-3.0-Instruct's: no date block, BOS before the first turn.
LLAMA30_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

# Qwen2.5-Instruct's (ChatML with a default system turn and tool calling).
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501 (the template as shipped)

# Llama-2-chat's: strips contents, folds the system turn into the first user turn.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# zephyr-7b-beta's (roles spelled as plain text, eos_token after every turn).
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

# Mistral-7B-Instruct-v0.1's: no system turn.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

# Mistral-Nemo-Instruct-2407's: [INST] tokens, the system turn folded into the last user
# turn, a namespace, tool calling.
MISTRAL_NEMO_TEMPLATE = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS][" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST]" + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST]" + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif (message.tool_calls is defined and message.tool_calls is not none) %}
        {{- "[TOOL_CALLS][" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- message["content"] + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS]{"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501 (the template as shipped)

# Plain ChatML, as a model without a template gets it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
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
    "Why is the sky blue? Rayleigh scattering. Question: Answer: Score it.",
    "[INST] <<SYS>> <</SYS>> [/INST] <|user|> <|assistant|> <|system|>",
] * 5


def reference_ids(tokenizer, messages, add_generation_prompt, **kwargs):
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, **kwargs
    )
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


# Test tokenizers.


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


SPACE = "\u2581"  # Sentencepiece's visible space.


def build_sentencepiece_tokenizer(folder, template, specials=()):
    """A Llama-2-style tokenizer.json: BPE over words (no merge spans a space), byte
    fallback (newlines and emoji become <0x..> tokens), a space prepended to every text,
    <unk> <s> </s> (plus `specials`), and BOS added by the post-processor."""
    normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    trainer_backend = Backend(models.BPE())
    trainer_backend.normalizer = normalizer
    trainer_backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False)
    trainer_backend.train_from_iterator(CORPUS, trainer)
    trained = json.loads(trainer_backend.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    backend = Backend(
        models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    backend.normalizer = normalizer
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


# Template families: our ChatTemplate and transformers' tokenizer for each.


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    template: str | None  # None: the tokenizer's own (SmolLM2's GGUF template).
    tokenizer: str  # "llama3", "smollm2" or "sentencepiece".
    end_of_turn: str
    system: bool = True  # Whether the template takes a system turn.
    specials: tuple = ()
    # transformers' strftime_now gives today's date; ours the fixed one.
    reference_kwargs: tuple = ()


FAMILIES = [
    Family(
        "llama3.2",
        LLAMA32_TEMPLATE,
        "llama3",
        "<|eot_id|>",
        reference_kwargs=(("date_string", "26 Jul 2024"),),
    ),
    Family("llama3.0", LLAMA30_TEMPLATE, "llama3", "<|eot_id|>"),
    Family("smollm2", None, "smollm2", "<|im_end|>"),
    Family("qwen2.5", QWEN25_TEMPLATE, "smollm2", "<|im_end|>"),
    Family("llama2", LLAMA2_TEMPLATE, "sentencepiece", "</s>"),
    Family("zephyr", ZEPHYR_TEMPLATE, "sentencepiece", "</s>"),
    Family("mistral", MISTRAL_TEMPLATE, "sentencepiece", "</s>", system=False),
    Family(
        "mistral-nemo",
        MISTRAL_NEMO_TEMPLATE,
        "sentencepiece",
        "</s>",
        specials=("[INST]", "[/INST]"),
    ),
]


@dataclasses.dataclass
class Loaded:
    spec: Family
    chat: ChatTemplate
    reference: object  # transformers' tokenizer

    def reference_ids(self, messages, add_generation_prompt, **kwargs):
        kwargs = {**dict(self.spec.reference_kwargs), **kwargs}
        if self.spec.template is not None:
            kwargs["chat_template"] = self.spec.template
        return reference_ids(self.reference, messages, add_generation_prompt, **kwargs)


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def family(request, tmp_path_factory):
    from transformers import AutoTokenizer

    spec = request.param
    if spec.tokenizer == "smollm2":
        chat = ChatTemplate.from_tokenizer(smollm2.tokenizer(), spec.template)
        return Loaded(spec, chat, smollm2.reference_tokenizer())
    folder = tmp_path_factory.mktemp(spec.name)
    if spec.tokenizer == "llama3":
        build_llama3_tokenizer(folder, spec.template)
    else:
        build_sentencepiece_tokenizer(folder, spec.template, spec.specials)
    chat = ChatTemplate.from_tokenizer(load_folder_tokenizer(folder))
    return Loaded(spec, chat, AutoTokenizer.from_pretrained(str(folder)))


def test_ids_equal_transformers(family):
    compared = 0
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            if messages[0]["role"] == "system" and not family.spec.system:
                # Both refuse, with the template's own message.
                with pytest.raises(jinja2.TemplateError) as refused:
                    family.reference_ids(messages, add_generation_prompt)
                with pytest.raises(UserError, match="refuses this conversation") as ours:
                    family.chat.render(messages, add_generation_prompt=add_generation_prompt)
                assert refused.value.message in str(ours.value)
                continue
            ours = family.chat.render(messages, add_generation_prompt=add_generation_prompt)
            assert ours == family.reference_ids(messages, add_generation_prompt)
            compared += 1
    assert compared == (10 if family.spec.system else 6)


def test_end_of_turn_id(family):
    tokenizer = family.chat.tokenizer
    assert family.chat.end_of_turn_id == tokenizer.token_id(family.spec.end_of_turn)


def content_ids(tokenizer, before: str, content: str) -> list[int]:
    """The ids `content` has in a rendering where `before` precedes it, as a model writes
    it there. A sentencepiece tokenizer marks the space that starts a text ('▁What'):
    encoded on its own, a text gets that mark; inside a text, only where a space (or a
    special token, which starts a new text) precedes it, so after a newline it has none.
    A byte-level BPE has no such mark: both are the same ids."""
    newline = tokenizer.encode("\n")
    inside = tokenizer.encode("\n" + content)[len(newline) :]
    starts_text = not before or any(before.endswith(t) for t in tokenizer.special_tokens)
    if starts_text or before.endswith(" "):
        return tokenizer.encode(content)
    return inside


def assert_splices(family, messages, placeholders, contents, *, add_generation_prompt=True):
    """pieces + contents' ids == transformers' ids of the conversation with the contents."""
    chat = family.chat
    pieces = chat.prompt_pieces(messages, placeholders, add_generation_prompt=add_generation_prompt)
    assert len(pieces) == len(placeholders) + 1
    text = chat.render_text(messages, add_generation_prompt=add_generation_prompt)
    spliced = list(pieces[0])
    for placeholder, content, piece in zip(placeholders, contents, pieces[1:]):
        spliced += content_ids(chat.tokenizer, text.split(placeholder)[0], content) + piece
    filled = []
    for m in messages:
        content = m["content"]
        for placeholder, value in zip(placeholders, contents):
            content = content.replace(placeholder, value)
        filled.append({**m, "content": content})
    assert spliced == family.reference_ids(filled, add_generation_prompt)


QUERY, ANSWER = "Why is the sky blue?", "Rayleigh scattering."


def test_prompt_pieces_splice_to_the_full_rendering(family):
    chat = family.chat
    systems = [None, "You are terse."] if family.spec.system else [None]
    for system in systems:
        head = [] if system is None else [{"role": "system", "content": system}]
        user = [*head, {"role": "user", "content": "{query}"}]
        assert list(chat.user_prompt_pieces(system=system)) == chat.prompt_pieces(user, ["{query}"])
        assert_splices(family, user, ["{query}"], [QUERY])
        # A later turn, after a history.
        history = [*head, *NO_SYSTEM_ANSWERED[:2], {"role": "user", "content": "{query}"}]
        assert_splices(family, history, ["{query}"], [QUERY])
    # Two placeholders in one turn (the judge's prompt), after newlines.
    judge = [{"role": "user", "content": "Question:\n{q}\nAnswer:\n{a}\nScore it."}]
    assert_splices(family, judge, ["{q}", "{a}"], [QUERY, ANSWER])
    # A whole exchange without the generation prompt (the reward model's input).
    exchange = [{"role": "user", "content": "{q}"}, {"role": "assistant", "content": "{a}"}]
    assert_splices(family, exchange, ["{q}", "{a}"], [QUERY, ANSWER], add_generation_prompt=False)
    if family.spec.name in ("llama2", "mistral"):
        # '[INST] ' + content: sentencepiece spells the content's first word with that
        # space ('▁Why'), so the prefix ends at '[INST]' and the content's own ids fit.
        tokenizer = chat.tokenizer
        prefix, suffix = chat.user_prompt_pieces()
        assert prefix == tokenizer.encode("<s>[INST]")
        reference = family.reference_ids([{"role": "user", "content": QUERY}], True)
        assert prefix + tokenizer.encode(QUERY) + suffix == reference


# Llama-3: tiktoken files and the date.


@pytest.fixture(scope="module")
def llama32_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama32_tiktoken")
    build_llama3_tokenizer(folder, LLAMA32_TEMPLATE)
    return folder


def test_llama3_tiktoken_ids_equal_transformers(llama32_folder):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(llama32_folder))
    tokenizer = load_folder_tokenizer(llama32_folder / "tiktoken")
    chat = ChatTemplate.from_tokenizer(tokenizer)
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = reference_ids(
                reference, messages, add_generation_prompt, date_string="26 Jul 2024"
            )
            assert chat.render(messages, add_generation_prompt=add_generation_prompt) == expected
    prefix, suffix = chat.user_prompt_pieces(system="You are terse.")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": QUERY}]
    assert prefix + tokenizer.encode(QUERY) + suffix == reference_ids(
        reference, messages, True, date_string="26 Jul 2024"
    )


def test_llama3_date_is_fixed_unless_given(llama32_folder):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(llama32_folder))
    tokenizer = load_folder_tokenizer(llama32_folder)
    assert "Today Date: 26 Jul 2024\n" in ChatTemplate.from_tokenizer(tokenizer).render_text(SINGLE)
    other_day = ChatTemplate.from_tokenizer(tokenizer, date_string="01 Jan 2025")
    expected = reference_ids(reference, MULTI, True, date_string="01 Jan 2025")
    assert other_day.render(MULTI) == expected
    # strftime_now returns the same fixed day, whatever the format.
    dates = "{{ strftime_now('%Y-%m-%d') }} {{ strftime_now('%d %B %Y') }}"
    assert ChatTemplate(tokenizer, dates).render_text(SINGLE) == "2024-07-26 26 July 2024"
    on_new_year = ChatTemplate(tokenizer, dates, date_string="01 Jan 2025")
    assert on_new_year.render_text(SINGLE) == "2025-01-01 01 January 2025"
    with pytest.raises(UserError, match="date_string='2025-01-01' is not a date"):
        ChatTemplate(tokenizer, dates, date_string="2025-01-01")


# What transformers' sandbox offers, and what it refuses.


def test_template_features_render_as_in_transformers():
    reference = smollm2.reference_tokenizer()
    template = (
        "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ tools is none }}|"
        "{{ documents is none }}|{{ {'é': [1, '<b>']} | tojson }}|"
        "{{ {'a': 1} | tojson(indent=2) }}|"
        "{% for m in messages %}{% if loop.index0 == 2 %}{% break %}{% endif %}"
        "{% generation %}{{ m['role'] }}{% endgeneration %},{% endfor %}"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{% endfor %}{{ ns.n }}|{{ messages[1].content | trim }}|{{ 'x' if 'name' in "
        "messages[0] else 'y' }}"
    )
    messages = [{"role": "system", "content": "s", "name": None}, *NO_SYSTEM_MULTI]
    chat = ChatTemplate.from_tokenizer(smollm2.tokenizer(), template)
    expected = reference.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert chat.render_text(messages) == expected
    assert '{"é": [1, "<b>"]}' in expected and expected.endswith("|y")


def test_raise_exception_is_a_user_error_with_the_templates_message():
    chat = ChatTemplate.from_tokenizer(smollm2.tokenizer(), MISTRAL_TEMPLATE)
    alternate = "Conversation roles must alternate user/assistant/user/assistant/..."
    with pytest.raises(
        UserError, match="refuses this conversation: " + alternate.replace(".", r"\.")
    ):
        chat.render(MULTI)
    tools = ChatTemplate.from_tokenizer(smollm2.tokenizer(), "{{ raise_exception('No tools!') }}")
    with pytest.raises(UserError, match="refuses this conversation: No tools!"):
        tools.render(SINGLE)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
        "{{ messages[0].update(role='system') }}",
        "{{ cycler.__init__.__globals__.os }}",
    ],
)
def test_sandbox_refuses_unsafe_access(template):
    chat = ChatTemplate.from_tokenizer(smollm2.tokenizer(), template)
    messages = copy.deepcopy(SINGLE)
    with pytest.raises(UserError, match="sandbox forbids"):
        chat.render(messages)
    assert messages == SINGLE


def test_broken_templates_give_one_clear_error():
    tokenizer = smollm2.tokenizer()
    with pytest.raises(UserError, match=r"not valid Jinja: .*line 1"):
        ChatTemplate.from_tokenizer(tokenizer, "{% for m in messages %}{{ m }}")
    failing = ChatTemplate.from_tokenizer(tokenizer, "{{ messages[0].content.missing.key }}")
    with pytest.raises(UserError, match="failed on this conversation"):
        failing.render(SINGLE)


# Placeholders that cannot be cut at.


@pytest.mark.parametrize(
    "template, count",
    [
        ("{% for m in messages %}{{ m['content'] | lower }}{% endfor %}", 0),
        ("{% for m in messages %}{{ m['content'] | title }}{% endfor %}", 0),
        ("{% for m in messages %}{{ m['content'] + m['content'] }}{% endfor %}", 2),
        ("{% for m in messages %}{{ m['role'] }}{% endfor %}", 0),
    ],
)
def test_placeholder_changed_by_the_template_is_refused(template, count):
    chat = ChatTemplate.from_tokenizer(smollm2.tokenizer(), template)
    with pytest.raises(UserError, match=f"renders placeholder '{{q}}' {count} times, not once"):
        chat.prompt_pieces([{"role": "user", "content": "Q: {q}"}], ["{q}"])


def test_placeholders_moved_missing_or_repeated_are_refused():
    # Mistral-Nemo writes the system turn into the last user turn.
    chat = ChatTemplate.from_tokenizer(smollm2.tokenizer(), MISTRAL_NEMO_TEMPLATE)
    messages = [
        {"role": "system", "content": "{s}"},
        {"role": "user", "content": "{q1}"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "{q2}"},
    ]
    with pytest.raises(UserError, match=r"writes placeholder '\{q1\}' before '\{s\}'"):
        chat.prompt_pieces(messages, ["{s}", "{q1}", "{q2}"])
    assert len(chat.prompt_pieces(messages, ["{q1}", "{s}", "{q2}"])) == 4
    judge = [{"role": "user", "content": "Question:\n{q}\nAnswer:\n{a}"}]
    with pytest.raises(UserError, match=r"Placeholder '\{z\}' does not occur exactly once"):
        smollm2.chat().prompt_pieces(judge, ["{z}"])
    with pytest.raises(UserError, match=r"'\{q\}' does not occur exactly once .*found 2"):
        smollm2.chat().prompt_pieces([{"role": "user", "content": "{q} {q}"}], ["{q}"])


# Models without a template.


def test_a_model_without_template_gets_one_from_its_special_tokens(llama32_folder):
    from transformers import AutoTokenizer

    llama3 = copy.copy(load_folder_tokenizer(llama32_folder))
    llama3.chat_template = None
    chatml = copy.copy(smollm2.tokenizer())
    chatml.chat_template = None
    cases = [
        (llama3, AutoTokenizer.from_pretrained(str(llama32_folder)), LLAMA30_TEMPLATE),
        (chatml, smollm2.reference_tokenizer(), CHATML_TEMPLATE),
    ]
    for tokenizer, reference, template in cases:
        chat = ChatTemplate.from_tokenizer(tokenizer)
        for messages in CONVERSATIONS:
            expected = reference_ids(reference, messages, True, chat_template=template)
            assert chat.render(messages) == expected


def test_no_template_and_no_chat_tokens_is_an_error(tmp_path):
    backend = Backend(models.BPE())
    backend.add_special_tokens([AddedToken("<s>", special=True)])
    backend.save(str(tmp_path / "tokenizer.json"))
    tokenizer = load_folder_tokenizer(tmp_path)
    with pytest.raises(UserError, match=r"no chat template and no Llama-3 or ChatML"):
        ChatTemplate.from_tokenizer(tokenizer)
