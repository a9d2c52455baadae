"""Chat templates rendered to token ids: Llama-3 headers and ChatML.

The two layouts are written natively (no Jinja at run time) and chosen from the model's
own template text or, without one, from its special tokens. Rendering builds the
conversation text with special-token strings and encodes it once, as transformers'
`apply_chat_template(..., tokenize=True)` does, so the ids agree with it.

For the self-play game a conversation can be rendered around placeholders
(`prompt_pieces`): the text between them is encoded on its own, and generated tokens are
spliced between the pieces in-graph.

Llama-3.1/3.2 templates open every conversation with a system block holding
"Cutting Knowledge Date: December 2023" and "Today Date: <date>". transformers fills the
date with today's date (its `strftime_now`); we use the template's own fallback,
"26 Jul 2024", so prompts do not change from day to day. Pass `date_string` to
`apply_chat_template` (or `ChatTemplate(..., date_string=...)`) to make them agree.
"""

import ast
import dataclasses
import re
from collections.abc import Mapping, Sequence

from lsp_jax.errors import UserError
from lsp_jax.weights.tokenizer import Tokenizer

LLAMA3, CHATML = "llama3", "chatml"
LLAMA3_DEFAULT_DATE = "26 Jul 2024"
LLAMA3_KNOWLEDGE_CUTOFF = "December 2023"
_STRING_LITERAL = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", re.S)
_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """Which layout, and its options.

    kind: 'llama3' or 'chatml'.
    default_system: ChatML only: the system turn written when the conversation has none.
    date_string: Llama-3 only: when set, every conversation opens with the Llama-3.1/3.2
      system block ("Cutting Knowledge Date" / "Today Date: {date_string}").
    """

    kind: str
    default_system: str | None = None
    date_string: str | None = None


def detect_format(template: str | None, tokenizer: Tokenizer) -> ChatFormat:
    """The chat layout of a model from its Jinja template text, else its special tokens."""
    if template:
        if "<|start_header_id|>" in template:
            dated = "Cutting Knowledge Date" in template
            return ChatFormat(LLAMA3, date_string=LLAMA3_DEFAULT_DATE if dated else None)
        if "<|im_start|>" in template:
            return ChatFormat(CHATML, default_system=_chatml_default_system(template))
        raise UserError(
            f"The chat template of {tokenizer.source or 'this model'} is neither Llama-3 "
            f"(<|start_header_id|>) nor ChatML (<|im_start|>); lsp_jax renders only those. "
            f"Template begins: {template[:120]!r}"
        )
    if tokenizer.has_token("<|start_header_id|>") and tokenizer.has_token("<|eot_id|>"):
        return ChatFormat(LLAMA3)
    if tokenizer.has_token("<|im_start|>") and tokenizer.has_token("<|im_end|>"):
        return ChatFormat(CHATML)
    raise UserError(
        f"{tokenizer.source or 'This model'} has no chat template and no Llama-3 or ChatML "
        f"special tokens; lsp_jax cannot build chat prompts for it."
    )


def _chatml_default_system(template: str) -> str | None:
    """The system prompt a ChatML template writes when none is given: a literal
    '<|im_start|>system\\n...<|im_end|>' inside one Jinja string."""
    for match in _STRING_LITERAL.finditer(template):
        try:
            literal = ast.literal_eval(match.group(0))
        except (ValueError, SyntaxError):
            literal = match.group(0)[1:-1]
        found = _CHATML_SYSTEM.search(literal)
        if found:
            return found.group(1)
    return None


class ChatTemplate:
    """A model's chat layout bound to its tokenizer.

    `render(messages)` gives the ids of a conversation (a list of {'role', 'content'}
    dicts), ending with the assistant header when `add_generation_prompt`.
    """

    def __init__(self, tokenizer: Tokenizer, chat_format: ChatFormat):
        self.tokenizer = tokenizer
        self.format = chat_format
        if chat_format.kind == LLAMA3:
            self._bos = self._special("<|begin_of_text|>")
            self._end = self._special("<|eot_id|>")
            self._open = self._special("<|start_header_id|>")
            self._close = self._special("<|end_header_id|>")
        elif chat_format.kind == CHATML:
            self._end = self._special("<|im_end|>")
            self._open = self._special("<|im_start|>")
        else:
            raise UserError(f"Unknown chat format {chat_format.kind!r} (llama3 or chatml).")

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, template: str | None = None, **options):
        """The layout of `template` (default: the tokenizer's own chat template).
        `options` override ChatFormat fields (e.g. date_string='01 Jan 2025')."""
        chat_format = detect_format(template or tokenizer.chat_template, tokenizer)
        return cls(tokenizer, dataclasses.replace(chat_format, **options))

    def _special(self, token: str) -> str:
        self.tokenizer.token_id(token)  # Fails clearly if the tokenizer lacks it.
        return token

    @property
    def kind(self) -> str:
        return self.format.kind

    @property
    def end_of_turn_id(self) -> int:
        """The id closing every turn (<|eot_id|> or <|im_end|>)."""
        return self.tokenizer.token_id(self._end)

    # Text pieces (special tokens spelled out).

    def header_text(self, system: str | None = None) -> str:
        """What comes before the first non-system turn: BOS and the system block."""
        fmt = self.format
        if fmt.kind == CHATML:
            system = system if system is not None else fmt.default_system
            return "" if system is None else self.turn_text("system", system)
        text = self._bos
        if fmt.date_string is not None:
            block = (
                f"Cutting Knowledge Date: {LLAMA3_KNOWLEDGE_CUTOFF}\n"
                f"Today Date: {fmt.date_string}\n\n{(system or '').strip()}"
            )
            return text + self._turn_open("system") + block + self._end
        return text if system is None else text + self.turn_text("system", system)

    def _turn_open(self, role: str) -> str:
        if self.format.kind == CHATML:
            return f"{self._open}{role}\n"
        return f"{self._open}{role}{self._close}\n\n"

    def turn_text(self, role: str, content: str) -> str:
        """One whole turn. Llama-3 templates strip the content; ChatML keeps it."""
        if self.format.kind == CHATML:
            return f"{self._turn_open(role)}{content}{self._end}\n"
        return f"{self._turn_open(role)}{content.strip()}{self._end}"

    def generation_prompt_text(self) -> str:
        return self._turn_open("assistant")

    def render_text(self, messages: Sequence[Mapping], *, add_generation_prompt=True) -> str:
        """The conversation as text with special-token strings."""
        messages = list(messages)
        system = None
        if messages and messages[0]["role"] == "system":
            system = messages.pop(0)["content"]
        parts = [self.header_text(system)]
        parts += [self.turn_text(m["role"], m["content"]) for m in messages]
        if add_generation_prompt:
            parts.append(self.generation_prompt_text())
        return "".join(parts)

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
        each used once, in order): len(placeholders) + 1 pieces. The game builds
        piece_0 + ids_0 + piece_1 + ... in-graph, ids_k standing for placeholder k.

        Example: prompt_pieces([{'role': 'user', 'content': '{query}'}], ['{query}'])
        gives (prefix, suffix) of a solver prompt.

        Pieces are encoded apart, so ids equal the whole text's only where the cut is a
        token boundary anyway: put placeholders after a newline or a special token, not
        after a space ("Question: {q}" keeps "Question: " and "Why" apart, while the whole
        text would merge " Why").
        """
        text = self.render_text(messages, add_generation_prompt=add_generation_prompt)
        pieces = []
        for placeholder in placeholders:
            before, found, text = text.partition(placeholder)
            if not found:
                raise UserError(
                    f"Placeholder {placeholder!r} does not occur (once, in order) in the "
                    f"rendered prompt; check the prompt text."
                )
            pieces.append(self.tokenizer.encode(before))
        pieces.append(self.tokenizer.encode(text))
        return pieces

    def user_prompt_pieces(self, *, system: str | None = None) -> tuple[list[int], list[int]]:
        """(prefix, suffix): render([user: X]) == prefix + ids(X) + suffix for a single
        user turn X followed by the assistant header."""
        messages = [{"role": "user", "content": "\x00"}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        prefix, suffix = self.prompt_pieces(messages, ["\x00"])
        return prefix, suffix

    def header(self, system: str | None = None) -> list[int]:
        """Ids of BOS and the system block (what precedes the first user turn)."""
        return self.tokenizer.encode(self.header_text(system))

    def user_turn(self, content: str) -> list[int]:
        return self.tokenizer.encode(self.turn_text("user", content))

    def assistant_turn(self, content: str) -> list[int]:
        return self.tokenizer.encode(self.turn_text("assistant", content))

    def turn_pieces(self, role: str) -> tuple[list[int], list[int]]:
        """(open, close) ids of one turn: open + ids(content) + close is the turn."""
        prefix, suffix = self.turn_text(role, "\x00").split("\x00")
        return self.tokenizer.encode(prefix), self.tokenizer.encode(suffix)

    def generation_prompt(self) -> list[int]:
        """Ids of the assistant header that starts a reply."""
        return self.tokenizer.encode(self.generation_prompt_text())
