"""Ahead-of-time TPU compilation with libtpu's compiler on this CPU-only machine: topology
devices, per-chip memory against hand counts, refusals, analytic FLOPs, `lsp-jax aot`.

Needs libtpu (`pip install 'jax[tpu]'`); without it these tests fail, never skip.
"""

import dataclasses
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lsp_jax import cli
from lsp_jax.errors import UserError
from lsp_jax.model import Llama, LlamaConfig
from lsp_jax.runtime import sharding
from lsp_jax.tpu import aot, flop_counts, programs, topologies
from lsp_jax.train import config as config_lib
from lsp_jax.train import run as run_lib

TOPOLOGY = "v5e:2x2"
RULES = config_lib.default_config().mesh.rules
MiB, GiB = 2**20, 2**30


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((1, -1, 1), devices=topologies.topology_devices(TOPOLOGY))


@pytest.fixture(scope="module")
def tiny_step(mesh):
    """The tiny Llama's loss + grad + AdamW step, compiled for 4 v5e chips (FSDP)."""
    cfg = LlamaConfig.tiny(dtype=jnp.bfloat16, scan_layers=True, remat=True)
    fn, args = programs.loss_grad_program(cfg, mesh, RULES, batch=8, seq_len=64)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        report = aot.compile_report(fn, *args, topology=TOPOLOGY)
    return args, report


@pytest.mark.parametrize(
    "name, count, kind",
    [
        ("v5e:2x2", 4, "TPU v5 lite"),
        ("v5e:1x1", 1, "TPU v5 lite"),
        ("v5litepod:2x4", 8, "TPU v5 lite"),
        ("v4:2x2x1", 4, "TPU v4"),  # Megacore: one device per chip, not per TensorCore.
        ("v5p:2x2x1", 4, "TPU v5"),
        ("v6e:2x4", 8, "TPU v6 lite"),
    ],
)
def test_topology_devices_one_per_chip_and_cpu_stays_default(name, count, kind):
    environment = dict(os.environ)
    devices = topologies.topology_devices(name)
    assert dict(os.environ) == environment  # libtpu's settings are not left behind.
    assert len(devices) == count == topologies.num_chips(name)
    assert {d.platform for d in devices} == {"tpu"}
    assert {d.device_kind for d in devices} == {kind}
    assert jax.default_backend() == "cpu"


@pytest.mark.parametrize("name", ["v9:2x2", "v5e", "tpu", "v5e:2x2x1", "v4:2x2", "v5e:axb"])
def test_unknown_topologies_name_the_valid_ones(name):
    with pytest.raises(UserError, match="v5e:2x4") as error:
        topologies.topology_devices(name)
    assert repr(name) in str(error.value)


def test_topologies_libtpu_rejects_are_user_errors():
    with pytest.raises(UserError, match="v5e:3x3"):
        topologies.topology_devices("v5e:3x3")  # Not a whole number of 2x2 hosts.


def test_missing_libtpu_says_how_to_install(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else find_spec(name)
    )
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    with pytest.raises(UserError, match=r"pip install 'jax\[tpu\]"):
        topologies.topology_devices("v5e:2x2")


def test_tiny_step_arguments_match_a_hand_count(tiny_step):
    args, report = tiny_step
    # tiny: V 512, D 64, L 2, N 4, K 2, H 16, F 128, untied head; every weight has a
    # 64-wide 'embed' axis, split over the 4 chips.
    layer = 64 * 4 * 16 * 2 + 64 * 2 * 16 * 2 + 3 * 64 * 128 + 2 * 64
    params = 2 * 512 * 64 + 64 + 2 * layer
    count, tokens = 4, 8 * 64 * 4 // 4  # Adam's int32 step count (replicated), token rows.
    assert aot.per_chip_bytes(args) == 3 * params * 4 // 4 + count + tokens
    # The compiler pads small arrays to its tiles: at least the hand count, not wildly more.
    assert aot.per_chip_bytes(args) <= report.argument_bytes <= 4 * aot.per_chip_bytes(args)
    assert 0 < report.alias_bytes < report.argument_bytes  # Params and Adam donated.
    assert report.total_bytes > report.argument_bytes  # Activations on top of the state.
    assert report.compiled and report.fits and report.num_chips == 4
    assert report.capacity_bytes == int(15.75 * GiB)
    assert report.compile_seconds > 0 and report.code_bytes > 0


def test_a_tiny_hbm_budget_does_not_fit(tiny_step):
    _, report = tiny_step
    assert dataclasses.replace(report, capacity_bytes=report.total_bytes).fits
    squeezed = dataclasses.replace(report, capacity_bytes=report.total_bytes - 1)
    assert not squeezed.fits
    assert "DOES NOT FIT" in aot.format_report(squeezed)


def test_peak_counts_temporaries_by_hand(mesh):
    """x [4096, 256] f32 split by rows over 4 chips (1 MiB each); cumsum(x @ xᵀ) needs
    the [1024, 4096] f32 product (16 MiB) materialized on each chip."""
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    x = jax.ShapeDtypeStruct((4096, 256), jnp.float32, sharding=rows)
    fn = jax.jit(lambda x: jnp.cumsum(x @ x.T, axis=1)[:, -128:])
    report = aot.compile_report(fn, x, topology=TOPOLOGY)
    assert report.argument_bytes == 1 * MiB
    assert report.output_bytes == 1024 * 128 * 4
    assert report.alias_bytes == 0
    assert 16 * MiB <= report.peak_temp_bytes <= 3 * 16 * MiB
    assert report.total_bytes == report.argument_bytes + report.output_bytes + (
        report.peak_temp_bytes
    )


def test_compiler_refusal_is_a_report_that_does_not_fit():
    device = topologies.topology_devices("v5e:1x1")[0]
    one_chip = jax.sharding.Mesh([device], ("chip",))
    huge = jax.ShapeDtypeStruct(
        (2**38,), jnp.float32, sharding=NamedSharding(one_chip, PartitionSpec())
    )
    report = aot.compile_report(jax.jit(lambda x: x + 1), huge, topology="v5e:1x1")
    assert not report.compiled and not report.fits
    assert report.argument_bytes == 2**40  # 1 TiB in, 1 TiB out.
    assert report.total_bytes == pytest.approx(2 * 2**40, rel=1e-3)
    assert "RESOURCE_EXHAUSTED" in report.message
    assert "DOES NOT FIT" in aot.format_report(report)


@pytest.mark.parametrize("generation", sorted(topologies.TOPOLOGIES))
def test_usable_hbm_is_what_the_compiler_allows(generation):
    g = topologies.TOPOLOGIES[generation]
    assert aot.compiler_hbm_limit(g.examples[0]) == pytest.approx(g.usable_hbm_bytes, abs=GiB / 100)
    assert g.usable_hbm_bytes <= g.hbm_bytes * 1.01


def test_mfu_and_the_report_table(tiny_step):
    _, report = tiny_step
    assert aot.mfu(1e15, 2.0, 4, 197e12) == pytest.approx(1e15 / (2.0 * 4 * 197e12))
    text = aot.format_report(report, flops_per_iteration=1e15, step_time_s=2.0)
    assert "v5e:2x2" in text and "fits" in text
    assert "MFU at 2 s/iteration    63.45%" in text
    assert "1.269 s" in text  # 1e15 / (4 · 197e12): the time at 100% MFU.
    parts = {"policy_train": 6e14, "judge": 4e14, "total": 1e15}
    assert "policy_train" in aot.format_report(report, flops_per_iteration=parts)


# Tiny's FLOPs per token (multiply-add = 2): blocks 2·L·(D·N·H·2 + 2·D·K·H + 3·D·F)
# = 2·2·(8192 + 4096 + 24576) = 147456; head 2·D·V = 65536; attention 4·L·N·H = 512
# per attended key.
BLOCKS, HEAD, PER_KEY = 147456, 65536, 512


def test_llama_flops_by_hand():
    cfg = LlamaConfig.tiny()
    assert flop_counts.llama_flops(cfg, 10, training=False) == 10 * (BLOCKS + HEAD)
    forward = 10 * BLOCKS + 10 * HEAD + 10 * 10 * PER_KEY
    assert flop_counts.llama_flops(cfg, 10, context=10, training=False) == forward
    assert flop_counts.llama_flops(cfg, 10, context=10) == 3 * forward
    assert flop_counts.llama_flops(cfg, 10, head_tokens=1, training=False) == 10 * BLOCKS + HEAD
    classifier = cfg.replace(num_labels=1)
    assert flop_counts.llama_flops(classifier, 10, training=False) == 10 * (BLOCKS + 2 * 64)


def test_llama_flops_agree_with_xla_on_an_unscanned_forward():
    cfg = LlamaConfig.tiny(
        dim=256, mlp_dim=512, num_heads=8, num_kv_heads=4, head_dim=32, vocab_size=1024
    )
    tokens_BT = jnp.zeros((2, 32), jnp.int32)
    params = jax.eval_shape(Llama(cfg).init, jax.random.key(0), tokens_BT)
    forward = jax.jit(Llama(cfg).apply).lower(params, tokens_BT).compile()
    ours = flop_counts.llama_flops(cfg, 64, context=32, training=False)
    # XLA also counts norms, RoPE, softmax (a few %); no loops here, so it counts all.
    assert forward.cost_analysis()["flops"] == pytest.approx(ours, rel=0.03)


def test_self_play_flops_by_hand():
    def forward(tokens, head_tokens, keys):  # keys: attended keys summed over tokens.
        return tokens * BLOCKS + head_tokens * HEAD + keys * PER_KEY

    # N 2, G 3, challenger prompt 5, query 4, answer 6, solver template 2 (prompt 6).
    parts = flop_counts.self_play_flops(
        LlamaConfig.tiny(),
        num_queries=2,
        answers_per_query=3,
        challenger_prompt_tokens=5,
        query_tokens=4,
        answer_tokens=6,
        solver_template_tokens=2,
        judge_template_tokens=3,
    )
    challenger = forward(5, 1, 5 * 5) + forward(2 * 4, 2 * 4, 2 * 4 * (5 + 2))
    solver = forward(2 * 6, 2, 2 * 6 * 6) + forward(6 * 6, 6 * 6, 6 * 6 * (6 + 3))
    judge = forward(6 * 13, 6, 6 * 13 * 13)  # 3 + 4 + 6 tokens per judged pair.
    scored = forward(6 * 12, 6 * 6, 6 * 12 * 12) + forward(2 * 9, 2 * 4, 2 * 9 * 9)
    assert parts["challenger_generation"] == challenger
    assert parts["solver_generation"] == solver
    assert parts["judge"] == judge
    assert parts["reward_model"] == 0
    assert parts["reference_logprobs"] == scored
    assert parts["policy_train"] == 3 * scored
    assert parts["total"] == challenger + solver + judge + 4 * scored


def test_step_flops_reads_the_step_config_and_templates():
    config = config_lib.load_config("configs/tiny.py")
    run = run_lib.build_run(config)
    parts = flop_counts.step_flops(run.step_cfg, run.frozen.templates)
    assert config.game.mode == "lsp"  # A Challenger and the reference judge.
    assert parts["judge"] > 0 and parts["challenger_generation"] > 0
    assert (parts["reward_model"] > 0) == (config.reward.kind == "model")
    assert parts["policy_train"] == 3 * parts["reference_logprobs"]  # Same architecture.
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))


def _small_iteration(config, mesh):
    """A stand-in for run_lib.abstract_iteration: x @ xᵀ over rows, on the CLI's mesh."""
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    side = 64 * config.game.num_queries
    x = jax.ShapeDtypeStruct((side, 128), jnp.float32, sharding=rows)
    return jax.jit(lambda x: x @ x.T), (x,), {"policy_train": 3e12, "total": 3e12}


def _huge_iteration(config, mesh):
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    x = jax.ShapeDtypeStruct((2**16, 2**16), jnp.float32, sharding=rows)  # 16 GiB on one chip.
    return jax.jit(lambda x: jnp.cumsum(x, axis=0) * 2), (x,)


def test_cli_prints_the_report(monkeypatch, capsys):
    seen = {}

    def fake(config, mesh):
        seen.update(queries=config.game.num_queries, devices=mesh.devices.size)
        return _small_iteration(config, mesh)

    monkeypatch.setattr(run_lib, "abstract_iteration", fake, raising=False)
    argv = ["aot", "--config", "configs/tiny.py", "--topology", TOPOLOGY, "--step-time", "2"]
    assert cli.main(argv + ["--config.game.num_queries=4"]) == 0
    assert seen == {"queries": 4, "devices": 4}
    out = capsys.readouterr().out
    assert "v5e:2x2: 4 chips" in out and "fits" in out and "policy_train" in out
    assert "MFU at 2 s/iteration" in out
    assert "Roofline ESTIMATE on v5e" in out and "iteration (sum)" in out

    # Two slices joined over the data-center network: data parallel across them.
    assert cli.main(argv + ["--config.mesh.dcn_shape=2,1,1", "--config.mesh.shape=1,4,1"]) == 0
    assert seen["devices"] == 8
    assert "v5e:2x2 x 2 slices: 8 chips" in capsys.readouterr().out


def test_cli_exits_1_with_the_numbers_when_it_does_not_fit(monkeypatch, capsys):
    monkeypatch.setattr(run_lib, "abstract_iteration", _huge_iteration, raising=False)
    argv = ["aot", "--config", "configs/tiny.py", "--topology", "v5e:1x1"]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out
    assert "does not fit on v5e:1x1" in captured.err and "15.75 GiB" in captured.err


def test_cli_user_errors(monkeypatch, capsys):
    monkeypatch.setattr(run_lib, "abstract_iteration", _small_iteration, raising=False)
    assert cli.main(["aot", "--config", "configs/tiny.py", "--topology", "v7:2x2"]) == 2
    assert "Unknown TPU topology 'v7:2x2'" in capsys.readouterr().err
    monkeypatch.delattr(run_lib, "abstract_iteration", raising=False)
    assert cli.main(["aot", "--config", "configs/tiny.py", "--topology", TOPOLOGY]) == 2
    assert "abstract_iteration" in capsys.readouterr().err


def _sampler_hlo(rollout: bool) -> str:
    """A small model's sampler (8 rows, 16 new tokens) compiled for v5e:2x4 from
    FSDP-sharded float32 parameters, in the rollout layout or in the training layout."""
    defaults = config_lib.default_config().mesh
    rules = run_lib.rules_table(defaults.rules)
    rollout_rules = run_lib.rules_table(defaults.rollout_rules) if rollout else ()
    mesh = sharding.make_mesh((1, -1, 1), devices=topologies.topology_devices("v5e:2x4"))
    cfg = LlamaConfig.tiny(
        vocab_size=8192,
        dim=512,
        num_heads=8,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=2048,
        dtype=jnp.bfloat16,
        scan_layers=True,
    )
    fn, args = programs.sampler_program(cfg, mesh, rules, rollout_rules=rollout_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return fn.lower(*args).compile().as_text()


def test_decode_steps_gather_no_weights_in_the_rollout_layout():
    from lsp_jax.tpu import hlo

    # Training layout (FSDP) inside the decode loop: every step gathers each layer's
    # weights and the LM head (here > 1 MiB), which is what the rollout layout removes.
    fsdp = hlo.program_costs(_sampler_hlo(rollout=False))
    (loop_fsdp,) = fsdp.decode_loops
    assert loop_fsdp.largest_all_gather > MiB
    assert loop_fsdp.steps == 15
    rollout = hlo.program_costs(_sampler_hlo(rollout=True))
    (loop_tp,) = rollout.decode_loops
    assert loop_tp.largest_all_gather <= MiB
    # What moves per step is activations: tens of KiB, not the ~25 MiB of bf16 weights.
    assert loop_tp.per_step.all_gather_bytes < 0.01 * loop_fsdp.per_step.all_gather_bytes
    assert loop_tp.per_step.total_collective_bytes < 256 * 2**10
