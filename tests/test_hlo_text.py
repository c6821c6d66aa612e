"""gru_mem.hlo_text against a hand-written HLO module (whose collectives we know) and against
a program jitted here on 8 fake devices."""

from conftest import run_on_8_fake_devices

from gru_mem import hlo_text

# Weights: parameter 0 (f32[8,4], gathered outside the loop) and parameter 1 (stacked per layer,
# sliced and gathered inside the layer loop). Activations: parameter 2.
_HLO = """HloModule jit_decode, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

%layer_body (p: (s32[], f32[3,2,4], f32[2,4])) -> (s32[], f32[3,2,4], f32[2,4]) {
  %p = (s32[], f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element((s32[], f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) %p), index=0
  %stacked = f32[3,2,4]{2,1,0} get-tuple-element((s32[], f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) %p), index=1
  %x = f32[2,4]{1,0} get-tuple-element((s32[], f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) %p), index=2
  %zero = s32[] constant(0)
  %slice = f32[1,2,4]{2,1,0} dynamic-slice(f32[3,2,4]{2,1,0} %stacked, s32[] %i, s32[] %zero, s32[] %zero), dynamic_slice_sizes={1,2,4}
  %w = f32[2,4]{1,0} bitcast(f32[1,2,4]{2,1,0} %slice)
  %wg = f32[8,4]{1,0} all-gather(f32[2,4]{1,0} %w), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %h = f32[2,4]{1,0} multiply(f32[2,4]{1,0} %x, f32[2,4]{1,0} %x)
  %hr = f32[2,4]{1,0} all-reduce(f32[2,4]{1,0} %h), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(s32[] %i, s32[] %one)
  ROOT %out = (s32[], f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) tuple(s32[] %next, f32[3,2,4]{2,1,0} %stacked, f32[2,4]{1,0} %hr)
}

%layer_cond (p: (s32[], f32[3,2,4], f32[2,4])) -> pred[] {
  %p = (s32[], f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element((s32[], f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) %p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

%decode_body (q: (f32[8,4], f32[3,2,4], f32[2,4])) -> (f32[8,4], f32[3,2,4], f32[2,4]) {
  %q = (f32[8,4]{1,0}, f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) parameter(0)
  %full = f32[8,4]{1,0} get-tuple-element((f32[8,4]{1,0}, f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) %q), index=0
  %stack = f32[3,2,4]{2,1,0} get-tuple-element((f32[8,4]{1,0}, f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) %q), index=1
  %act = f32[2,4]{1,0} get-tuple-element((f32[8,4]{1,0}, f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) %q), index=2
  %c0 = s32[] constant(0)
  %init = (s32[], f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) tuple(s32[] %c0, f32[3,2,4]{2,1,0} %stack, f32[2,4]{1,0} %act)
  %layers = (s32[], f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) while((s32[], f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) %init), condition=%layer_cond, body=%layer_body, backend_config={"known_trip_count":{"n":"3"}}
  %y = f32[2,4]{1,0} get-tuple-element((s32[], f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) %layers), index=2
  %logits = f32[2,8]{1,0} dot(f32[2,4]{1,0} %y, f32[8,4]{1,0} %full), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  %lg = f32[2,16]{1,0} all-gather(f32[2,8]{1,0} %logits), channel_id=3, replica_groups={{0,1}}, dimensions={1}
  %z = f32[2,4]{1,0} slice(f32[2,16]{1,0} %lg), slice={[0:2], [0:4]}
  ROOT %r = (f32[8,4]{1,0}, f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) tuple(f32[8,4]{1,0} %full, f32[3,2,4]{2,1,0} %stack, f32[2,4]{1,0} %z)
}

%decode_cond (q: (f32[8,4], f32[3,2,4], f32[2,4])) -> pred[] {
  %q = (f32[8,4]{1,0}, f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) parameter(0)
  %a = f32[2,4]{1,0} get-tuple-element((f32[8,4]{1,0}, f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) %q), index=2
  %ar = f32[2,4]{1,0} all-reduce(f32[2,4]{1,0} %a), channel_id=4, replica_groups={{0,1}}, to_apply=%add
  ROOT %t = pred[] constant(true)
}

ENTRY %main (w0: f32[2,4], w1: f32[3,2,4], x: f32[2,4]) -> (f32[8,4], f32[3,2,4], f32[2,4]) {
  %w0 = f32[2,4]{1,0} parameter(0), sharding={devices=[4,1]<=[4]}
  %w1 = f32[3,2,4]{2,1,0} parameter(1)
  %x = f32[2,4]{1,0} parameter(2)
  %converted = f32[2,4]{1,0} convert(f32[2,4]{1,0} %w0)
  %gathered = f32[8,4]{1,0} all-gather(f32[2,4]{1,0} %converted), channel_id=5, replica_groups={{0,1,2,3}}, dimensions={0}
  %start = (f32[8,4]{1,0}, f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) tuple(f32[8,4]{1,0} %gathered, f32[3,2,4]{2,1,0} %w1, f32[2,4]{1,0} %x)
  ROOT %loop = (f32[8,4]{1,0}, f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) while((f32[8,4]{1,0}, f32[3,2,4]{2,1,0}, f32[2,4]{1,0}) %start), condition=%decode_cond, body=%decode_body
}
"""


def test_hand_written_module():
  report = hlo_text.decode_loop_report(_HLO, weight_params=2)
  # Per decode step: the layer loop's all-reduce 3 times and its weight all-gather 3 times,
  # the logits all-gather once (an activation), the condition's all-reduce once.
  assert report["in_loop"] == {"all-reduce": {"count": 4, "bytes": 4 * 32},
                               "all-gather": {"count": 4, "bytes": 3 * 128 + 128}}
  assert report["outside"] == {"all-gather": {"count": 1, "bytes": 128}}
  gathers = sorted((g["name"], g["in_loop"]) for g in report["weight_gathers"])
  assert gathers == [("gathered", False), ("wg", True)]  # not the logits' gather
  assert report["carry_bytes"] == 128 + 96 + 32
  assert report["carried_weight_bytes"] == 128 + 96  # the gathered weight and the stack


def test_loop_arrays_of_shape_counts_per_decode_step():
  # The stack f32[3,2,4] is only carried (no op of the loop materialises one); [2,4] arrays: the
  # layer loop's multiply and all-reduce 3 times, the body's slice and the condition's all-reduce
  # once (bitcasts are views); [8,4]: the layer loop's weight all-gather, 3 times.
  assert hlo_text.loop_arrays_of_shape(_HLO, (3, 2, 4)) == {}
  assert hlo_text.loop_arrays_of_shape(_HLO, (2, 4)) == {"multiply": 3, "all-reduce": 4,
                                                          "slice": 1}
  assert hlo_text.loop_arrays_of_shape(_HLO, [8, 4]) == {"all-gather": 3}


_JITTED = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from gru_mem import hlo_text
mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(jax.sharding.AxisType.Auto,))
w = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P('fsdp')))
x = jax.ShapeDtypeStruct((8, 64), jnp.float32, sharding=NamedSharding(mesh, P('fsdp')))

def decode(w, x):  # the weight is sharded over fsdp: XLA gathers it before the loop
  def body(carry):
    i, h = carry
    return i + 1, jnp.tanh(h @ w @ w.T)
  return jax.lax.while_loop(lambda c: c[0] < jnp.sum(c[1]) + 5, body, (0, x))[1]
text = jax.jit(decode).lower(w, x).compile().as_text()
report = hlo_text.decode_loop_report(text, weight_params=1)
print('RESULT' + json.dumps({'gathers': len(report['weight_gathers']),
                             'gathered_bytes': sum(g['bytes'] for g in report['weight_gathers']),
                             'carried_weight_bytes': report['carried_weight_bytes'],
                             'in_loop': report['in_loop']}))
"""


def test_fsdp_weight_in_a_jitted_loop_is_gathered_whole():
  result = run_on_8_fake_devices(_JITTED)
  assert result["gathers"] >= 1
  assert result["gathered_bytes"] >= 64 * 32 * 4  # at least one whole copy of the weight
  assert result["carried_weight_bytes"] >= 64 * 32 * 4  # the loop reads the whole weight
