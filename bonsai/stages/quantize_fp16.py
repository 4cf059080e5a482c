"""`quantize.fp16`: float16 weights and activations, with the ops onnxruntime's CPU provider
cannot run in float16 kept in float32, so that the model runs (and is measured) on the CPU.

Conversion is onnxruntime's own `onnxruntime.transformers.float16.convert_float_to_float16`
(inputs and outputs stay float32, so the model takes the same feeds as its parent). Which ops
to keep in float32 is read from the installed onnxruntime's kernel registry: an op type with no
float16 CPU kernel goes on the converter's op block list (onnxruntime 1.32 on x86 has none for
Conv, Gemm, MatMul, Relu, Add, ...: on this CPU, a CNN then computes in float32 on float16-stored
weights, half the bytes, cast once when the session loads). Without the block list onnxruntime
would insert the casts itself, around every op, at run time.

The converter also rounds every tensor between two float32 ops to float16 and back (a Cast
pair per edge); those round trips cost time and precision and buy nothing, so they are removed.
`cpu_fallback: false` converts every op (for a float16-capable target such as a GPU); on this
CPU onnxruntime then casts around each op itself, which the speed guard shows.
"""

from __future__ import annotations

import functools

from bonsai.artifacts import Artifact
from bonsai.quantization import refuse_quantized_input
from bonsai.stages.base import Stage, StageContext
from bonsai.stages.quantize_common import QuantizeConfig, check_and_write_variant


class QuantizeFp16Config(QuantizeConfig):
    # Keep in float32 the op types the installed onnxruntime's CPU provider has no float16
    # kernel for (read from its kernel registry). false: convert every op.
    cpu_fallback: bool = True
    # Further op types to keep in float32 (e.g. [Softmax] for a numerically touchy head).
    op_block_list: list[str] = []  # pydantic copies the default per instance


@functools.cache
def cpu_float16_ops() -> frozenset[str]:
    """ONNX-domain op types with a float16 kernel in onnxruntime's CPU provider."""
    try:
        from onnxruntime.capi import _pybind_state as C

        defs = C.get_all_opkernel_def()
    except (ImportError, AttributeError):  # a build without the registry query: assume none
        return frozenset()
    return frozenset(
        k.op_name
        for k in defs
        if k.provider == "CPUExecutionProvider"
        and k.domain in ("", "ai.onnx")
        and any("tensor(float16)" in t for t in k.type_constraints.values())
    )


class QuantizeFp16(Stage):
    kind = "quantize.fp16"
    Config = QuantizeFp16Config
    consumes = ("onnx",)
    produces = "onnx"

    def run(self, ctx: StageContext) -> Artifact:
        import onnx
        from onnxruntime.transformers.float16 import (
            DEFAULT_OP_BLOCK_LIST,
            convert_float_to_float16,
        )

        c: QuantizeFp16Config = self.config  # type: ignore[assignment]
        assert ctx.input is not None
        src = ctx.input.file
        refuse_quantized_input(src, self.kind)
        model = onnx.load(str(src))
        present = {n.op_type for n in model.graph.node}
        block = set(DEFAULT_OP_BLOCK_LIST) | set(c.op_block_list)
        if c.cpu_fallback:
            block |= present - cpu_float16_ops()
        m16 = convert_float_to_float16(
            model,
            keep_io_types=True,  # float32 in and out: the same feeds and logits as the parent
            op_block_list=sorted(block),
            force_fp16_initializers=True,  # float16 weights, also for the float32 ops
        )
        removed = drop_cast_round_trips(m16)
        topological_sort(m16.graph)
        out = ctx.out_dir / "model.onnx"
        onnx.save(m16, str(out))
        kept = sorted(present & block)
        fp16_nodes = sum(n.op_type not in block and n.op_type != "Cast" for n in m16.graph.node)
        ctx.log(
            f"{ctx.name}: float16 weights; {fp16_nodes} node(s) compute in float16, op types "
            f"kept in float32: {', '.join(kept) or 'none'}"
        )
        return check_and_write_variant(
            c,
            ctx,
            src,
            out,
            "fp16",
            float32_op_types=kept,
            float16_nodes=fp16_nodes,
            cast_round_trips_removed=removed,
        )


def drop_cast_round_trips(model) -> int:
    """Remove float32 -> float16 -> float32 Cast pairs: consumers of the second Cast read the
    float32 tensor directly. Returns the number of round trips removed."""
    from onnx import TensorProto

    g = model.graph

    def cast_to(n) -> int | None:
        if n.op_type != "Cast":
            return None
        return next((a.i for a in n.attribute if a.name == "to"), None)

    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    dead: set[int] = set()
    graph_inputs = {i.name for i in g.input}
    # A graph output reached through a round trip: its float32 source takes the output's name.
    out_rename: dict[str, str] = {}
    for b in g.node:
        if cast_to(b) != TensorProto.FLOAT:
            continue
        a = producer.get(b.input[0])
        if a is None or cast_to(a) != TensorProto.FLOAT16:
            continue
        src = producer.get(a.input[0])
        # Only a float32 source: a node's output that is not itself a cast to another type.
        if src is not None and cast_to(src) not in (None, TensorProto.FLOAT):
            continue
        if b.output[0] in outputs:
            if src is None or a.input[0] in graph_inputs | outputs:
                continue
            out_rename[a.input[0]] = b.output[0]
        else:
            rename[b.output[0]] = a.input[0]
        dead.add(id(b))
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
            if n.input[i] in out_rename:
                n.input[i] = out_rename[n.input[i]]
        for i, name in enumerate(n.output):
            if name in out_rename and id(n) not in dead:
                n.output[i] = out_rename[name]
    # First casts that nothing reads any more go too.
    read = {i for n in g.node if id(n) not in dead for i in n.input} | outputs
    dead |= {id(n) for n in g.node if cast_to(n) == TensorProto.FLOAT16 and n.output[0] not in read}
    keep = [n for n in g.node if id(n) not in dead]
    del g.node[:]
    g.node.extend(keep)
    live = {o for n in keep for o in n.output}
    vi = [v for v in g.value_info if v.name in live]
    del g.value_info[:]
    g.value_info.extend(vi)
    return len(rename) + len(out_rename)


def topological_sort(g) -> None:
    """Order `g.node` so that every input is produced before it is read (the float16
    converter appends its casts at the end; onnxruntime accepts that, the ONNX checker not)."""
    available = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending = list(g.node)
    order = []
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                order.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # a cycle or a dangling input: leave the rest as it is
            order += rest
            break
        pending = rest
    del g.node[:]
    g.node.extend(order)
