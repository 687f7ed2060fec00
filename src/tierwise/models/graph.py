"""Reading an ONNX graph: its input and output specs, its batch dimension, its cut points.

Cut points (our own analysis, in the spirit of Neurosurgeon's layer-wise partitioning, Kang
et al. ASPLOS 2017, generalised from chains to DAGs): a tensor `t` is a cut point when every
path from the graph's inputs to its outputs passes through `t`. Then the graph splits into a
head (inputs -> t) and a tail (t -> outputs) that exchange `t` alone.

How it is found, in one pass: ONNX requires nodes in topological order. Keep only the *live*
nodes — those that depend on a graph input and lead to a graph output (constant folding
chains and dead branches are copied to whichever side needs them). Walk them in order; after
node i, the tensors *crossing* the boundary are those produced at or before i (graph inputs
count as produced before node 0) and consumed after i (graph outputs count as consumed at
the end). Every input->output path crosses each boundary on some tensor, so when exactly one
tensor crosses, it is a cut point; when t is a cut point, every live node is an ancestor or a
descendant of t, so exactly t crosses right after t's producer — whatever topological order
the file has. Inside a residual block the skip tensor crosses beside the main branch, so no
interior tensor qualifies: only block boundaries remain. Cutting through several tensors at
once (DADS's min-cut, Hu et al. INFOCOM 2019) is not done here.

Needs `onnx` (import time, on the machine that imports models), not on devices.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from tierwise.models.store import CutPoint, TensorSpec

# ONNX TensorProto element types -> OIP v2 datatypes
_DATATYPES: dict[int, str] = {
    onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.UINT16: "UINT16", onnx.TensorProto.UINT32: "UINT32",
    onnx.TensorProto.UINT64: "UINT64", onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT16: "INT16", onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64", onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.STRING: "BYTES",
}


class GraphError(ValueError):
    """A graph tierwise cannot take: the message names what is wrong and what was expected."""


def datatype(elem_type: int) -> str:
    """The OIP datatype of an ONNX element type (TensorProto.FLOAT -> "FP32")."""
    if elem_type not in _DATATYPES:
        raise GraphError(f"element type {onnx.TensorProto.DataType.Name(elem_type)} has no "
                         f"OIP datatype; expected one of {sorted(set(_DATATYPES.values()))}")
    return _DATATYPES[elem_type]


def _shape(value: onnx.ValueInfoProto) -> list[int]:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return []
    return [dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else -1
            for dim in tensor.shape.dim]


def spec_of(value: onnx.ValueInfoProto) -> TensorSpec:
    if not value.type.HasField("tensor_type"):
        raise GraphError(f"{value.name}: not a tensor (sequences and maps are not served)")
    return TensorSpec(name=value.name, datatype=datatype(value.type.tensor_type.elem_type),
                      shape=_shape(value))


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: graph inputs that are not initializers (older exporters list every
    weight as an input too)."""
    weights = {tensor.name for tensor in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in weights]


def specs(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of `model` as OIP tensor specs."""
    inputs = graph_inputs(model)
    if not inputs:
        raise GraphError("the graph has no inputs; expected at least one tensor input")
    if not model.graph.output:
        raise GraphError("the graph has no outputs")
    return [spec_of(value) for value in inputs], [spec_of(value) for value in model.graph.output]


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every intermediate tensor's type and shape inferred (ONNX shape
    inference, data propagation on); raises GraphError when the graph is inconsistent."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as error:
        raise GraphError(f"ONNX shape inference failed: {error}") from None


def value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    graph = model.graph
    return {value.name: value for value in [*graph.input, *graph.value_info, *graph.output]}


# -- the batch dimension ---------------------------------------------------------------------

BATCH_DIM = "batch"


def _set_first_dim(value: onnx.ValueInfoProto, symbol: str) -> None:
    dims = value.type.tensor_type.shape.dim
    if dims:
        dims[0].Clear()
        dims[0].dim_param = symbol


def fixed_batch_of_one(model: onnx.ModelProto) -> bool:
    """Every input and output has a first dimension fixed at 1."""
    values = [*graph_inputs(model), *model.graph.output]
    return all(_shape(value)[:1] == [1] for value in values)


def make_batch_dynamic(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """(model, batched): whether the model's first dimension is a batch whose rows do not
    mix (`tierwise.runtime.session.rows_independent`: two different samples together give
    what each gives alone). A dynamic first dimension is tried as it is; where every input
    and output has a fixed batch of 1, a copy with that dimension made dynamic is tried and
    kept if it passes (a Reshape that hard-codes 1 fails). Otherwise `model` unchanged,
    served one row per request."""
    values = [*graph_inputs(model), *model.graph.output]
    if all(_shape(value)[:1] == [-1] for value in values):
        return model, _rows_independent(model)
    if not fixed_batch_of_one(model):
        return model, False
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(model)
    for value in [*graph_inputs(dynamic), *dynamic.graph.output]:
        _set_first_dim(value, BATCH_DIM)
    del dynamic.graph.value_info[:]  # stale batch-1 shapes would pin the batch again
    if _rows_independent(dynamic):
        return dynamic, True
    return model, False


def _rows_independent(model: onnx.ModelProto) -> bool:
    import onnxruntime as ort

    from tierwise.runtime.session import rows_independent

    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failed two-row trial is an answer, not an error
    try:
        session = ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                       providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return rows_independent(session, specs(model)[0])


# -- cut points -------------------------------------------------------------------------------

def _live_nodes(graph: onnx.GraphProto, input_names: set[str]) -> list[int]:
    """Indices of the nodes that depend on a graph input and lead to a graph output."""
    dynamic = set(input_names)
    depends: list[bool] = []
    for node in graph.node:
        on_input = any(name in dynamic for name in _node_inputs(node))
        depends.append(on_input)
        if on_input:
            dynamic.update(name for name in node.output if name)
    needed = {value.name for value in graph.output}
    leads: list[bool] = [False] * len(graph.node)
    for index in range(len(graph.node) - 1, -1, -1):
        node = graph.node[index]
        if any(name in needed for name in node.output):
            leads[index] = True
            needed.update(_node_inputs(node))
    return [index for index in range(len(graph.node)) if depends[index] and leads[index]]


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads, including those its subgraphs (If, Loop, Scan) capture from
    the outer scope."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        subgraphs = list(attribute.graphs)
        if attribute.HasField("g"):
            subgraphs.append(attribute.g)
        for subgraph in subgraphs:
            local = {value.name for value in subgraph.input} | \
                {tensor.name for tensor in subgraph.initializer}
            for inner in subgraph.node:
                names += [name for name in _node_inputs(inner) if name not in local]
                local.update(inner.output)
    return names


def cut_points(model: onnx.ModelProto) -> list[CutPoint]:
    """Every cut point of `model`, in topological order (see the module docstring): neither
    a graph input nor a graph output, and with a known type. `model` should have gone
    through `infer_shapes` so that each cut's shape is known.

    Complexity: O(nodes + edges).
    """
    graph = model.graph
    inputs = {value.name for value in graph_inputs(model)}
    outputs = {value.name for value in graph.output}
    live = _live_nodes(graph, inputs)
    position = {index: order for order, index in enumerate(live)}
    # the last live position that reads each tensor (graph outputs: past the end)
    last_use: dict[str, int] = {}
    for index in live:
        for name in _node_inputs(graph.node[index]):
            last_use[name] = position[index]
    for name in outputs:
        last_use[name] = len(live)
    crossing: dict[str, int] = {name: last_use[name] for name in inputs if name in last_use}
    # a tensor an If/Loop/Scan body reads from outside cannot be a tail's input: extraction
    # and renaming follow a node's inputs, not what its subgraphs capture
    captured = {name for index in live for name in _node_inputs(graph.node[index])
                if name not in graph.node[index].input}
    infos = value_infos(model)
    found: list[CutPoint] = []
    for order, index in enumerate(live):
        crossing = {name: until for name, until in crossing.items() if until > order}
        for name in graph.node[index].output:
            if name and last_use.get(name, -1) > order:
                crossing[name] = last_use[name]
        if len(crossing) != 1:
            continue
        (name,) = crossing
        if name in outputs or name in inputs or name in captured or name not in infos:
            continue
        value = infos[name]
        if not value.type.HasField("tensor_type") or \
                value.type.tensor_type.elem_type not in _DATATYPES:
            continue
        found.append(CutPoint(tensor=name, datatype=datatype(value.type.tensor_type.elem_type),
                              shape=_shape(value), node=index))
    return found


def extract(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """The subgraph from `inputs` to `outputs` as a model of its own (onnx.utils.Extractor),
    with the opsets and metadata of `model`."""
    from onnx.utils import Extractor

    return Extractor(model).extract_model(inputs, outputs)


def rename_tensor(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename a tensor everywhere in `model`'s top-level graph (in place)."""
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.name == old:
            value.name = new


def parameter_count(model: onnx.ModelProto) -> int:
    """Elements in the model's initializers (its weights)."""
    return int(sum(int(np.prod(tensor.dims)) for tensor in model.graph.initializer))


def operator_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Op types and counts, for `tierwise models show`."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))
