"""Loads ``model/native/yamnet_kernels.c``: direct CPU kernels for YAMNet's stem and separable blocks.

Why: at 32 clips, oneDNN ran YAMNet's one-channel stem and its depthwise layers 1.6-2x slower than
onnxruntime's own kernels, its GEMM ran the early blocks' small pointwise matrices well below its
big-matrix speed, and each of its calls costs about 40 us; together they kept PyTorch YAMNet below
onnxruntime (benchmarks/yamnet_speed.py). The C file computes the stem directly and each separable
block (depthwise 3x3 + pointwise 1x1, ReLU after each) in one pass, one patch per thread at a time,
with no padded copy and no intermediate map in memory.

Why compile at first use rather than ship a build step: the file is small (under a second with
``cc -O3``), the project installs editable, and a stale binary after an edit would silently run old
code. The library is cached under the weights directory, named by a hash of the source, the flags,
the compiler's version and the machine type, so an edit, a new compiler or a shared cache volume
mounted on another architecture each get their own build. Where no compiler exists (slim container
images), or compiling fails, or ``CACARA_NATIVE_KERNELS=0`` is set, :func:`load` returns None and
YAMNet runs every layer through oneDNN: same model, results equal to about 1e-5, slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from model.weights_cache import resolve_weights_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "yamnet_kernels.c"
#: Set to 0 / false / no / off to run every layer through oneDNN.
ENV_SWITCH = "CACARA_NATIVE_KERNELS"
#: Must equal ``cacara_kernels_abi()`` in the C file: a library built from another version is refused.
ABI_VERSION = 2
#: Channel block the C kernels vectorise over (``LANES`` there): channel counts must be multiples.
LANES = 16
#: Output channels per packed pointwise panel (``NB`` there): the fused block needs multiples of it.
PANEL = 64
#: Widest depthwise output the fused block's per-thread buffer holds (``MAX_K`` there).
MAX_SEPARABLE_IN = 1024
KERNEL = 3
# -fopenmp: patches are spread over threads with OpenMP; loaded after torch, the library binds to
# torch's libgomp (same soname), so both share one thread pool.
CFLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-Wall")
COMPILE_TIMEOUT_S = 120

_FLOAT_P = ctypes.POINTER(ctypes.c_float)
_CHAIN_SIGNATURE = [_FLOAT_P, _FLOAT_P] + [ctypes.c_int] * 5 + [ctypes.POINTER(ctypes.c_int),
                                                                  ctypes.POINTER(_FLOAT_P), ctypes.c_int]
#: Layer kinds of a chain (``CHAIN_*`` in the C file).
CHAIN_STEM, CHAIN_SEPARABLE, CHAIN_DEPTHWISE = 0, 1, 2


def enabled_by_env() -> bool:
    """False when ``CACARA_NATIVE_KERNELS`` says off; anything else (or unset) means on."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in {"0", "false", "no", "off"}


def compiler() -> str | None:
    """``$CC`` if set, else the first of cc / gcc / clang on PATH."""
    if os.environ.get("CC"):
        return os.environ["CC"]
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def compiler_version(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.splitlines()[0] if done.stdout else "unknown"


def _library_path(cc: str, source: bytes) -> Path:
    """Cache file for this source, flags, compiler and machine: an edit or a new compiler rebuilds."""
    digest = hashlib.sha256()
    for part in (source, " ".join(CFLAGS).encode(), compiler_version(cc).encode(), platform.machine().encode()):
        digest.update(part)
        digest.update(b"\0")
    return resolve_weights_dir() / "native" / f"yamnet_kernels-{digest.hexdigest()[:16]}.so"


def _build(cc: str, out: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile into a temporary file and rename it, so concurrent first uses never load half a file.

    A cache directory that cannot be written (a read-only volume) gets a private build instead.
    ``extra_flags`` exist for tests that build each x86-64 code path on its own.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    except OSError as exc:
        private = Path(tempfile.mkdtemp(prefix="cacara-native-"))
        logger.info("cannot write %s (%s); building in %s", out.parent, exc, private)
        out = private / out.name
        fd, tmp = tempfile.mkstemp(dir=private, prefix=out.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        done = subprocess.run([cc, *CFLAGS, *extra_flags, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                              timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


@dataclass(frozen=True)
class NativeKernels:
    """The loaded library: one entry point, a chain of layers run patch by patch."""

    path: Path
    lib: ctypes.CDLL

    def chain_relu(self, x: Tensor, layers: ChainSpec) -> Tensor:
        """Every layer of ``layers`` on each patch of ``x`` in turn (see ``cacara_chain_relu``)."""
        n, c, h, w = x.shape
        _check_input(x)
        if c != layers.in_channels:
            raise ValueError(f"chain takes {layers.in_channels} channels, got {c}")
        out_h, out_w = h, w
        for stride in layers.strides:
            out_h, out_w = -(-out_h // stride), -(-out_w // stride)
        out = torch.empty((n, layers.out_channels, out_h, out_w), dtype=torch.float32,
                          memory_format=torch.channels_last)
        if n == 0:
            return out
        status = self.lib.cacara_chain_relu(_ptr(x), _ptr(out), n, h, w, c, len(layers.strides), layers.spec,
                                            layers.weights, torch.get_num_threads())
        if status == -2:
            raise MemoryError("native chain: no memory for the per-thread scratch maps")
        if status != 0:
            raise ValueError(f"native kernel refused the chain on x={tuple(x.shape)}")
        return out


@dataclass(frozen=True, eq=False)
class ChainSpec:
    """Layers for ``chain_relu``: per layer (kind, output channels, stride) and four weight pointers.

    Holds the tensors the pointers point into, so they live as long as the spec does.
    """

    in_channels: int
    out_channels: int
    strides: tuple[int, ...]
    spec: ctypes.Array
    weights: ctypes.Array
    tensors: tuple[Tensor, ...]

    @classmethod
    def build(cls, in_channels: int, layers: list[tuple[int, int, int, tuple[Tensor | None, ...]]]) -> ChainSpec:
        """``layers``: (kind, output channels, stride, (taps, bias, panels, pointwise bias)) in order.

        The C side receives bare pointers, so every tensor's shape is checked here against the
        channels flowing through the chain: a mismatch is a clear error, not a read past a buffer.
        """
        if not layers:
            raise ValueError("a chain needs at least one layer")
        channels = in_channels
        for index, (kind, c_out, stride, weights) in enumerate(layers):
            expected = _expected_shapes(kind, channels, c_out)
            got = tuple(None if t is None else tuple(t.shape) for t in weights)
            if got != expected or stride < 1:
                raise ValueError(f"chain layer {index} (kind {kind}, {channels} -> {c_out} channels, stride {stride}):"
                                 f" weights {got}, expected {expected}")
            channels = c_out
        ints = [value for kind, c_out, stride, _ in layers for value in (kind, c_out, stride)]
        tensors = [t for *_, ws in layers for t in ws if t is not None]
        if any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
            raise ValueError("chain weights must be contiguous float32")
        pointers = [_ptr(t) if t is not None else None for *_, ws in layers for t in ws]
        return cls(in_channels, channels, tuple(stride for _, _, stride, _ in layers),
                   (ctypes.c_int * len(ints))(*ints), (_FLOAT_P * len(pointers))(*pointers), tuple(tensors))


def _expected_shapes(kind: int, c_in: int, c_out: int) -> tuple:
    """(taps, bias, panels, pointwise bias) shapes of one chain layer, None where the kind has none;
    ValueError where no layer of that kind maps ``c_in`` to ``c_out`` channels (the C side's rules)."""
    taps = (KERNEL * KERNEL, c_out if kind == CHAIN_STEM else c_in)
    if kind == CHAIN_STEM and c_in == 1 and c_out > 0 and c_out % LANES == 0:
        return taps, (c_out,), None, None
    if kind == CHAIN_DEPTHWISE and c_in == c_out and c_in > 0 and c_in % LANES == 0:
        return taps, (c_in,), None, None
    if (kind == CHAIN_SEPARABLE and 0 < c_in <= MAX_SEPARABLE_IN and c_in % LANES == 0 and c_out > 0
            and c_out % PANEL == 0):
        return taps, (c_in,), (c_out // PANEL, c_in, PANEL), (c_out,)
    raise ValueError(f"no native layer of kind {kind} maps {c_in} to {c_out} channels")


def pack_panels(weight: Tensor) -> Tensor:
    """A 1x1 conv weight [C_out, C, 1, 1] as [C_out / PANEL, C, PANEL]: each register tile's weights
    are one contiguous run, read front to back along the input channels."""
    c_out, c = weight.shape[:2]
    return weight.reshape(c_out, c).t().reshape(c, c_out // PANEL, PANEL).permute(1, 0, 2).contiguous()


def _check_input(x: Tensor) -> None:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"native kernels take CPU float32, got {x.dtype} on {x.device}")
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("native kernels take a channels-last input")


def _ptr(t: Tensor):
    return ctypes.cast(t.data_ptr(), _FLOAT_P)


@functools.cache
def load() -> NativeKernels | None:
    """The kernels, compiled on first use and cached; None where they cannot be had (see module doc)."""
    if not enabled_by_env():
        logger.info("%s is off: YAMNet's layers run through oneDNN", ENV_SWITCH)
        return None
    if platform.system() != "Linux":
        return None  # the kernels bind to torch's libgomp, which only Linux wheels ship under this soname
    cc = compiler()
    if cc is None:
        logger.warning("no C compiler found (set CC): YAMNet's layers run through oneDNN, about 10-20 %% slower "
                       "on CPU (benchmarks/yamnet_speed.py)")
        return None
    path = _library_path(cc, SOURCE.read_bytes())
    try:
        if not path.exists():
            logger.info("compiling %s -> %s", SOURCE.name, path)
            path = _build(cc, path)
        return open_library(path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("native YAMNet kernels unavailable (%s): YAMNet's layers run through oneDNN", exc)
        return None


def open_library(path: Path) -> NativeKernels:
    """Load a built library, refusing one from another version of the C file."""
    lib = ctypes.CDLL(str(path))
    if lib.cacara_kernels_abi() != ABI_VERSION:
        raise RuntimeError(f"{path} reports ABI {lib.cacara_kernels_abi()}, expected {ABI_VERSION}")
    lib.cacara_chain_relu.argtypes = _CHAIN_SIGNATURE
    lib.cacara_chain_relu.restype = ctypes.c_int
    return NativeKernels(path, lib)
