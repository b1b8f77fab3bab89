"""compiled_cost reads collectives, loop counts, FLOPs and memory off programs whose cost is known."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rlpa_jax.runtime import compiled_cost

LAYERS, WIDTH, ROWS = 3, 256, 64


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))


def gather_per_layer_until_done(stacked_weights, bias, x, mesh):
    """A data-dependent while loop around a scan over layers whose weights are split over 8
    devices and gathered whole in each layer; one gather of a split bias before the loop."""
    replicated = NamedSharding(mesh, PartitionSpec())
    x = x + jax.lax.with_sharding_constraint(bias, replicated)

    def layer(x, w):
        return jnp.tanh(x @ jax.lax.with_sharding_constraint(w, replicated)), None

    def step(state):
        count, x = state
        return count + 1, jax.lax.scan(layer, x, stacked_weights)[0]

    def keep_going(state):
        count, x = state
        return (count < 10) & (jnp.max(x) < 100.0)

    return jax.lax.while_loop(keep_going, step, (0, x))[1]


def test_collectives_and_flops_are_counted_where_they_run(mesh):
    split_rows = NamedSharding(mesh, PartitionSpec(None, "x", None))
    weights = jax.ShapeDtypeStruct((LAYERS, WIDTH, WIDTH), jnp.float32, sharding=split_rows)
    bias = jax.ShapeDtypeStruct((WIDTH,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("x")))
    x = jax.ShapeDtypeStruct((ROWS, WIDTH), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    compiled = jax.jit(lambda w, b, x: gather_per_layer_until_done(w, b, x, mesh)).lower(weights, bias, x).compile()
    cost = compiled_cost.program_cost("toy", compiled)

    # Each loop iteration gathers every layer's float32 weights, three layers by the scan's known count.
    assert cost.by_kind(in_loop=True) == {"all-gather": LAYERS * WIDTH * WIDTH * 4}
    assert cost.launches(in_loop=True) == LAYERS
    assert cost.collective_bytes_per_iteration == LAYERS * WIDTH * WIDTH * 4
    # Outside the loop: the gathered bias, once.
    assert cost.by_kind(in_loop=False) == {"all-gather": WIDTH * 4}
    # Every device multiplies the whole replicated x by each gathered layer, once per iteration.
    assert cost.flops_per_iteration == LAYERS * 2 * ROWS * WIDTH * WIDTH
    assert cost.fixed_flops == 0
    assert cost.argument_bytes == (LAYERS * WIDTH * WIDTH + WIDTH) * 4 // 8 + ROWS * WIDTH * 4
    assert cost.upcast_bytes == 0


# Hand-written optimized HLO in the form GPU backends emit: async collectives (-start / -done),
# a fused loop body with a known trip count, and a top-level upcast inserted by the compiler.
ASYNC_HLO = """\
HloModule toy, entry_computation_layout={(f32[16,4]{1,0})->f32[16,4]{1,0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%matmul (p0: f32[16,32], p1: f32[32,4]) -> f32[16,4] {
  %p0 = f32[16,32]{1,0} parameter(0)
  %p1 = f32[32,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[16,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (state: (s32[], f32[16,4])) -> (s32[], f32[16,4]) {
  %state = (s32[], f32[16,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %x = f32[16,4]{1,0} get-tuple-element(%state), index=1
  %ag-start = (f32[16,4]{1,0}, f32[16,32]{1,0}) all-gather-start(%x), dimensions={1}, replica_groups={{0,1,2,3,4,5,6,7}}
  %ag-done = f32[16,32]{1,0} all-gather-done(%ag-start)
  %w = f32[32,4]{1,0} constant({...})
  %mm = f32[16,4]{1,0} fusion(%ag-done, %w), kind=kOutput, calls=%matmul
  %ar-start = f32[16,4]{1,0} all-reduce-start(%mm), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %ar-done = f32[16,4]{1,0} all-reduce-done(%ar-start)
  %cp-start = (f32[16,4]{1,0}, f32[16,4]{1,0}, u32[], u32[]) collective-permute-start(%ar-done), source_target_pairs={{0,1}}
  %cp-done = f32[16,4]{1,0} collective-permute-done(%cp-start)
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[16,4]{1,0}) tuple(%next, %cp-done)
}

%cond (state.1: (s32[], f32[16,4])) -> pred[] {
  %state.1 = (s32[], f32[16,4]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%state.1), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

%upcast (h: bf16[1024]) -> f32[1024] {
  %h = bf16[1024]{0} parameter(0)
  ROOT %c = f32[1024]{0} convert(%h)
}

ENTRY %main (x.0: f32[16,4]) -> f32[16,4] {
  %x.0 = f32[16,4]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %half = bf16[1024]{0} constant({...})
  %wide = f32[1024]{0} fusion(%half), kind=kLoop, calls=%upcast
  %init = (s32[], f32[16,4]{1,0}) tuple(%zero, %x.0)
  %loop = (s32[], f32[16,4]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %result = f32[16,4]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_async_collectives_in_a_known_count_loop_are_multiplied_out():
    hlo = compiled_cost.hlo_cost(ASYNC_HLO)
    by_kind = {c.kind: (c.bytes, c.repeats, c.loop) for c in hlo.collectives}
    assert by_kind == {
        "all-gather": (16 * 32 * 4, 5, None),  # the gathered result, not input + result
        "all-reduce": (16 * 4 * 4, 5, None),
        "collective-permute": (16 * 4 * 4 + 8, 5, None),  # + its two u32 context words
    }
    assert hlo.dot_flops == {None: 5 * 2 * 16 * 4 * 32}
    assert hlo.upcast_bytes == 1024 * 4


def test_a_loop_without_a_known_count_is_reported_per_iteration():
    hlo = compiled_cost.hlo_cost(ASYNC_HLO.replace(', backend_config={"known_trip_count":{"n":"5"}}', ""))
    assert {c.loop for c in hlo.collectives} == {"loop"}
    assert all(c.repeats == 1 for c in hlo.collectives)
    assert hlo.dot_flops == {"loop": 2 * 16 * 4 * 32}


def test_fits_names_the_program_and_the_shortfall():
    cost = compiled_cost.ProgramCost(name="sampler/replicated", argument_bytes=6_000_000_000, output_bytes=0,
                                     temp_bytes=20_000_000_000, generated_code_bytes=0, alias_bytes=0,
                                     upcast_bytes=12_000_000_000, xla_flops=None, dot_flops={}, collectives=())
    assert cost.accelerator_memory_bytes == 14_000_000_000
    assert compiled_cost.fits(cost, 80e9) is None
    message = compiled_cost.fits(cost, 80e9, resident_bytes=60_000_000_000)
    assert message.startswith("sampler/replicated: needs 74.00 GB per device")
    assert "72.00 GB" in message
