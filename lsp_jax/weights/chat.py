"""Chat templates: a model's own Jinja template rendered to token ids, as transformers does.

The template (tokenizer_config.json's `chat_template`, chat_template.jinja, or a GGUF's
`tokenizer.chat_template`) is rendered with Jinja2 in a sandbox set up as transformers'
`apply_chat_template` sets up its own: trim_blocks and lstrip_blocks, `raise_exception`,
`strftime_now`, a `tojson` filter that keeps non-ASCII text, loop controls, the named
special tokens (`bos_token`, `eos_token`, ...) and `add_generation_prompt`. The text is then
encoded once, special-token strings becoming their ids and nothing added around it, as
`apply_chat_template(..., tokenize=True)` does, so the ids agree with it for any family
(Llama-2, Llama-3, ChatML, Zephyr, Mistral, DeepSeek, ...). A model that ships no template
gets a Llama-3 or ChatML one when it has those special tokens.

For the self-play game a conversation is rendered around placeholders (`prompt_pieces`):
each placeholder is rendered as a unique marker, the text is cut at the markers, the pieces
are encoded on their own, and generated tokens are spliced between them in-graph.

Llama-3.1/3.2 templates open every conversation with a system block holding
"Cutting Knowledge Date: December 2023" and "Today Date: <date>". transformers fills the
date with today's date (its `strftime_now`); here `strftime_now` returns the templates' own
fallback, "26 Jul 2024", so prompts do not change from day to day. Pass `date_string` to
`apply_chat_template` (or `ChatTemplate.from_tokenizer(..., date_string=...)`) to make them
agree.
"""

import datetime
import functools
import json
from collections.abc import Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lsp_jax.errors import UserError
from lsp_jax.weights.tokenizer import Tokenizer

DEFAULT_DATE = "26 Jul 2024"  # The fallback date of Llama-3.1/3.2's templates.
DATE_FORMAT = "%d %b %Y"  # How those templates spell a date.

# Templates for models that ship none, chosen by their special tokens: Llama-3.0's (no date
# block) and plain ChatML (no default system turn).
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] "
    "+ '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_FALLBACKS = (
    (("<|start_header_id|>", "<|eot_id|>"), LLAMA3_TEMPLATE),
    (("<|im_start|>", "<|im_end|>"), CHATML_TEMPLATE),
)

# A placeholder as rendered: private-use characters that real text does not hold, and
# words of both cases, so a template that changes the case of content (upper, lower,
# title, capitalize) cannot keep it.
_SLOT = "\ue000[lsp Slot {}]\ue001"


class _Refused(jinja2.TemplateError):
    """What `raise_exception(message)` raises inside a template."""


def _raise_exception(message):
    raise _Refused(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' marker of the assistant's
    text (for training masks): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    # Immutable: a template cannot change the messages or anything else it is given.
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    return environment


def fallback_template(tokenizer: Tokenizer) -> str:
    """The chat template of a model that ships none, from its special tokens."""
    for tokens, template in _FALLBACKS:
        if all(tokenizer.has_token(token) for token in tokens):
            return template
    raise UserError(
        f"{tokenizer.source or 'This model'} has no chat template and no Llama-3 or ChatML "
        f"special tokens; lsp_jax cannot build chat prompts for it. Fix: add the model's "
        f"chat_template to its tokenizer_config.json (or a chat_template.jinja file)."
    )


def _fixed_now(date_string: str | None) -> datetime.datetime:
    if date_string is None:
        date_string = DEFAULT_DATE
    try:
        return datetime.datetime.strptime(date_string, DATE_FORMAT)
    except ValueError:
        raise UserError(
            f"date_string={date_string!r} is not a date spelled as Llama-3 templates spell "
            f"it, e.g. {DEFAULT_DATE!r}."
        ) from None


class ChatTemplate:
    """A model's Jinja chat template bound to its tokenizer.

    `render(messages)` gives the ids of a conversation (a list of {'role', 'content'}
    dicts), ending with the template's assistant header when `add_generation_prompt`.
    `date_string` ('01 Jan 2025') is the date `strftime_now` returns and is passed to the
    template as `date_string`, as apply_chat_template passes it (default: 26 Jul 2024, not
    passed).
    """

    def __init__(self, tokenizer: Tokenizer, template: str, *, date_string: str | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self.date_string = date_string
        now = _fixed_now(date_string)
        try:
            self._compiled = _environment().from_string(
                template, globals={"strftime_now": now.strftime}
            )
        except jinja2.TemplateSyntaxError as error:
            raise UserError(
                f"The chat template of {self._name} is not valid Jinja: {error.message} "
                f"(line {error.lineno})."
            ) from None

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, template: str | None = None, *, date_string=None):
        """`template` (default: the tokenizer's own chat template, else the Llama-3 or
        ChatML one its special tokens call for)."""
        template = template or tokenizer.chat_template or fallback_template(tokenizer)
        return cls(tokenizer, template, date_string=date_string)

    @property
    def _name(self) -> str:
        return self.tokenizer.source or "this model"

    @functools.cached_property
    def end_of_turn_id(self) -> int:
        """The id that closes an assistant turn: the first special token the template
        writes after the assistant's content (<|eot_id|>, <|im_end|>, </s>, ...), else the
        first stop id."""
        conversation = [
            {"role": "user", "content": "{question}"},
            {"role": "assistant", "content": "{answer}"},
        ]
        after_answer = self.prompt_pieces(
            conversation, ["{question}", "{answer}"], add_generation_prompt=False
        )[-1]
        special = set(self.tokenizer.special_tokens.values())
        for token_id in after_answer:
            if token_id in special:
                return token_id
        if self.tokenizer.eos_ids:
            return self.tokenizer.eos_ids[0]
        raise UserError(
            f"The chat template of {self._name} ends an assistant turn with no special token "
            f"and the tokenizer names no stop token, so generation would never stop."
        )

    # Text.

    def render_text(self, messages: Sequence[Mapping], *, add_generation_prompt=True) -> str:
        """The conversation as text with special-token strings."""
        variables = {
            **self.tokenizer.named_tokens,
            # Keys set to None are dropped, as transformers does: templates test presence.
            "messages": [{k: v for k, v in m.items() if v is not None} for m in messages],
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        if self.date_string is not None:
            variables["date_string"] = self.date_string
        try:
            return self._compiled.render(**variables)
        except _Refused as error:
            raise UserError(
                f"The chat template of {self._name} refuses this conversation: {error.message}"
            ) from None
        except jinja2.exceptions.SecurityError as error:
            raise UserError(
                f"The chat template of {self._name} tried something the sandbox forbids "
                f"({error}); lsp_jax renders templates as transformers does, without access "
                f"to Python internals or changes to its inputs."
            ) from None
        except jinja2.TemplateError as error:
            raise UserError(
                f"The chat template of {self._name} failed on this conversation "
                f"({type(error).__name__}: {error})."
            ) from None

    # Token ids.

    def render(self, messages: Sequence[Mapping], *, add_generation_prompt=True) -> list[int]:
        """Ids of the conversation (plus the assistant header when add_generation_prompt)."""
        text = self.render_text(messages, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text)

    def prompt_pieces(
        self,
        messages: Sequence[Mapping],
        placeholders: Sequence[str],
        *,
        add_generation_prompt=True,
    ) -> list[list[int]]:
        """Ids of the conversation cut at `placeholders` (strings inside message contents,
        each once, in the order the template writes them): len(placeholders) + 1 pieces.
        The game builds piece_0 + ids_0 + piece_1 + ... in-graph, ids_k standing for
        placeholder k.

        Example: prompt_pieces([{'role': 'user', 'content': '{query}'}], ['{query}'])
        gives (prefix, suffix) of a solver prompt.

        Each piece is encoded as the tokenizer spells it inside the whole text, so the
        spliced ids equal the rendering's wherever the cut is a token boundary: after a
        newline or a special token, or after a space for sentencepiece tokenizers, whose
        encoding of the content writes that space itself ('▁What'; the piece then leaves
        it out). A byte-level BPE merges a space with the next word (' Why'), so a
        placeholder after a space in a byte-level model's text splices the space apart.
        A template that trims content (Llama-2, Llama-3) renders the content's own
        leading or trailing whitespace away, while spliced ids keep it.

        Raises UserError when the template drops, changes, repeats or reorders a
        placeholder, which would make the pieces wrong.
        """
        slots = [_SLOT.format(k) for k in range(len(placeholders))]
        messages = _fill_placeholders(messages, placeholders, slots)
        text = self.render_text(messages, add_generation_prompt=add_generation_prompt)
        return self._encode_pieces(self._cut(text, slots, placeholders))

    def user_prompt_pieces(self, *, system: str | None = None) -> tuple[list[int], list[int]]:
        """(prefix, suffix): render([user: X]) == prefix + ids(X) + suffix for a single
        user turn X followed by the assistant header."""
        messages = [{"role": "user", "content": "{query}"}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        prefix, suffix = self.prompt_pieces(messages, ["{query}"])
        return prefix, suffix

    def _cut(self, text: str, slots: list[str], placeholders: Sequence[str]) -> list[str]:
        """The rendered text between the slots, checked to hold each slot once, in order."""
        for slot, placeholder in zip(slots, placeholders):
            if text.count(slot) != 1:
                raise UserError(
                    f"The chat template of {self._name} renders placeholder {placeholder!r} "
                    f"{text.count(slot)} times, not once: it drops, changes or repeats "
                    f"message content there, so generated tokens cannot be spliced in at it."
                )
        starts = [text.index(slot) for slot in slots]
        for k in range(1, len(slots)):
            if starts[k] < starts[k - 1]:
                raise UserError(
                    f"The chat template of {self._name} writes placeholder "
                    f"{placeholders[k]!r} before {placeholders[k - 1]!r} (it moves message "
                    f"content); give the placeholders in the order the template writes them."
                )
        texts = []
        for slot in slots:
            before, _, text = text.partition(slot)
            texts.append(before)
        return [*texts, text]

    def _encode_pieces(self, texts: list[str]) -> list[list[int]]:
        pieces = []
        for k, text in enumerate(texts):
            if k < len(texts) - 1 and text.endswith(" ") and self._content_writes_its_space:
                text = text[:-1]  # The content's ids start with this space ('▁What').
            pieces.append(self.tokenizer.encode(text) if k == 0 else self._encode_inside(text))
        return pieces

    def _encode_inside(self, text: str) -> list[int]:
        """Ids of `text` inside a longer text. A sentencepiece tokenizer writes a space at
        the start of every text it encodes ('▁'); encoded after a newline, whose ids are
        then dropped, the text gets none (transformers encodes chat pieces so too)."""
        if not text:
            return []
        newline = self._newline_ids
        ids = self.tokenizer.encode("\n" + text)
        if ids[: len(newline)] == newline:
            return ids[len(newline) :]
        return self.tokenizer.encode(text)  # The newline merged with the text.

    @functools.cached_property
    def _newline_ids(self) -> list[int]:
        return self.tokenizer.encode("\n")

    @functools.cached_property
    def _content_writes_its_space(self) -> bool:
        """Whether a text encoded on its own starts with the space that would precede it
        inside a longer text (sentencepiece: 'a' -> '▁a', the ids of ' a' inside)."""
        return self.tokenizer.encode("a") == self._encode_inside(" a")


def _fill_placeholders(messages, placeholders, slots) -> list[dict]:
    """Copies of `messages` with each placeholder (found exactly once) replaced by its slot."""
    messages = [dict(m) for m in messages]
    for placeholder, slot in zip(placeholders, slots):
        holders = [m for m in messages if isinstance(m.get("content"), str)]
        found = sum(m["content"].count(placeholder) for m in holders)
        if found != 1:
            raise UserError(
                f"Placeholder {placeholder!r} does not occur exactly once in the messages' "
                f"contents (found {found}); check the prompt text."
            )
        for m in holders:
            m["content"] = m["content"].replace(placeholder, slot)
    return messages
