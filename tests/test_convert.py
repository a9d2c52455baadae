"""`lsp-jax convert`: the SmolLM2 package model as a Hugging Face folder that transformers
loads (model, tokenizer, chat template), and Hugging Face folders re-exported."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smollm2
from flax.linen import meta
from tokenizers import AddedToken, Tokenizer, models

from lsp_jax import cli
from lsp_jax.model import Llama, LlamaConfig
from lsp_jax.weights import hf_state_from_params, save_hf
from lsp_jax.weights.tokenizer_files import load_folder_tokenizer

TEXTS = [
    "Hello world, héllo 😀!",
    "def f(x):\n    return x  # ok\n",
    "digits 45  89 and 3.14",  # Spaces before a digit: SmolLM2's own digit split.
    "<|im_start|>user\nHi<|im_end|>",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    smollm2.require_package()
    out = tmp_path_factory.mktemp("convert") / "smollm2-hf"
    assert cli.main(["convert", "--model", "smollm2-135m-instruct", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def reference64(converted):
    """transformers' model of the converted folder in float64 and its logits on the
    49-token SmolLM2 chat prompt: the ground truth both checks below compare with."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float64).eval()
    ids = smollm2.chat().render(list(smollm2.PROMPT_MESSAGES), add_generation_prompt=True)
    assert len(ids) >= 40
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits.numpy()
    return model, ids, logits


def test_transformers_loads_our_weights_and_logits_match(reference64):
    model = smollm2.load()
    reference, ids, truth = reference64
    theirs_state = reference.state_dict()
    for name, tensor in hf_state_from_params(model.config, model.params).items():
        np.testing.assert_array_equal(
            theirs_state[name].numpy(), np.asarray(tensor, np.float64), name
        )
    assert reference.generation_config.eos_token_id == 2
    # Our float32 forward against the float64 truth: float32 roundoff over 30 layers on
    # logits up to ~38 measured ~1e-4. (transformers' own float32 forward is as far off,
    # so two float32 implementations differ by up to twice that.)
    ours = np.asarray(model.forward(jnp.asarray([ids])))
    assert np.abs(ours - truth).max() < 2.5e-4
    np.testing.assert_array_equal(ours.argmax(-1), truth.argmax(-1))


def test_converted_logits_match_in_float64(converted, reference64):
    """Both sides in float64 on the converted folder: the float32 roundoff above is gone,
    so what remains measures the conversion itself (rotary angles stay float32 in both,
    as transformers computes them)."""
    from lsp_jax.weights import sources

    _, ids, theirs = reference64
    with jax.enable_x64(True):
        f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
        config, params = sources.load_model(str(converted), scan_layers=True, **f64)
        ours = np.asarray(Llama(config).apply({"params": params}, jnp.asarray([ids])))
    assert ours.dtype == theirs.dtype == np.float64
    assert np.abs(ours - theirs).max() < 1e-4
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


def test_transformers_tokenizer_and_chat_template_match_ours(converted):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(converted))
    tokenizer, chat = smollm2.tokenizer(), smollm2.chat()
    assert (reference.bos_token, reference.eos_token, reference.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    for text in TEXTS:
        assert reference(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
        assert reference(text)["input_ids"] == tokenizer.encode(text, add_special=True)
    messages = [{"role": "user", "content": "Say hi."}]
    ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert list(ids["input_ids"]) == chat.render(messages)
    # And our loader reads the folder back the same way.
    assert load_folder_tokenizer(converted).encode(TEXTS[2]) == tokenizer.encode(TEXTS[2])
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_hf_folder_reexported_with_its_tokenizer(tmp_path, capsys):
    config = LlamaConfig.tiny()
    init = lambda: Llama(config).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
    shapes = meta.unbox(jax.eval_shape(init)["params"])  # Shapes only: nothing compiles.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), shapes)
    backend = Tokenizer(models.BPE())
    backend.add_special_tokens([AddedToken("<s>", special=True)])
    backend.save(str(tmp_path / "tokenizer.json"))
    save_hf(tmp_path / "src", config, params, extra_files=[tmp_path / "tokenizer.json"])
    args = ["convert", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "out")]
    assert cli.main([*args, "--dtype", "bfloat16"]) == 0
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (
        tmp_path / "src" / "tokenizer.json"
    ).read_text()
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "np") as f:
        name = "model.layers.0.self_attn.q_proj.weight"
        assert f.get_slice(name).get_dtype() == "BF16"
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert "out already exists and is not empty; choose another --out or pass --overwrite" in error
    assert cli.main([*args, "--overwrite"]) == 0


def test_convert_into_an_existing_empty_folder(tmp_path, capsys):
    config = LlamaConfig.tiny()
    init = lambda: Llama(config).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
    shapes = meta.unbox(jax.eval_shape(init)["params"])
    params = jax.tree.map(lambda s: np.full(s.shape, 0.01, np.float32), shapes)
    backend = Tokenizer(models.BPE())
    backend.save(str(tmp_path / "tokenizer.json"))
    save_hf(tmp_path / "src", config, params, extra_files=[tmp_path / "tokenizer.json"])
    (tmp_path / "out").mkdir()  # `mkdir out && lsp-jax convert ... --out out`
    args = ["convert", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "out")]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").is_file()
    (tmp_path / "file").write_text("not a folder")
    assert cli.main([*args[:-1], str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
