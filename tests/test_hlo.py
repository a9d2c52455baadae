"""lsp_jax.tpu.hlo reads compiled programs: FLOPs and bytes against hand counts, loops
multiplied by their trip counts, phases from name scopes; convolutions as the TPU
compiler writes batched matmuls."""

import jax
import jax.numpy as jnp
import pytest

from lsp_jax.sampling import DECODE_SCOPE
from lsp_jax.tpu import hlo

A = jax.ShapeDtypeStruct((4, 8), jnp.float32)
W = jax.ShapeDtypeStruct((8, 8), jnp.float32)
MATMUL_FLOPS = 2 * 4 * 8 * 8


def compiled_text(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def test_scan_bodies_count_trip_count_times_in_their_phase():
    def fn(a, w):
        with jax.named_scope("update"):
            out, _ = jax.lax.scan(lambda x, _: (jnp.tanh(x @ w), None), a, None, length=5)
        return out

    costs = hlo.program_costs(compiled_text(fn, A, W))
    assert costs.phases["update"].flops == pytest.approx(5 * MATMUL_FLOPS)
    assert costs.unknown_trip_counts == 0


def test_decode_loops_count_their_scoped_bound_and_per_step_costs():
    def fn(a, w):
        with jax.named_scope("solver_rollout"):
            with jax.named_scope(f"{DECODE_SCOPE}7"):
                # Stops early at run time; the scope gives its most iterations.
                _, out = jax.lax.while_loop(
                    lambda c: (c[0] < 7) & (c[1].sum() < 1e9),
                    lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)),
                    (0, a),
                )
        return out

    costs = hlo.program_costs(compiled_text(fn, A, W))
    (loop,) = costs.decode_loops
    assert (loop.phase, loop.steps) == ("solver_rollout", 7)
    assert loop.per_step.flops == pytest.approx(MATMUL_FLOPS)
    assert costs.phases["solver_rollout"].flops == pytest.approx(7 * MATMUL_FLOPS)
    # A step reads at least the weights and the activations it multiplies.
    assert loop.per_step.hbm_bytes >= (8 * 8 + 4 * 8) * 4


def test_convolution_taps_on_padding_are_not_counted():
    # A batched matmul as the TPU compiler writes it: a window of 4 over a batch of 4,
    # the input dilated by 4 and the window strided by 3, so each output position meets
    # exactly one real input element. MACs: 4 matmuls [2, 5] x [5, 3] = 120, where
    # |output| x |kernel| / features would say 480.
    conv = (
        "ROOT %conv = f32[2,4,3]{2,1,0} convolution(%p0, %p1), "
        "window={size=4 stride=3 lhs_dilate=4}, dim_labels=b0f_0io->b0f"
    )
    text = f"""
HloModule m

ENTRY %main (p0: f32[2,4,5], p1: f32[4,5,3]) -> f32[2,4,3] {{
  %p0 = f32[2,4,5]{{2,1,0}} parameter(0)
  %p1 = f32[4,5,3]{{2,1,0}} parameter(1)
  {conv}
}}
"""
    assert hlo.program_costs(text).total.flops == 2 * 120


def test_collectives_count_their_full_side():
    text = """
HloModule m

ENTRY %main (p0: bf16[4,256]) -> bf16[32,256] {
  %p0 = bf16[4,256]{1,0} parameter(0)
  %ag = bf16[32,256]{1,0} all-gather(%p0), dimensions={0}, metadata={op_name="jit(f)/update/x"}
  ROOT %rs = bf16[4,256]{1,0} reduce-scatter(%ag), dimensions={0}, to_apply=%add
}
"""
    costs = hlo.program_costs(text)
    assert costs.phases["update"].collective_bytes == {"all-gather": 32 * 256 * 2}
    assert costs.phases["other"].collective_bytes == {"reduce-scatter": 32 * 256 * 2}
