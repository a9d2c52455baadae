"""Ahead-of-time TPU compilation on any machine: per-chip HBM, FLOPs and MFU of a program.

libtpu (installed by `pip install 'jax[tpu]'`) contains the TPU compiler, and it
compiles for a *described* topology without any TPU attached: devices from
`jax.experimental.topologies.get_topology_desc` can back a mesh, jitted functions
lower and compile against ShapeDtypeStructs sharded over it, and the executable's
`memory_analysis()` tells how much HBM each chip would need. JAX's default backend
stays whatever it was (CPU here), so this runs beside CPU tests.

Usage:
    devices = topology_devices("v5e:2x4")
    mesh = sharding.make_mesh((1, -1, 1), devices=devices)
    fn, args = ...  # jitted function and ShapeDtypeStructs with NamedShardings on `mesh`
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # If fn uses logical names.
        report = compile_report(fn, *args, topology="v5e:2x4")
    print(format_report(report, flops_per_iteration=..., step_time_s=...))
"""

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import time
import warnings

import jax
import numpy as np

from lsp_jax.errors import UserError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """One TPU chip generation.

    hbm_bytes: HBM per chip on the data sheet.
    usable_hbm_bytes: what libtpu's compiler lets one program use per chip (it refuses
      bigger programs); read from its out-of-memory message, see `compiler_hbm_limit`.
    peak_flops: dense bf16 FLOP/s per chip.
    hbm_bandwidth: HBM bytes/s per chip.
    ici_bandwidth: inter-chip interconnect bytes/s per chip, one direction (the
      data sheets' Gbps figure / 8), for roofline estimates of collectives.
    num_dims: 2 (v5e, v6e: 2D torus, 'v5e:2x4') or 3 (v4, v5p: 'v4:2x2x1').
    chip_config: libtpu's chip_config_name; 'megacore' shows a chip's two TensorCores
      as one device, as JAX does on v4 and v5p VMs.
    """

    name: str
    hbm_bytes: int
    usable_hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    ici_bandwidth: float
    num_dims: int
    chip_config: str
    examples: tuple[str, ...]


TOPOLOGIES = {
    g.name: g
    for g in (
        TpuGeneration(
            name="v4",
            hbm_bytes=32 * GiB,
            usable_hbm_bytes=int(30.75 * GiB),
            peak_flops=275e12,
            # Cloud TPU docs, "TPU v4": HBM2 32 GiB at 1200 GBps. ICI 2400 Gbps per chip
            # (v5p's 4800 Gbps is announced as twice v4's).
            hbm_bandwidth=1200e9,
            ici_bandwidth=2400e9 / 8,
            num_dims=3,
            chip_config="megacore",
            examples=("v4:2x2x1", "v4:2x2x2"),
        ),
        TpuGeneration(
            name="v5e",
            hbm_bytes=16 * GiB,
            usable_hbm_bytes=int(15.75 * GiB),
            peak_flops=197e12,
            # Cloud TPU docs, "TPU v5e": HBM2 16 GB at 819 GBps; ICI 1600 Gbps per chip.
            hbm_bandwidth=819e9,
            ici_bandwidth=1600e9 / 8,
            num_dims=2,
            chip_config="default",
            examples=("v5e:1x1", "v5e:2x2", "v5e:2x4"),
        ),
        TpuGeneration(
            name="v5p",
            hbm_bytes=95 * GiB,
            usable_hbm_bytes=int(95.74 * GiB),
            peak_flops=459e12,
            # Cloud TPU docs, "TPU v5p": HBM2e 95 GB at 2765 GBps; ICI 4800 Gbps per chip.
            hbm_bandwidth=2765e9,
            ici_bandwidth=4800e9 / 8,
            num_dims=3,
            chip_config="megacore",
            examples=("v5p:2x2x1", "v5p:2x2x2"),
        ),
        TpuGeneration(
            name="v6e",
            hbm_bytes=32 * GiB,
            usable_hbm_bytes=int(31.25 * GiB),
            peak_flops=918e12,
            # Cloud TPU docs, "TPU v6e": HBM 32 GB at 1640 GBps; ICI 3584 Gbps per chip.
            hbm_bandwidth=1640e9,
            ici_bandwidth=3584e9 / 8,
            num_dims=2,
            chip_config="default",
            examples=("v6e:1x1", "v6e:2x4"),
        ),
    )
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v6lite": "v6e"}
# libtpu places 2x2x1 chips on each host by default; smaller slices need smaller bounds.
DEFAULT_CHIPS_PER_HOST = (2, 2, 1)


def _valid_names() -> str:
    return ", ".join(e for g in TOPOLOGIES.values() for e in g.examples)


def parse_topology(name: str) -> tuple[TpuGeneration, tuple[int, ...]]:
    """'v5e:2x4' -> (the v5e generation, (2, 4)). Raises UserError for unknown names."""
    gen_name, sep, shape_text = str(name).strip().lower().partition(":")
    gen_name = ALIASES.get(gen_name, gen_name)
    generation = TOPOLOGIES.get(gen_name)
    hint = f"Write GENERATION:SHAPE with a generation in {list(TOPOLOGIES)}, e.g. {_valid_names()}."
    if generation is None or not sep:
        raise UserError(f"Unknown TPU topology {name!r}. {hint}")
    try:
        shape = tuple(int(s) for s in shape_text.split("x"))
    except ValueError:
        raise UserError(f"Bad chip layout in TPU topology {name!r}. {hint}") from None
    if len(shape) != generation.num_dims or min(shape) < 1:
        raise UserError(
            f"TPU topology {name!r}: {generation.name} slices are {generation.num_dims}-D chip "
            f"grids like {generation.examples[-1]!r}. {hint}"
        )
    return generation, shape


def num_chips(topology: str) -> int:
    return math.prod(parse_topology(topology)[1])


# Read by libtpu when it loads. Without TPU chips they stop its search for TPU hosts
# (which only warns) and its single-process lockfile (compile-only use may run next to
# other JAX processes that loaded libtpu).
_NO_TPU_ENVIRONMENT = {
    "TPU_SKIP_MDS_QUERY": "1",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_ACCELERATOR_TYPE": "v5litepod-8",
    "TPU_WORKER_HOSTNAMES": "localhost",
}


@contextlib.contextmanager
def _libtpu_environment():
    """Sets _NO_TPU_ENVIRONMENT (where unset) while libtpu loads, on machines without
    TPU chips only; restores the environment afterwards."""
    try:
        from jax._src import hardware_utils

        chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    except Exception:  # Private API moved: assume a machine without TPUs.
        chips = 0
    added = {} if chips else {k: v for k, v in _NO_TPU_ENVIRONMENT.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _check_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        raise UserError(
            "TPU ahead-of-time compilation needs libtpu, the TPU compiler: "
            f"pip install 'jax[tpu]=={jax.__version__}' (it works on machines without TPUs)."
        )


def topology_devices(name: str, *, num_slices: int = 1) -> list:
    """Compile-only devices of a TPU slice, one per chip, e.g. 8 for 'v5e:2x4'.

    num_slices > 1 describes that many slices joined by the data-center network
    (multi-slice); the devices then carry `slice_index` for sharding.make_mesh's
    dcn_shape. Raises UserError for unknown names (listing valid ones) and when
    libtpu is missing.
    """
    generation, shape = parse_topology(name)
    _check_libtpu()
    from jax.experimental import topologies

    shape3 = shape + (1,) * (3 - len(shape))
    per_host = [min(s, d) for s, d in zip(shape3, DEFAULT_CHIPS_PER_HOST)]
    libtpu_name = f"{generation.name}:{'x'.join(map(str, shape))}"
    slices = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        with _libtpu_environment():
            topology = topologies.get_topology_desc(
                platform="tpu",
                topology_name=libtpu_name,
                chip_config_name=generation.chip_config,
                chips_per_host_bounds=per_host,
                **slices,
            )
    except RuntimeError as error:  # JaxRuntimeError is a RuntimeError.
        raise UserError(
            f"libtpu cannot build TPU topology {name!r}: {error}. Valid examples: {_valid_names()}."
        ) from None
    return list(topology.devices)


@dataclasses.dataclass(frozen=True)
class Report:
    """What the TPU compiler says about one program, per chip (bytes).

    total_bytes ("total") is the compiler's peak of live HBM, `peak_memory_in_bytes`:
    arguments, outputs and temporaries alive at the worst moment, a donated argument
    and the output reusing it counted once. It is what libtpu checks against HBM: it
    compiled a 3B step whose peak was 14.9 GiB although arguments + outputs - donated +
    `temp_size_in_bytes` came to 16.6 GiB on a 15.75 GiB v5e chip. temp_bytes is that
    raw `temp_size_in_bytes`, which on TPU is not the temporaries at the peak: it
    leaves out smaller buffers (0 for programs with a 16 MiB intermediate) and covers
    buffers never live together; `peak_temp_bytes` is total minus the live arguments
    and outputs. When the compiler refuses a program (`compiled` False) total_bytes is
    the requirement its error message states, argument_bytes is computed from the
    argument shardings, and the other sizes are unknown (0).
    """

    topology: str
    num_chips: int  # In all slices.
    capacity_bytes: int
    compile_seconds: float
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    code_bytes: int
    alias_bytes: int
    total_bytes: int
    compiled: bool = True
    num_slices: int = 1
    xla_flops: float | None = None  # cost_analysis(): loop bodies counted once.
    message: str = ""
    hlo_text: str = dataclasses.field(default="", repr=False)  # The compiled program.

    @property
    def fits(self) -> bool:
        return self.compiled and self.total_bytes <= self.capacity_bytes

    @property
    def peak_temp_bytes(self) -> int:
        """Temporaries live at the peak: total - arguments - (outputs - donated)."""
        live_outputs = self.output_bytes - self.alias_bytes
        return self.total_bytes - self.argument_bytes - live_outputs


def compile_report(
    jitted_fn,
    *abstract_args,
    topology: str,
    num_slices: int = 1,
    capacity_bytes: int | None = None,
):
    """Lowers and compiles `jitted_fn(*abstract_args)` and reads its memory analysis.

    Args:
      jitted_fn: a `jax.jit`-wrapped function (plain functions are wrapped).
      abstract_args: pytrees of jax.ShapeDtypeStruct whose shardings live on a mesh of
        `topology_devices(topology)`.
      topology: the slice name the devices came from, e.g. 'v5e:2x4'.
      num_slices: how many such slices the devices span (multi-slice).
      capacity_bytes: HBM per chip to compare with (default: what the compiler allows).
    Returns:
      A Report; an out-of-memory refusal by the compiler is a Report with fits False.
    """
    generation, _ = parse_topology(topology)
    capacity = generation.usable_hbm_bytes if capacity_bytes is None else int(capacity_bytes)
    if not hasattr(jitted_fn, "lower"):
        jitted_fn = jax.jit(jitted_fn)
    common = dict(
        topology=topology,
        num_chips=num_slices * num_chips(topology),
        num_slices=num_slices,
        capacity_bytes=capacity,
    )
    start = time.perf_counter()
    lowered = jitted_fn.lower(*abstract_args)
    try:
        with warnings.catch_warnings():
            # With a persistent compilation cache (tests), jax stores compile-only
            # executables but cannot load them back; it warns and compiles again.
            warnings.filterwarnings("ignore", "Error reading persistent compilation cache")
            compiled = lowered.compile()
    except Exception as error:  # XLA raises JaxRuntimeError; only out-of-memory is ours.
        required = _required_bytes(str(error))
        if "RESOURCE_EXHAUSTED" not in str(error) or required is None:
            raise
        return Report(
            **common,
            compile_seconds=time.perf_counter() - start,
            argument_bytes=per_chip_bytes(abstract_args),
            output_bytes=0,
            temp_bytes=0,
            code_bytes=0,
            alias_bytes=0,
            total_bytes=required,
            compiled=False,
            message=str(error).strip().splitlines()[0],
        )
    seconds = time.perf_counter() - start
    return _report_from(compiled, seconds, common)


def _report_from(compiled, seconds, common) -> Report:
    m = compiled.memory_analysis()
    summed = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Report(
        **common,
        compile_seconds=seconds,
        argument_bytes=int(m.argument_size_in_bytes),
        output_bytes=int(m.output_size_in_bytes),
        temp_bytes=int(m.temp_size_in_bytes),
        code_bytes=int(m.generated_code_size_in_bytes),
        alias_bytes=int(m.alias_size_in_bytes),
        total_bytes=int(getattr(m, "peak_memory_in_bytes", 0) or summed),
        xla_flops=(cost or {}).get("flops"),
        hlo_text=compiled.as_text(),
    )


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_REQUIRED_PATTERNS = (
    r"required for HLO temporaries \(([\d.]+)\s*([KMGT]?)",  # libtpu 0.0.4x
    r"Used ([\d.]+)\s*([KMGT]?) of [\d.]+\s*[KMGT]? hbm",  # older libtpu
)
_AVAILABLE_PATTERNS = (
    r"exceeds available HBM \(([\d.]+)\s*([KMGT]?)",
    r"Used [\d.]+\s*[KMGT]? of ([\d.]+)\s*([KMGT]?) hbm",
)


def _parse_bytes(message: str, patterns) -> int | None:
    for pattern in patterns:
        match = re.search(pattern, message)
        if match:
            return int(float(match.group(1)) * _UNITS[match.group(2)])
    return None


def _required_bytes(message: str) -> int | None:
    return _parse_bytes(message, _REQUIRED_PATTERNS)


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a pytree of sharded ShapeDtypeStructs (or arrays)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def compiler_hbm_limit(topology: str) -> int:
    """The HBM per chip libtpu's compiler allows, read from the message with which it
    refuses a program that needs 2 TiB on one chip (checks TOPOLOGIES' usable_hbm_bytes)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    device = topology_devices(topology)[0]
    mesh = Mesh(np.asarray([device]), ("chip",))
    replicated = NamedSharding(mesh, PartitionSpec())
    too_big = jax.ShapeDtypeStruct((2**39,), np.float32, sharding=replicated)
    try:
        jax.jit(lambda x: x * 2).lower(too_big).compile()
    except Exception as error:
        limit = _parse_bytes(str(error), _AVAILABLE_PATTERNS)
        if limit is not None:
            return limit
        raise
    raise RuntimeError(f"libtpu compiled a 4 TiB program for {topology}; cannot read its limit.")


# ---------------------------------------------------------------------------------------
# Reports.


def mfu(flops: float, step_time_s: float, num_chips: int, peak_flops: float) -> float:
    """Model FLOPs utilization: flops / (step_time · chips · peak FLOP/s per chip)."""
    return flops / (step_time_s * num_chips * peak_flops)


def _gib(n: float) -> str:
    """Bytes in GiB, or MiB / KiB for small programs."""
    for unit, size in (("GiB", GiB), ("MiB", 2**20)):
        if abs(n) >= size:
            return f"{n / size:8.2f} {unit}"
    return f"{n / 2**10:8.2f} KiB"


def format_report(report: Report, *, flops_per_iteration=None, step_time_s=None) -> str:
    """A table of per-chip HBM against capacity, and FLOPs/MFU if given.

    flops_per_iteration: a number, or a dict of named parts (e.g. from
      `self_play_flops`) whose 'total' entry is used.
    step_time_s: a measured or hoped-for iteration time; gives the MFU it would mean.
    """
    generation, _ = parse_topology(report.topology)
    cap = report.capacity_bytes
    pct = lambda n: f"{100 * n / cap:6.1f}%"
    slices = f" x {report.num_slices} slices" if report.num_slices > 1 else ""
    lines = [
        f"TPU {report.topology}{slices}: {report.num_chips} chips, {cap / GiB:.2f} GiB usable "
        f"HBM per chip, compiled in {report.compile_seconds:.1f} s",
        "per chip                  bytes      of HBM",
        f"  arguments        {_gib(report.argument_bytes)}  {pct(report.argument_bytes)}",
    ]
    if report.compiled:
        outputs = report.output_bytes - report.alias_bytes
        temps = report.peak_temp_bytes
        lines += [
            f"  outputs          {_gib(outputs)}  {pct(outputs)}  (not in donated buffers)",
            f"  temporaries      {_gib(temps)}  {pct(temps)}  (live at the peak)",
        ]
    verdict = "fits" if report.fits else "DOES NOT FIT"
    total = report.total_bytes
    lines.append(f"  total (peak)     {_gib(total)}  {pct(total)}  {verdict}")
    if report.compiled:
        lines.append(
            f"  (XLA: temp allocation {_gib(report.temp_bytes).strip()}, donated "
            f"{_gib(report.alias_bytes).strip()}, generated code {_gib(report.code_bytes).strip()})"
        )
    if report.message:
        lines.append(f"  compiler: {report.message}")
    lines += _flops_lines(report, generation, flops_per_iteration, step_time_s)
    return "\n".join(lines)


def _flops_lines(report, generation, flops, step_time_s) -> list[str]:
    lines = []
    if isinstance(flops, dict):
        lines.append("FLOPs per iteration (analytic):")
        lines += [f"  {k:<24} {v:10.3e}" for k, v in flops.items() if k != "total"]
        flops = flops["total"]
    if flops is None:
        if report.xla_flops:
            lines.append(
                f"XLA cost analysis: {report.xla_flops:.3e} FLOPs per chip (counts loop "
                "bodies once: an undercount for scanned layers and decode loops)"
            )
        return lines
    peak = report.num_chips * generation.peak_flops
    lines.append(
        f"FLOPs per iteration      {flops:10.3e}  ({flops / report.num_chips:.3e} per chip; "
        f"{generation.peak_flops / 1e12:.0f} TFLOP/s bf16 peak per chip)"
    )
    lines.append(f"  time at 100% MFU       {flops / peak:10.3f} s")
    if step_time_s:
        value = mfu(flops, step_time_s, report.num_chips, generation.peak_flops)
        lines.append(f"  MFU at {step_time_s:g} s/iteration   {100 * value:6.2f}%")
    return lines


# ---------------------------------------------------------------------------------------
# Analytic FLOPs. XLA's cost_analysis() counts a loop body once (scanned layers, decode
# while-loops), so the numbers that matter are counted here by hand.


def matmul_params(config) -> int:
    """Weights every token multiplies by in the transformer blocks (no embedding, no head):
    L · (D·N·H + 2·D·K·H + N·H·D + 3·D·F)."""
    c = config
    attention = c.dim * c.num_heads * c.head_dim * 2 + 2 * c.dim * c.num_kv_heads * c.head_dim
    return c.num_layers * (attention + 3 * c.dim * c.mlp_dim)


def head_params(config) -> int:
    """D·V for a language model (tied or not), D·C for a sequence classifier."""
    return config.dim * (config.num_labels if config.is_classifier else config.vocab_size)


def llama_flops(config, num_tokens, *, context=0, head_tokens=None, training=True) -> float:
    """FLOPs of pushing `num_tokens` tokens through a Llama (multiply-add = 2 FLOPs).

    forward = 2 · matmul_params · num_tokens            (q, k, v, o projections, SwiGLU)
            + 2 · head_params · head_tokens             (LM head or score head)
            + 4 · L · N · H · context · num_tokens      (q·kᵀ scores and the weighted
                                                         sum of values, per attended key)
    training = 3 · forward (the backward pass costs twice the forward). Recomputation
    by remat is not counted: this is model FLOPs, the numerator of MFU.

    Args:
      config: a LlamaConfig.
      num_tokens: tokens processed (rows × length).
      context: keys each token attends to, on average. Our attention computes full masked
        [T, S] scores, so a full pass over length T attends to T keys (the PaLM MFU
        convention); a decode step attends to the cache slots it reads. 0 counts the
        matmuls only (the 6·params·tokens rule).
      head_tokens: tokens the head is applied to (default num_tokens).
      training: forward + backward (x3) instead of forward only.
    """
    head_tokens = num_tokens if head_tokens is None else head_tokens
    c = config
    forward = (
        2 * matmul_params(c) * num_tokens
        + 2 * head_params(c) * head_tokens
        + 4 * c.num_layers * c.num_heads * c.head_dim * context * num_tokens
    )
    return float(3 * forward if training else forward)


def generation_flops(config, *, prompt_rows, prompt_len, rows, new_tokens) -> float:
    """Prefill of `prompt_rows` prompts (head on the last position only), then `rows`
    rows decoding `new_tokens` tokens each, attending to the prompt plus on average
    half of what was generated (every row runs to `new_tokens`: an upper bound)."""
    prefill = llama_flops(
        config,
        prompt_rows * prompt_len,
        context=prompt_len,
        head_tokens=prompt_rows,
        training=False,
    )
    decode_tokens = rows * new_tokens
    context = prompt_len + new_tokens / 2
    return prefill + llama_flops(config, decode_tokens, context=context, training=False)


def self_play_flops(
    policy,
    *,
    num_queries,
    answers_per_query,
    challenger_prompt_tokens,
    query_tokens,
    answer_tokens,
    solver_template_tokens=0,
    reference=None,
    reward_model=None,
    rm_template_tokens=0,
    judge=True,
    judge_template_tokens=0,
    judge_new_tokens=0,
    train_challenger=True,
) -> dict[str, float]:
    """Analytic FLOPs of one self-play iteration (lsp_step), by phase, and their 'total'.

    With N = num_queries, G = answers_per_query, Pc / Q / A the challenger prompt /
    query / answer lengths, Ps = solver_template_tokens + Q the Solver's prompt:
      challenger_generation  prefill 1 × Pc (broadcast to N rows), decode N × Q
      solver_generation      prefill N × Ps (broadcast to G rows), decode N·G × A
      judge                  reference forward N·G × (judge template + Q + A), score read
                             at the last position; in sampled mode (judge_new_tokens >
                             0) that forward is a prefill followed by N·G × judge_new_tokens
                             decode steps
      reward_model           reward-model forward N·G × (rm template + Q + A)
      reference_logprobs     reference forward on the Solver rows N·G × (Ps + A) and
                             (train_challenger) the Challenger rows N × (Pc + Q)
      policy_train           forward + backward (3x) on the same rows with the policy
    Generation counts every row to its maximum length (an upper bound: rows stop at
    their stop token). Norms, softmax, sampling and the optimizer are left out (<1%).
    """
    reference = policy if reference is None else reference
    n, g = num_queries, answers_per_query
    solver_prompt = solver_template_tokens + query_tokens
    pair = query_tokens + answer_tokens
    parts = {
        "challenger_generation": 0.0
        if not train_challenger
        else generation_flops(
            policy,
            prompt_rows=1,
            prompt_len=challenger_prompt_tokens,
            rows=n,
            new_tokens=query_tokens,
        ),
        "solver_generation": generation_flops(
            policy, prompt_rows=n, prompt_len=solver_prompt, rows=n * g, new_tokens=answer_tokens
        ),
        "judge": 0.0,
        "reward_model": 0.0,
    }
    if judge:
        judged = judge_template_tokens + pair
        parts["judge"] = (
            generation_flops(
                reference,
                prompt_rows=n * g,
                prompt_len=judged,
                rows=n * g,
                new_tokens=judge_new_tokens,
            )
            if judge_new_tokens
            else llama_flops(
                reference, n * g * judged, context=judged, head_tokens=n * g, training=False
            )
        )
    if reward_model is not None:
        scored = rm_template_tokens + pair
        parts["reward_model"] = llama_flops(
            reward_model, n * g * scored, context=scored, training=False
        )
    rows = [(n * g, solver_prompt, answer_tokens)]
    if train_challenger:
        rows.append((n, challenger_prompt_tokens, query_tokens))

    def scored_rows(config, training):
        return sum(
            llama_flops(config, b * (p + a), context=p + a, head_tokens=b * a, training=training)
            for b, p, a in rows
        )

    parts["reference_logprobs"] = scored_rows(reference, False)
    parts["policy_train"] = scored_rows(policy, True)
    parts["total"] = sum(parts.values())
    return parts


def _piece_len(piece) -> int:
    """Length of a template piece: (ids [1, n], lengths [1]) or a flat id array."""
    ids = piece[0] if isinstance(piece, tuple) else piece
    return int(np.shape(ids)[-1])


def step_flops(step_cfg, templates) -> dict[str, float]:
    """`self_play_flops` for a lsp_jax.train.step.StepConfig and its GameTemplates."""
    t = templates
    sampled_judge = step_cfg.judge_mode == "sampled" and step_cfg.judge is not None
    return self_play_flops(
        step_cfg.policy,
        num_queries=step_cfg.num_queries,
        answers_per_query=step_cfg.answers_per_query,
        challenger_prompt_tokens=_piece_len(t.challenger_prompt),
        query_tokens=step_cfg.challenger.max_new_tokens,
        answer_tokens=step_cfg.solver.max_new_tokens,
        solver_template_tokens=_piece_len(t.user_prefix) + _piece_len(t.user_suffix),
        reference=step_cfg.reference,
        reward_model=step_cfg.reward_model if step_cfg.reward_kind == "model" else None,
        rm_template_tokens=sum(_piece_len(p) for p in (t.rm_prefix, t.rm_middle, t.rm_suffix)),
        judge=step_cfg.uses_judge,
        judge_template_tokens=sum(
            _piece_len(p) for p in (t.judge_prefix, t.judge_middle, t.judge_suffix)
        ),
        judge_new_tokens=step_cfg.judge.max_new_tokens if sampled_judge else 0,
        train_challenger=step_cfg.mode != "grpo",
    )


# ---------------------------------------------------------------------------------------
# A stand-in program: one supervised step of a Llama (what the self-play iteration's
# policy update costs, without rollouts). Used by tests and benchmarks/aot_memory.py.


def loss_grad_program(model_cfg, mesh, rules, *, batch: int, seq_len: int, learning_rate=1e-5):
    """A jitted next-token cross-entropy + AdamW step and its abstract arguments.

    Parameters and both Adam moments are sharded by their logical names (`rules`, e.g.
    config.mesh.rules: FSDP puts 'embed' on the 'fsdp' axis), tokens by rows over
    data × fsdp; parameters and optimizer state are donated.

    Returns:
      (jitted_fn, (params, opt_state, tokens_BT)) with ShapeDtypeStructs for arguments;
      jitted_fn(params, opt_state, tokens_BT) -> (params', opt_state', loss).
    """
    import flax.linen as nn
    import jax.numpy as jnp
    import optax

    from lsp_jax.model import Llama
    from lsp_jax.runtime import sharding

    model = Llama(model_cfg)
    optimizer = optax.adamw(learning_rate)
    tokens_BT = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

    def init(rng):
        params = model.init(rng, jnp.zeros(tokens_BT.shape, jnp.int32))["params"]
        return params, optimizer.init(params)  # Boxes carry over to the Adam moments.

    boxed = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )
    tokens_sharding = sharding.batch_sharding(mesh, 2)
    tokens_BT = jax.ShapeDtypeStruct(tokens_BT.shape, tokens_BT.dtype, sharding=tokens_sharding)

    def loss_fn(params, tokens_BT):
        logits_BTV = model.apply({"params": params}, tokens_BT[:, :-1])
        # float32 log-softmax: the loss of a bf16 model is summed over many tokens.
        logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
        target_BT = tokens_BT[:, 1:, None]
        return -jnp.mean(jnp.take_along_axis(logp_BTV, target_BT, axis=-1))

    def step(params, opt_state, tokens_BT):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens_BT)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state_shardings = jax.tree.map(lambda a: a.sharding, abstract)
    jitted = jax.jit(
        step,
        out_shardings=(*state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0, 1),
    )
    return jitted, (*abstract, tokens_BT)


def sampler_program(
    model_cfg,
    mesh,
    rules,
    *,
    rollout_rules=(),
    prompts: int = 1,
    group_size: int = 8,
    prompt_len: int = 16,
    new_tokens: int = 16,
):
    """A rollout compiled the way the self-play iteration runs one: float32 parameters
    sharded by `rules` (the training layout), optionally cast and resharded to
    `rollout_rules` first, then `prompts` prompts sampled `group_size` times each.

    Returns:
      (jitted_fn, (params, prompt_PT, key_data)) with ShapeDtypeStructs for arguments.
    """
    import flax.linen as nn
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from lsp_jax import sampling
    from lsp_jax.model import Llama, param_axes
    from lsp_jax.runtime import sharding

    init = lambda: Llama(model_cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    boxed = jax.eval_shape(init)["params"]
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    params = jax.tree.map(
        lambda b, s: jax.ShapeDtypeStruct(b.value.shape, jnp.float32, sharding=s),
        boxed,
        shardings,
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    prompt_PT = jax.ShapeDtypeStruct((prompts, prompt_len), jnp.int32, sharding=replicated)
    key_data = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    sampler = sampling.SamplerConfig(
        max_new_tokens=new_tokens, decode_buckets=1, stop_tokens=model_cfg.eos_token_ids
    )

    def sample(params, prompt_PT, key_data):
        key = jax.random.wrap_key_data(key_data)
        mask_PT = jnp.ones(prompt_PT.shape, bool)
        if rollout_rules:
            narrow = lambda x: x.astype(model_cfg.dtype) if x.ndim > 1 else x
            params = jax.tree.map(narrow, params)
            params = sharding.constrain_logical(params, param_axes(model_cfg), rollout_rules)
        with nn.logical_axis_rules(rollout_rules or rules):
            out = sampling.sample(
                model_cfg, params, prompt_PT, mask_PT, key, sampler, group_size=group_size
            )
        return out.tokens_BT, out.logprobs_BT

    return jax.jit(sample), (params, prompt_PT, key_data)
