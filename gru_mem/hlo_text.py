"""What a compiled XLA program does per iteration of its loop, read from its HLO text.

`decode_loop_report(compiled.as_text(), weight_params=n)` finds the decode loop (a `while` of the
entry computation; nested whiles, like a scan over layers, run `known_trip_count` times per
iteration) and returns, per device (SPMD-partitioned shapes are per-device shapes):

  carry_bytes         the bytes the loop carries: what one iteration can read (weights as the
                      loop sees them, e.g. gathered, and the KV cache);
  carried_weight_bytes the part of it derived from the weights alone (the first n parameters),
                      and carried_weight_elements its element count;
  in_loop             collectives per iteration: {kind: {"count", "bytes"}} (bytes = result size);
  outside             collectives of the program outside the loop, once per call;
  weight_gathers      all-gathers whose operand is derived from the weights alone, in or out of
                      the loop: (name, result bytes, where);
  in_loop_weight_gather_bytes  their results per iteration (weights gathered anew every step).

`loop_arrays_of_shape(text, dims)` counts the buffers the decode loop materialises (ops of its
body and nested loops, times their trip counts; a fusion counts once, by its root op) whose
result is an array of per-device dims `dims`: with dims = the stacked KV cache's, a copy,
broadcast, transpose or convert there is a whole cache written at every token step (an in-place
`dynamic-update-slice` or `scatter` writes only its slots).

"Derived from the weights alone": a parameter among the first n, or an op all of whose non-scalar
operands are (scalars are indices and loop counters: a dynamic-slice of a weight at a layer index
is still a weight); through a while, a carried value that the body passes on unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str  # the result shape text: "f32[8,64]{1,0}" or a tuple "(s32[], f32[..])"
  opcode: str
  operands: list  # operand instruction names
  operand_text: str  # the text between the opcode's parentheses (a parameter's number)
  attributes: str  # the text after the operands

  def called(self, key: str) -> Optional[str]:
    match = re.search(rf"\b{key}=%?([\w.\-]+)", self.attributes)
    return match.group(1) if match else None


def shape_bytes(shape: str) -> int:
  """Bytes of every array in a shape text (a tuple sums its elements)."""
  return sum(_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _ARRAY.findall(shape))


def shape_elements(shape: str) -> int:
  """Elements of every array in a shape text."""
  return sum(math.prod(int(d) for d in dims.split(",") if d) for _, dims in _ARRAY.findall(shape))


def tuple_elements(shape: str) -> list:
  """The top-level elements of a tuple shape text ("(a, (b, c))" -> ["a", "(b, c)"])."""
  inner, depth, start, parts = shape.strip()[1:-1], 0, 0, []
  for i, ch in enumerate(inner):
    depth += (ch in "([{") - (ch in ")]}")
    if ch == "," and depth == 0:
      parts.append(inner[start:i].strip())
      start = i + 1
  if inner.strip():
    parts.append(inner[start:].strip())
  return parts


def _split_shape(text: str) -> tuple[str, str]:
  """'(s32[], f32[2]{0}) while(...)' -> ('(s32[], f32[2]{0})', 'while(...)')."""
  if text.startswith("("):
    depth = 0
    for i, ch in enumerate(text):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        return text[:i + 1], text[i + 1:].strip()
  shape, _, rest = text.partition(" ")
  return shape, rest.strip()


def _parse_instruction(line: str) -> Optional[Instruction]:
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  shape, rest = _split_shape(match.group(3).strip())
  opcode_match = re.match(r"([\w\-]+)\(", rest)
  if not opcode_match:
    return None
  depth, end = 0, len(rest)
  for i in range(opcode_match.end() - 1, len(rest)):
    depth += (rest[i] == "(") - (rest[i] == ")")
    if depth == 0:
      end = i
      break
  operand_text = rest[opcode_match.end():end]
  operands = re.findall(r"%([\w.\-]+)", operand_text)
  if not operands and not re.fullmatch(r"[\s\d\-]*", operand_text):  # printed without '%'
    operands = [t.split()[-1] for t in operand_text.split(",") if t.strip()]
  return Instruction(match.group(2), shape, opcode_match.group(1), operands, operand_text,
                     rest[end + 1:])


def parse_module(text: str) -> tuple[dict, str]:
  """({computation name: [Instruction]}, entry computation name) of an HLO module's text."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    header = _HEADER.match(line.strip())
    if header:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    if current is not None and line.strip() == "}":
      current = None
    elif current is not None:
      instruction = _parse_instruction(line)
      if instruction is not None:
        computations[current].append(instruction)
  if entry is None:
    raise ValueError("no ENTRY computation in this HLO text")
  return computations, entry


def trip_count(instruction: Instruction) -> Optional[int]:
  match = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', instruction.attributes)
  return int(match.group(1)) if match else None


def _is_scalar(shape: Optional[str]) -> bool:
  return shape is not None and bool(re.fullmatch(r"\w+\[\](\{[^}]*\})?", shape.strip()))


def _flag(value) -> bool:
  """A value (or every element of a tuple value) is weight-derived."""
  if isinstance(value, list):
    return bool(value) and all(value)
  return bool(value)


@dataclasses.dataclass
class Collective:
  kind: str  # one of COLLECTIVES
  bytes: int  # the result's bytes per device
  times: int  # executions per decode-loop iteration (in the loop) or per call (outside)
  in_loop: bool
  of_weights: bool  # the operand is derived from the weights alone
  name: str


_NEUTRAL = ("constant", "iota", "partition-id", "replica-id", "after-all")


class _Walker:
  """Visits computations in order, following weight-derived values and counting collectives."""

  def __init__(self, computations: dict):
    self.computations = computations
    self.found: list[Collective] = []

  def walk(self, name: str, param_flags: dict, times: int, in_loop: bool):
    """Walks computation `name` whose parameter i has flags `param_flags[i]`; returns the flags
    of its root."""
    derived, shapes, flags = {}, {}, False
    for ins in self.computations.get(name, []):
      flags = self.visit(ins, derived, shapes, param_flags, times, in_loop)
      derived[ins.name], shapes[ins.name] = flags, ins.shape
    return flags

  def visit(self, ins: Instruction, derived: dict, shapes: dict, param_flags: dict, times: int,
            in_loop: bool):
    op = ins.opcode
    if op == "parameter":
      return param_flags.get(int(ins.operand_text.strip() or 0), False)
    if op in _NEUTRAL:
      return None
    if op == "get-tuple-element":
      source = derived.get(ins.operands[0]) if ins.operands else None
      index = int(re.search(r"index=(\d+)", ins.attributes).group(1))
      return _flag(source[index]) if isinstance(source, list) and index < len(source) else False
    if op == "tuple":
      return [_flag(derived.get(o)) for o in ins.operands]
    if op == "while":
      return self.loop(ins, derived, times, in_loop)
    operand_flags = [derived.get(o) for o in ins.operands if not _is_scalar(shapes.get(o))]
    operand_flags = [_flag(f) for f in operand_flags if f is not None]
    of_weights = bool(operand_flags) and all(operand_flags)
    kind = op[:-len("-start")] if op.endswith("-start") else op
    if kind in COLLECTIVES:
      result = tuple_elements(ins.shape)[-1] if ins.shape.startswith("(") else ins.shape
      self.found.append(Collective(kind, shape_bytes(result), times, in_loop, of_weights,
                                   ins.name))
    elif op in ("call", "conditional", "async-start"):
      for called in re.findall(r"(?:calls|to_apply|branch_computations)=\{?%?([\w.\-, %]+)",
                               ins.attributes):
        for computation in re.findall(r"[\w.\-]+", called):
          self.walk(computation, {}, times, in_loop)
    return of_weights

  def loop(self, ins: Instruction, derived: dict, times: int, in_loop: bool) -> list:
    """A while: carried values the body passes on unchanged keep their flags; the body and the
    condition run trip-count times (1 when unknown: per iteration of the outermost loop)."""
    carried = derived.get(ins.operands[0]) if ins.operands else None
    carried = carried if isinstance(carried, list) else []
    body = ins.called("body")
    invariant = _invariant_elements(self.computations.get(body, []))
    flags = [_flag(f) and i in invariant for i, f in enumerate(carried)]
    inner = times * (trip_count(ins) or 1) if in_loop else 1
    self.walk(body, {0: flags}, inner, True)
    self.walk(ins.called("condition"), {0: flags}, inner, True)
    return flags


def _invariant_elements(body: list) -> set:
  """Tuple indices that a while body passes on unchanged (root element i = gte(param, i))."""
  if not body:
    return set()
  param = next((i.name for i in body if i.opcode == "parameter"), None)
  gte = {i.name: int(re.search(r"index=(\d+)", i.attributes).group(1)) for i in body
         if i.opcode == "get-tuple-element" and i.operands and i.operands[0] == param}
  root = body[-1]
  if root.opcode != "tuple":
    return set()
  return {k for k, operand in enumerate(root.operands) if gte.get(operand) == k}


def _summary(collectives: list) -> dict:
  """{kind: {"count": executions, "bytes": result bytes summed over executions}}."""
  out: dict = {}
  for c in collectives:
    entry = out.setdefault(c.kind, {"count": 0, "bytes": 0})
    entry["count"] += c.times
    entry["bytes"] += c.bytes * c.times
  return out


def decode_loop_report(text: str, weight_params: int) -> dict:
  """The decode loop's carry and collectives, per device (see the module docstring)."""
  computations, entry = parse_module(text)
  loops = [i for i in computations[entry] if i.opcode == "while"]
  if len(loops) != 1:
    raise ValueError(f"expected one while loop in the entry computation, found {len(loops)}")
  walker = _Walker(computations)
  derived, shapes = {}, {}
  params = {i: True for i in range(weight_params)}  # JAX passes the weights first
  for ins in computations[entry]:
    derived[ins.name] = walker.visit(ins, derived, shapes, params, 1, False)
    shapes[ins.name] = ins.shape
  loop = loops[0]
  carry = tuple_elements(loop.shape) if loop.shape.startswith("(") else [loop.shape]
  return {
      "carry_bytes": shape_bytes(loop.shape),
      "carried_weight_bytes": sum(shape_bytes(element) for element, flag
                                  in zip(carry, derived[loop.name]) if flag),
      "carried_weight_elements": sum(shape_elements(element) for element, flag
                                     in zip(carry, derived[loop.name]) if flag),
      "in_loop": _summary([c for c in walker.found if c.in_loop]),
      "outside": _summary([c for c in walker.found if not c.in_loop]),
      "weight_gathers": [{"name": c.name, "bytes": c.bytes, "in_loop": c.in_loop}
                         for c in walker.found if c.kind == "all-gather" and c.of_weights],
      "in_loop_weight_gather_bytes": sum(c.bytes * c.times for c in walker.found if c.in_loop
                                         and c.kind == "all-gather" and c.of_weights),
  }


def loop_arrays_of_shape(text: str, dims) -> dict:
  """{op: executions per decode-loop iteration} of the buffers the loop materialises with
  per-device dims `dims` (any dtype); see the module docstring. Walks the loop's body and
  condition, nested whiles (times their trip counts), calls and conditional branches, but not
  into fusions: a fusion is one op named by its root, e.g. "fusion(scatter)" (a convert or
  slice inside a fusion is computed per output element, not materialised)."""
  computations, entry = parse_module(text)
  loops = [i for i in computations[entry] if i.opcode == "while"]
  if len(loops) != 1:
    raise ValueError(f"expected one while loop in the entry computation, found {len(loops)}")
  wanted = ",".join(str(int(d)) for d in dims)
  counts: dict = {}
  stack = [(loops[0].called("body"), 1), (loops[0].called("condition"), 1)]
  while stack:
    name, times = stack.pop()
    for ins in computations.get(name, []):
      if ins.opcode == "while":
        inner = times * (trip_count(ins) or 1)
        stack += [(ins.called("body"), inner), (ins.called("condition"), inner)]
      elif ins.opcode in ("call", "conditional", "async-start"):
        for called in re.findall(r"(?:calls|to_apply|branch_computations)=\{?%?([\w.\-, %]+)",
                                 ins.attributes):
          stack += [(c, times) for c in re.findall(r"[\w.\-]+", called)]
      if ins.opcode in ("parameter", "get-tuple-element", "tuple", "bitcast", "while",
                        "conditional", "call") or ins.shape.startswith("("):
        continue
      if any(d == wanted for _, d in _ARRAY.findall(ins.shape)):
        op = ins.opcode
        if op == "fusion":
          fused = computations.get(ins.called("calls"), [])
          op = f"fusion({fused[-1].opcode if fused else '?'})"
        counts[op] = counts.get(op, 0) + times
  return counts
