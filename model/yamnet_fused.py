"""CPU inference path for YAMNet's convolutions: oneDNN conv+ReLU fused, weights pre-packed.

Why this exists: the trainable :class:`model.yamnet.Yamnet` runs each layer as ``nn.Conv2d`` then
``relu`` (and, on stride-2 layers, an explicit asymmetric pad). At inference that costs three things
onnxruntime does not pay: a separate ReLU pass over every activation, a copy of the activation for
each pad, and a re-layout of every weight on every call. ``benchmarks/yamnet_speed.py`` measured
PyTorch at 0.6-0.7x onnxruntime because of them. This module removes all three without changing a
single weight or the arithmetic:

* ReLU runs as a oneDNN post-op of the convolution (``torch.ops.mkldnn._convolution_pointwise``,
  the kernel ``torch.compile``'s CPU backend emits for conv+ReLU).
* TensorFlow 'SAME' padding at stride 2 on an even size pads 0 before and 1 after. The same output
  comes from a kernel one tap larger whose leading tap is zero, padded 1 on both sides: output i then
  reads inputs 2i-1 .. 2i+2 with weight 0 on input 2i-1, exactly TF's 2i .. 2i+2. So no pad copy.
  The stem, whose input has one channel, pads explicitly instead: that copy is tiny and the 3x3
  kernel is faster than a 4x4 one there.
* Weights are reordered once into oneDNN's blocked layout for the input size they will see.
* 1x1 convolutions run as oneDNN matmuls with ReLU fused (``torch.ops.mkldnn._linear_pointwise``): a
  channels-last activation already is the [pixels, channels] matrix, and on the 6x4 and 3x2 maps the
  matmul kernel beat oneDNN's 1x1 convolution kernel by 3-6 % (benchmarks/yamnet_speed.py).
* The stem's explicit pad can be applied once to a whole batch (:func:`pad_for_stem`) instead of
  once per chunk.
* Where ``model/native_kernels.py`` could build its C kernels, no layer goes through oneDNN: the stem
  runs directly (:class:`NativeConv`), each separable block as one fused layer
  (:class:`NativeSeparable`), and consecutive layers as one call that carries each patch through all
  of them (:class:`NativeChain`), padding taps skipped rather than copied. That
  took the network from 0.95x to above onnxruntime at 32 clips (benchmarks/yamnet_speed.py).

The plan is rebuilt whenever a parameter changes (tracked by each tensor's version counter), so a
model evaluated between training epochs never runs stale weights. Only CPU float32 without autocast
and without gradients takes this path; everything else runs the module as written.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model import native_kernels
from model.native_kernels import NativeKernels

logger = logging.getLogger(__name__)

_DILATION = [1, 1]
KERNEL_3X3 = native_kernels.KERNEL
#: Run a depthwise + pointwise pair as one native call (:class:`NativeSeparable`).
FUSE_SEPARABLE = True
#: Run consecutive native layers as one patch-by-patch call (:class:`NativeChain`); False runs each
#: as a chain of its own (benchmarks/yamnet_native_steps.py measures the difference).
CHAIN_NATIVE = True


def fused_ops_available() -> bool:
    """oneDNN's fused conv and matmul ops ship in x86-64 and aarch64 Linux wheels; other builds fall back."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def fused_path_applies(x: Tensor) -> bool:
    """True where the fused plan gives the same numbers as the module: CPU float32, no grad, no autocast."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and fused_ops_available()
    )


@dataclass(frozen=True)
class FusedConv:
    """One conv+ReLU as oneDNN runs it: (possibly re-shaped) weight, symmetric padding, optional pre-pad."""

    weight: Tensor
    bias: Tensor
    padding: list[int]
    stride: list[int]
    groups: int
    pre_pad: tuple[int, int, int, int] | None  # (left, right, top, bottom) for the explicit-pad stem

    def __call__(self, x: Tensor) -> Tensor:
        if self.pre_pad is not None:
            x = nn.functional.pad(x, self.pre_pad).contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, _DILATION, self.groups, "relu", [], ""
        )


@dataclass(frozen=True)
class NativeConv:
    """A stem (one input channel) or depthwise 3x3 conv+ReLU, as a layer of a :class:`NativeChain`."""

    taps: Tensor  # [9, out channels]: tap-major, so a tap's channel block is one vector load
    bias: Tensor
    stride: int
    depthwise: bool


@dataclass(frozen=True)
class NativeSeparable:
    """A MobileNet separable block (depthwise 3x3 + ReLU, pointwise 1x1 + ReLU) as one chain layer.

    The depthwise outputs of a few pixels go straight from an L1 buffer into the pointwise product,
    so they never make a round trip through memory.
    """

    taps: Tensor
    dw_bias: Tensor
    panels: Tensor  # pointwise weight packed by native_kernels.pack_panels
    pw_bias: Tensor
    stride: int


@dataclass(frozen=True, eq=False)
class NativeChain:
    """Consecutive native layers run patch by patch in one call, activations kept in per-thread scratch.

    Layer by layer, 20 patches of the 48x32x64 map (7.8 MB) go through memory between calls; a chain
    carries each patch through all its layers inside a core's L2. Padding is TF 'SAME' for whatever
    map size arrives, so one chain serves every shape.
    """

    kernels: NativeKernels
    layers: tuple[NativeConv | NativeSeparable, ...]
    spec: native_kernels.ChainSpec

    @classmethod
    def of(cls, kernels: NativeKernels, layers: list[NativeConv | NativeSeparable]) -> NativeChain:
        described = []
        for op in layers:
            if isinstance(op, NativeSeparable):
                described.append((native_kernels.CHAIN_SEPARABLE, op.pw_bias.shape[0], op.stride,
                                  (op.taps, op.dw_bias, op.panels, op.pw_bias)))
            else:
                kind = native_kernels.CHAIN_DEPTHWISE if op.depthwise else native_kernels.CHAIN_STEM
                described.append((kind, op.bias.shape[0], op.stride, (op.taps, op.bias, None, None)))
        first = layers[0]
        in_channels = first.taps.shape[1] if not isinstance(first, NativeConv) or first.depthwise else 1
        return cls(kernels, tuple(layers), native_kernels.ChainSpec.build(in_channels, described))

    def __call__(self, x: Tensor) -> Tensor:
        return self.kernels.chain_relu(x.contiguous(memory_format=torch.channels_last), self.spec)


def _chained(kernels: NativeKernels, plan: list) -> list:
    """``plan`` with its native layers run as chains: each run of consecutive ones as one chain, or,
    without ``CHAIN_NATIVE`` (to measure what chaining buys), each layer as a chain of its own."""
    merged: list = []
    run: list[NativeConv | NativeSeparable] = []
    for op in [*plan, None]:
        if isinstance(op, (NativeConv, NativeSeparable)):
            run.append(op)
            continue
        if run:
            groups = [run] if CHAIN_NATIVE else [[layer] for layer in run]
            merged.extend(NativeChain.of(kernels, group) for group in groups)
        run = []
        if op is not None:
            merged.append(op)
    return merged


def native_separable_applies(depthwise: nn.Conv2d, pointwise: nn.Conv2d) -> bool:
    """Whether the pair is a separable block the fused C kernel computes."""
    return (
        native_applies(depthwise)
        and depthwise.groups > 1
        and depthwise.out_channels <= native_kernels.MAX_SEPARABLE_IN
        and pointwise.kernel_size == (1, 1)
        and pointwise.stride == (1, 1)
        and pointwise.groups == 1
        and pointwise.in_channels == depthwise.out_channels
        and pointwise.out_channels % native_kernels.PANEL == 0
    )


def _native_separable_op(depthwise: nn.Conv2d, pointwise: nn.Conv2d) -> NativeSeparable:
    dw = _native_op(depthwise)
    pw_bias = pointwise.bias.detach() if pointwise.bias is not None else torch.zeros(pointwise.out_channels)
    return NativeSeparable(dw.taps, dw.bias, native_kernels.pack_panels(pointwise.weight.detach()),
                           pw_bias.contiguous(), dw.stride)


def native_applies(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is a layer the C kernels compute: 3x3, undilated, square stride, and either
    depthwise or from one input channel, over a multiple of their vector width of channels."""
    if conv.kernel_size != (KERNEL_3X3, KERNEL_3X3) or conv.dilation != (1, 1) or conv.stride[0] != conv.stride[1]:
        return False
    if conv.padding_mode != "zeros" or conv.out_channels % native_kernels.LANES:
        return False
    depthwise = conv.groups == conv.in_channels == conv.out_channels
    stem = conv.in_channels == 1 and conv.groups == 1
    return depthwise or stem


def _native_op(conv: nn.Conv2d) -> NativeConv:
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
    taps = weight.reshape(conv.out_channels, KERNEL_3X3 * KERNEL_3X3).t().contiguous()
    return NativeConv(taps, bias.contiguous(), conv.stride[0], depthwise=conv.in_channels != 1)


@dataclass(frozen=True)
class FusedPointwise:
    """One 1x1 conv+ReLU as a oneDNN matmul on the [pixels, channels] view of a channels-last map."""

    weight: Tensor  # [out, in], packed for the pixel count of its plan where the build allows
    bias: Tensor
    out_channels: int

    def __call__(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view when x is channels-last
        y = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "relu", [], "")
        return y.view(n, h, w, self.out_channels).permute(0, 3, 1, 2)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (extra pixel at the end), which YAMNet was trained with.

    PyTorch's symmetric ``padding=`` cannot express the asymmetric case of stride-2 layers.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _one_axis(size: int, kernel: int, stride: int) -> tuple[int, int, bool]:
    """(symmetric padding, leading zero taps to add, needs an explicit pad) for one spatial axis."""
    before, after = same_padding(size, kernel, stride)
    if before == after:
        return before, 0, False
    if after == before + 1:
        return after, 1, False
    return 0, 0, True  # not reachable for 3x3 kernels; handled by an explicit pad


def _explicit_pad(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int, int, int] | None:
    """(left, right, top, bottom) where ``conv`` pads its input explicitly on a height x width map, else None.

    Only layers whose 'SAME' padding a symmetric one cannot express pad explicitly: the one-channel
    stem at stride 2 (a grown 4x4 kernel is slower there than a copy of its small input) and
    kernels whose padding differs by more than one (not reachable for YAMNet's 3x3 kernels).
    """
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    _, lead_h, explicit_h = _one_axis(height, kh, sh)
    _, lead_w, explicit_w = _one_axis(width, kw, sw)
    if conv.in_channels == 1 and (lead_h or lead_w) or explicit_h or explicit_w:
        top, bottom = same_padding(height, kh, sh)
        left, right = same_padding(width, kw, sw)
        return left, right, top, bottom
    return None


def runs_native(conv: nn.Conv2d, native: bool) -> bool:
    """Whether a plan built with ``native`` hands ``conv`` alone to the C kernels: the one place that
    decides, since the stem's input is padded (or not) for it before the plan runs."""
    return native and native_applies(conv) and native_kernels.load() is not None


def pad_for_stem(conv: nn.Conv2d, x: Tensor, native: bool = False) -> tuple[Tensor, bool]:
    """(x padded for ``conv``, True) where ``conv`` pads explicitly on x, else (x, False).

    Padding a whole batch once costs one copy; padding each chunk cost a call and a copy per chunk
    (about 2 % of the YAMNet forward at 32 clips). A stem the native kernels run needs no pad at all.
    """
    if runs_native(conv, native):
        return x, False
    pad = _explicit_pad(conv, x.shape[-2], x.shape[-1])
    if pad is None:
        return x, False
    return nn.functional.pad(x, pad), True


def _pack_linear(weight: Tensor, rows: int) -> Tensor:
    """A 1x1 conv's weight as a [out, in] matrix in oneDNN's layout for ``rows`` pixels, or plain."""
    matrix = weight.reshape(weight.shape[0], weight.shape[1]).contiguous()
    try:
        return torch.ops.mkldnn._reorder_linear_weight(matrix, rows)
    except (RuntimeError, NotImplementedError, AttributeError) as exc:  # pragma: no cover - build specific
        logger.debug("linear weight pre-packing unavailable (%s); using plain weights", exc)
        return matrix


def _pack(weight: Tensor, padding: list[int], stride: list[int], groups: int, input_size: list[int]) -> Tensor:
    """Weight in oneDNN's preferred blocked layout for this input size, or as is if the build lacks it."""
    try:
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.contiguous().to_mkldnn(), padding, stride, _DILATION, groups, input_size
        )
    except (RuntimeError, NotImplementedError, AttributeError) as exc:  # pragma: no cover - build specific
        logger.debug("weight pre-packing unavailable (%s); using plain weights", exc)
        return weight.contiguous()


Op = FusedConv | FusedPointwise | NativeConv | NativeSeparable | NativeChain


def build_plan(
    convs: list[nn.Conv2d], batch: int, height: int, width: int, pack: bool = True, prepadded: bool = False,
    native: bool = False,
) -> list[Op]:
    """Fused ops for ``convs`` (in order, each followed by ReLU, TF 'SAME' padded) on [batch, C, height, width].

    ``pack`` reorders the weights for exactly this input shape: about 10 ms once, then each call
    skips oneDNN's per-call weight reorder. Packed weights used on another batch size stay correct
    but get reordered on every call (measured: 2 -> 33 ms at one patch), so a plan is per shape.
    ``prepadded`` says the input already carries the first layer's explicit pad (:func:`pad_for_stem`);
    ``height`` and ``width`` are still the unpadded size. ``native`` runs the layers
    :func:`native_applies` accepts through the C kernels where they load (never a pre-padded stem).
    """
    kernels = native_kernels.load() if native else None
    plan: list[Op] = []
    skip_next = False
    for index, conv in enumerate(convs):
        if skip_next:
            skip_next = False
            continue
        (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
        following = convs[index + 1] if index + 1 < len(convs) else None
        if (kernels is not None and FUSE_SEPARABLE and following is not None
                and native_separable_applies(conv, following)):
            plan.append(_native_separable_op(conv, following))
            height, width = -(-height // sh), -(-width // sw)
            skip_next = True
            continue
        if runs_native(conv, native) and not (index == 0 and prepadded):
            plan.append(_native_op(conv))
            height, width = -(-height // sh), -(-width // sw)
            continue
        weight = conv.weight.detach()
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
        if (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and conv.groups == 1:
            rows = batch * height * width
            packed = _pack_linear(weight, rows) if pack else weight.reshape(weight.shape[:2]).contiguous()
            plan.append(FusedPointwise(packed, bias.contiguous(), conv.out_channels))
            continue
        pre_pad = _explicit_pad(conv, height, width)
        size = [batch, conv.in_channels, height, width]
        if pre_pad is not None:
            left, right, top, bottom = pre_pad
            padding = [0, 0]
            size = [batch, conv.in_channels, height + top + bottom, width + left + right]
            if index == 0 and prepadded:
                pre_pad = None
        else:
            ph, lead_h, _ = _one_axis(height, kh, sh)
            pw, lead_w, _ = _one_axis(width, kw, sw)
            padding = [ph, pw]
            if lead_h or lead_w:
                grown = weight.new_zeros(weight.shape[0], weight.shape[1], kh + lead_h, kw + lead_w)
                grown[:, :, lead_h:, lead_w:] = weight
                weight = grown
        stride = [sh, sw]
        packed = _pack(weight, padding, stride, conv.groups, size) if pack else weight.contiguous()
        plan.append(FusedConv(packed, bias.contiguous(), padding, stride, conv.groups, pre_pad))
        height, width = -(-height // sh), -(-width // sw)
    return _chained(kernels, plan) if kernels is not None else plan


class FusedFeatures:
    """Runs a stack of conv+ReLU layers through cached plans, dropped whenever a weight changes.

    Shapes differ from call to call (one clip per pass: the patch count follows the clip's length),
    and packing weights for a shape costs about 10 ms, so only shapes that come back are packed: a
    shape's first ``PACK_AFTER - 1`` calls run a plan with plain weights (per spatial size, any
    batch), later calls a packed plan; at most ``MAX_PACKED`` packed plans are kept (least recently
    used goes first), since each holds a 15 MB copy of the weights.

    Holds no state worth saving: copies and pickles start with an empty cache (oneDNN's packed
    tensors cannot be copied), and the next call rebuilds what it needs.
    """

    PACK_AFTER = 2
    MAX_PACKED = 4
    _MAX_COUNTED = 1024  # distinct shapes remembered before the counts start over

    def __init__(self) -> None:
        self._weights_key: tuple = ()
        self._packed: OrderedDict[tuple[int, int, int, bool, bool], list[Op]] = OrderedDict()
        self._plain: dict[tuple[int, int, bool, bool], list[Op]] = {}
        self._seen: Counter[tuple[int, int, int, bool, bool]] = Counter()

    def __call__(
        self, convs: list[nn.Conv2d], x: Tensor, unpadded: tuple[int, int] | None = None, native: bool = False
    ) -> Tensor | None:
        """Features of ``x``, or None when the weights cannot be tracked (the caller runs the modules).

        ``unpadded`` is the (height, width) before :func:`pad_for_stem` where ``x`` comes padded by it.
        ``native`` lets the plan use the C kernels (:func:`build_plan`).
        Weights created under ``torch.inference_mode`` carry no version counter, so a cached plan
        could not notice them change: those models take the module path.
        """
        if any(c.weight.is_inference() or (c.bias is not None and c.bias.is_inference()) for c in convs):
            return None
        weights_key = tuple(
            (c.weight.data_ptr(), c.weight._version, None if c.bias is None else c.bias._version) for c in convs
        )
        if weights_key != self._weights_key:
            self.__init__()
            self._weights_key = weights_key
        h = x.contiguous(memory_format=torch.channels_last)
        batch = x.shape[0]
        height, width = unpadded if unpadded is not None else x.shape[-2:]
        for op in self._plan_for(convs, (batch, height, width, unpadded is not None, native)):
            h = op(h)
        return h

    def _plan_for(self, convs: list[nn.Conv2d], key: tuple[int, int, int, bool, bool]) -> list[Op]:
        """The plan for (batch, unpadded height, unpadded width, input pre-padded, native kernels allowed)."""
        plan = self._packed.get(key)
        if plan is not None:
            self._packed.move_to_end(key)
            return plan
        if len(self._seen) >= self._MAX_COUNTED:
            self._seen.clear()
        self._seen[key] += 1
        batch, height, width, prepadded, native = key
        if self._seen[key] >= self.PACK_AFTER:
            if len(self._packed) >= self.MAX_PACKED:
                self._packed.popitem(last=False)
            plan = self._packed[key] = build_plan(convs, batch, height, width, pack=True, prepadded=prepadded,
                                                      native=native)
            return plan
        plain = self._plain.get(key[1:])
        if plain is None:
            plain = self._plain[key[1:]] = build_plan(convs, batch, height, width, pack=False, prepadded=prepadded,
                                                        native=native)
        return plain

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
