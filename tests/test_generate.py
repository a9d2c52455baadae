"""`lsp-jax generate`: prompt files, batching that does not change samples, and an end-to-end
run on SmolLM2 (when its package is installed)."""

import json
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsp_jax import cli
from lsp_jax.commands import generate
from lsp_jax.errors import UserError
from lsp_jax.model import Llama, LlamaConfig
from lsp_jax.sampling import SamplerConfig, jit_sample


def test_read_prompts_lines_and_jsonl(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("first prompt\n\n  second, with spaces \n", encoding="utf-8")
    assert generate.read_prompts(plain) == ["first prompt", "  second, with spaces "]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        json.dumps({"prompt": "a\nb", "id": 1}) + "\n" + json.dumps({"prompt": "c"}) + "\n",
        encoding="utf-8",
    )
    assert generate.read_prompts(jsonl) == ["a\nb", "c"]


@pytest.mark.parametrize(
    "content,message",
    [("", "no prompts"), ('{"text": "x"}\n', "'prompt'"), ('{"prompt": \n', "not valid JSON")],
)
def test_read_prompts_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        generate.read_prompts(path)
    with pytest.raises(UserError, match="does not exist"):
        generate.read_prompts(tmp_path / "missing.txt")


def test_run_needs_a_prompt():
    args = cli.build_parser(["generate"]).parse_args(["generate"])
    with pytest.raises(UserError, match="--prompt"):
        generate.run(args)


def test_batches_do_not_change_samples():
    """Samples depend only on (seed, prompt index, sample index): any --batch-size gives
    what one call over all prompts gives."""
    config = LlamaConfig.tiny()
    params = Llama(config).init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))["params"]
    params = nn.unbox(params)
    params = {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * 40}}
    rows = [[5, 6, 7], [9], [30, 31, 32, 33, 34], [8, 8]]
    sampler = SamplerConfig(max_new_tokens=6, temperature=1.0, stop_tokens=(3, 4, 5), pad_token=0)
    options = dict(num_samples=2, seed=3)
    by_one = generate.generate(config, params, rows, sampler, batch_size=1, **options)
    by_three = generate.generate(config, params, rows, sampler, batch_size=3, **options)
    assert by_one == by_three
    tokens, mask = generate.left_pad(rows, 5, 0)
    out = jit_sample(config, params, tokens, mask, jax.random.key(3), sampler, group_size=2)
    for p, samples in enumerate(by_one):
        for g, (ids, stopped) in enumerate(samples):
            b = 2 * p + g
            full = out.tokens_BT[b, : int(out.lengths_B[b])].tolist()
            assert ids + ([full[-1]] if stopped else []) == full
            assert stopped == (not bool(out.truncated_B[b]))
    assert len({tuple(ids) for samples in by_one for ids, _ in samples}) > 4


def test_generate_smollm2_end_to_end(tmp_path, capsys):
    import smollm2

    model = smollm2.load()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say hello."}) + "\n", encoding="utf-8")
    code = cli.main(
        [
            "generate",
            "--model",
            smollm2.NAME,
            "--prompt",
            "What is the capital of France? Answer in one word.",
            "--prompts-file",
            str(prompts),
            "--system",
            "You are a terse assistant.",
            "--temperature",
            "0",
            "--num-samples",
            "2",
            "--max-new-tokens",
            "24",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    blocks = printed.split("=== prompt ")[1:]
    assert [b.split(":")[0] for b in blocks] == ["1/2", "2/2"]
    samples = [[s.strip() for s in re.split(r"--- sample \d/2 \(.*\)\n", b)[1:]] for b in blocks]
    assert all(len(s) == 2 and s[0] == s[1] for s in samples), "greedy samples are equal"
    assert "Paris" in samples[0][0]
    assert "(24 tokens, hit --max-new-tokens)" not in blocks[0]
    # Raw prompts are the tokenizer's ids as they are (BOS only if the tokenizer adds it).
    raw = generate.encode_prompts(["Hi there"], model.tokenizer, None, raw=True, system=None)
    assert raw == [model.tokenizer.encode("Hi there", add_special=True)]
    chat = generate.encode_prompts(["Hi"], model.tokenizer, model.chat, raw=False, system=None)
    assert chat == [model.prompt_ids([{"role": "user", "content": "Hi"}])]
    assert np.all(np.isin(generate.stop_ids(model.tokenizer, model.chat), [2]))


def _cli(capsys, *args):
    code = cli.main(list(args))
    return code, capsys.readouterr().err


def test_flags_are_checked_before_the_model_loads(capsys, tmp_path):
    missing = str(tmp_path / "no_such_model")
    for flags, named in [
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--top-p", "0"], "--top-p"),
        (["--top-k", "-1"], "--top-k"),
        (["--temperature", "-1"], "--temperature"),
    ]:
        code, err = _cli(capsys, "generate", "--model", missing, "--prompt", "x", *flags)
        assert code == 2 and named in err and "no_such_model" not in err, err


def test_empty_raw_prompt_is_refused(capsys):
    code, err = _cli(capsys, "generate", "--model", "tiny-random", "--raw", "--prompt", "")
    assert code == 2 and "Prompt 1 is empty" in err and "Traceback" not in err, err


def test_truncated_safetensors_is_named(capsys, tmp_path):
    import shutil

    from lsp_jax.weights import sources

    folder = tmp_path / "model"
    shutil.copytree(sources.resolve("tiny-random").path, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = _cli(capsys, "generate", "--model", str(folder), "--prompt", "hi")
    assert code == 2 and str(weights) in err and "truncated" in err, err
    root = Path(__file__).resolve().parent.parent
    code, err = _cli(
        capsys,
        "train",
        "--config",
        str(root / "configs" / "tiny.py"),
        "--workdir",
        str(tmp_path / "run"),
        f"--config.model.source={folder}",
    )
    assert code == 2 and str(weights) in err and "truncated" in err, err
