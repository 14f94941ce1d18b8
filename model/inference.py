"""Audio inference without gradients: the audio branch exported to ONNX and run by onnxruntime on CPU.

Why onnxruntime: its CPU kernels are tuned by its maintainers for every x86-64 level and for arm64,
so the same file runs near each machine's peak. The project's own C kernels, tuned on one AVX-512
machine, ran 14-21x slower than onnxruntime on a machine with AVX2 only; a fast path that only one
machine can run is a liability. Training, and inference on CUDA, keep the PyTorch modules.

The graph (``audio_branch.onnx``, written next to the model by the train step, its sha256 in the
model's ``config.json``) is the whole audio branch: 16 kHz waveforms [B, T] zero-padded to the
longest clip and their lengths [B] in, unit vectors [B, D] in the frozen text tower's space out. The
log-mel frontend, the encoder, the pooling over each clip's own patches, the projection and the L2
normalisation are all inside it, so a consumer needs only onnxruntime and a decoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

if TYPE_CHECKING:
    from model.cacara_model import CacaraModel

log = logging.getLogger(__name__)

#: The export's file name inside a model folder; its sha256 is recorded in config.json under ONNX_SHA_KEY.
ONNX_FILE = "audio_branch.onnx"
ONNX_SHA_KEY = "onnx_sha256"
INPUT_WAVEFORMS = "waveforms"
INPUT_LENGTHS = "lengths"
OUTPUT_EMBEDDINGS = "embeddings"
#: Padded samples per onnxruntime call: 32 ten-second clips. Clips are sorted by length first, so a
#: batch holds clips of similar length and little padding is computed; the cap bounds activation memory.
BATCH_SAMPLES = 32 * 160_000


class _AudioBranch(nn.Module):
    """What the export traces: the encoder's export path, the head, L2 normalisation."""

    def __init__(self, model: "CacaraModel"):
        super().__init__()
        self.encoder = model.encoder
        self.head = model.head

    def forward(self, waveforms: Tensor, lengths: Tensor) -> Tensor:
        return F.normalize(self.head(self.encoder.export_forward(waveforms, lengths)).float(), dim=-1)


def export_audio_branch(model: "CacaraModel") -> bytes:
    """The serialised ONNX graph of ``model``'s audio branch, batch size and clip length dynamic.

    Tracing takes 10-20 s on 2 cores, and the graph of an architecture does not depend on its weight
    values (every parameter is an initializer named by its state-dict key), so the traced graph is kept
    as a template in the weights cache and a model's export is that template with its own weights.
    Every export goes through the template, so the bytes are the same whether it was cached or not.
    """
    from model.weights_cache import atomic_write_bytes, resolve_weights_dir

    if not model.encoder.onnx_exportable:
        raise ValueError(f"audio encoder {model.encoder.name} cannot be exported to ONNX")
    path = resolve_weights_dir() / TEMPLATE_DIR / f"{template_key(model)}.onnx"
    if path.exists():
        template = onnx.load_model_from_string(path.read_bytes())
    else:
        template = _trace(model)
        try:
            atomic_write_bytes(path, template.SerializeToString())
            log.info("traced the audio branch to ONNX; template cached at %s", path)
        except OSError as exc:  # a read-only weights folder (an image's) only costs the next export a trace
            log.warning("could not cache the ONNX template at %s (%s); continuing without", path, exc)
    return _with_weights(template, model).SerializeToString()


#: Where traced templates live under the weights cache ($CACARA_WEIGHTS_DIR).
TEMPLATE_DIR = "onnx_templates"
#: The modules whose code makes the traced graph; with the library versions they key the template.
_GRAPH_MODULES = ("model.frontend", "model.yamnet", "model.audio_encoders", "model.cacara_model", __name__)


def template_key(model: "CacaraModel") -> str:
    """What the traced graph depends on: the code that builds it, the architecture, the exporter's versions."""
    import importlib
    from importlib.metadata import version

    digest = hashlib.sha256()
    for name in _GRAPH_MODULES:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    shapes = sorted((k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items())
    arch = {k: model.config.get(k) for k in ("audio_encoder", "head", "in_dim", "out_dim", "num_classes",
                                             "sample_rate")}
    versions = [version(p) for p in ("torch", "onnxscript", "onnx", "onnx-ir")]
    digest.update(json.dumps([arch, shapes, versions], sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def _trace(model: "CacaraModel") -> onnx.ModelProto:
    """PyTorch's own exporter (``torch.onnx.export(dynamo=True)``, which needs onnxscript); its optimiser
    folds TensorFlow's asymmetric 'SAME' padding into the convolutions, so onnxruntime sees plain
    Conv + Relu layers."""
    import warnings

    branch = _AudioBranch(model).to("cpu").eval()
    rate = model.sample_rate
    # Two clips of different lengths, so neither dimension is specialised to the example.
    waves = torch.zeros(2, 2 * rate)
    waves[:, :rate] = torch.sin(torch.arange(rate) * 0.05) * 0.1
    lengths = torch.tensor([2 * rate, rate], dtype=torch.int64)
    batch, samples = torch.export.Dim("batch"), torch.export.Dim("samples", min=2)
    exporter_log = logging.getLogger("torch.onnx")
    previous = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # axis-renaming notes about the shared batch dim
            program = torch.onnx.export(
                branch, (waves, lengths), dynamo=True, verbose=False,
                input_names=[INPUT_WAVEFORMS, INPUT_LENGTHS], output_names=[OUTPUT_EMBEDDINGS],
                dynamic_shapes={"waveforms": {0: batch, 1: samples}, "lengths": {0: batch}})
    finally:
        exporter_log.setLevel(previous)
    proto = program.model_proto
    proto.producer_name, proto.producer_version = "cacara", ""
    # The exporter annotates nodes with module paths and reprs holding memory addresses: dropped, so
    # two traces of the same code give the same bytes (DVC hashes the model folder).
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for info in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output):
        del info.metadata_props[:]
    del proto.metadata_props[:]
    del proto.graph.metadata_props[:]
    return proto


def _with_weights(template: onnx.ModelProto, model: "CacaraModel") -> onnx.ModelProto:
    """A copy of ``template`` whose parameter initializers hold ``model``'s values, shapes checked."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous().numpy() for k, v in model.state_dict().items()}
    out = onnx.ModelProto()
    out.CopyFrom(template)
    replaced = 0
    for i, init in enumerate(out.graph.initializer):
        if init.name not in state:
            continue
        value = state[init.name]
        if tuple(init.dims) != value.shape:
            raise ValueError(f"ONNX template: {init.name} is {tuple(init.dims)}, the model's is {value.shape}")
        out.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(value, init.name))
        replaced += 1
    if not replaced:
        raise ValueError("ONNX template holds none of the model's parameters")
    return out


def attach_onnx_export(model_dir: str | Path) -> str | None:
    """Export a saved model's audio branch into its folder and record the sha256 in its config.json.

    Done once per published model (the train step), not per checkpoint: an export takes seconds. A
    folder whose export already matches its config is left as it is; an encoder that cannot be
    exported gets none (its consumers run the modules). Returns the sha256, or None.
    """
    from model.cacara_model import CONFIG, load_model

    folder = Path(model_dir)
    config = json.loads((folder / CONFIG).read_text())
    path = folder / ONNX_FILE
    model = load_model(folder)
    if not model.encoder.onnx_exportable:
        log.info("%s does not export to ONNX: %s gets no %s", model.encoder.name, folder, ONNX_FILE)
        return None
    key = template_key(model)
    if (config.get(ONNX_SHA_KEY) and config.get(ONNX_KEY) == key and path.exists()
            and hashlib.sha256(path.read_bytes()).hexdigest() == config[ONNX_SHA_KEY]):
        return config[ONNX_SHA_KEY]  # exported by this code from these weights already
    data = export_audio_branch(model)
    check_export(model, data)
    from model.weights_cache import atomic_write_bytes

    atomic_write_bytes(path, data)
    sha = hashlib.sha256(data).hexdigest()
    config[ONNX_SHA_KEY], config[ONNX_KEY] = sha, key
    tmp = folder / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=1, default=float))
    tmp.replace(folder / CONFIG)
    log.info("exported the audio branch to %s (sha256 %s)", path, sha[:12])
    return sha


#: The graph a model's export was made from (its template key), beside the export's sha256 in config.json:
#: an export made by other code (an edited frontend, a new exporter) is made again, not kept.
ONNX_KEY = "onnx_template_key"
#: How far the export may be from the modules on a synthetic clip before it is refused (measured 5e-6).
EXPORT_CHECK_TOL = 1e-3


def check_export(model: "CacaraModel", data: bytes) -> None:
    """Run the export and the modules on one synthetic clip: a template whose swapped weights missed a
    tensor (or a broken exporter) would give another network, and must not be published."""
    t = np.arange(3 * model.sample_rate, dtype=np.float32) / model.sample_rate
    clip = [(0.3 * np.sin(2 * np.pi * 440 * t) * np.exp(-t)).astype(np.float32)]
    got = OnnxAudioEmbedder(data, model.sample_rate).embed(clip)
    want = TorchAudioEmbedder(model).embed(clip)
    worst = float(np.abs(got - want).max())
    if not worst < EXPORT_CHECK_TOL:
        raise RuntimeError(f"the ONNX export differs from the PyTorch modules by {worst:.2e} (limit "
                           f"{EXPORT_CHECK_TOL}): delete the cached templates under the weights folder and retry")


def _cgroup_cpus() -> int | None:
    """The container's CPU limit from cgroup v2 (``cpu.max``: quota and period), when there is one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, -(-int(quota) // int(period)))


def inference_threads() -> int:
    """``OMP_NUM_THREADS`` where set, else the container's CPU limit (cgroup), else the CPUs this process
    may use: a pod limited to 2 CPUs on a 64-core node must not start 64 threads."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        visible = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        visible = os.cpu_count() or 1
    limit = _cgroup_cpus()
    return min(visible, limit) if limit else visible


class AudioEmbedder(Protocol):
    """What every consumer of a trained model's audio side needs: waveforms in, unit rows out."""

    sample_rate: int
    dim: int

    def embed(self, waves: Sequence[np.ndarray], progress: bool = False) -> np.ndarray:
        """(N, dim) float32, row i for waveform i (mono float32 at ``sample_rate``)."""


def length_batches(lengths: Sequence[int], budget: int = BATCH_SAMPLES) -> list[list[int]]:
    """Indices grouped longest first so that each group's size times its longest clip stays within
    ``budget`` samples (a clip longer than the budget gets a group of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class OnnxAudioEmbedder:
    """onnxruntime on an exported audio branch; one session, reused for every call (it is thread-safe)."""

    def __init__(self, graph: bytes | str | Path, sample_rate: int, threads: int | None = None,
                 batch_samples: int = BATCH_SAMPLES):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or inference_threads()
        options.inter_op_num_threads = 1
        # Idle pool threads would otherwise spin after each run and steal the cores decoding needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        source = graph if isinstance(graph, bytes) else str(graph)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.sample_rate = int(sample_rate)
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        self.batch_samples = int(batch_samples)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: dict, threads: int | None = None) -> "OnnxAudioEmbedder":
        """The export of a model folder, refused when its bytes differ from the sha256 in config.json."""
        path = Path(model_dir) / ONNX_FILE
        expected = config.get(ONNX_SHA_KEY)
        if expected is None or not path.exists():
            raise FileNotFoundError(f"{model_dir} has no ONNX export ({ONNX_FILE} with its sha256 in config.json): "
                                    "it was written by an older version; train it again (`cacara train`)")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(f"{path} does not match its recorded sha256 (corrupt or replaced)")
        return cls(data, int(config["sample_rate"]), threads)

    def embed(self, waves: Sequence[np.ndarray], progress: bool = False) -> np.ndarray:
        """Rows in input order; clips are batched by length (see :func:`length_batches`)."""
        lengths = [int(len(w)) for w in waves]
        if any(n == 0 for n in lengths):
            raise ValueError("cannot embed an empty waveform")
        out = np.zeros((len(waves), self.dim), dtype=np.float32)
        groups = length_batches(lengths, self.batch_samples)
        bar = tqdm(total=len(waves), desc="embed audio", unit="clip", disable=None if progress else True)
        for group in groups:
            batch = np.zeros((len(group), lengths[group[0]]), dtype=np.float32)
            for row, i in enumerate(group):
                batch[row, : lengths[i]] = waves[i]
            feeds = {INPUT_WAVEFORMS: batch, INPUT_LENGTHS: np.array([lengths[i] for i in group], dtype=np.int64)}
            out[group] = self.session.run([OUTPUT_EMBEDDINGS], feeds)[0]
            bar.update(len(group))
        bar.close()
        return out


class TorchAudioEmbedder:
    """The PyTorch modules: CUDA inference, and encoders that cannot be exported (``hf:`` checkpoints)."""

    def __init__(self, model: "CacaraModel", device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.sample_rate = model.sample_rate
        self.dim = int(model.config["out_dim"])

    def embed(self, waves: Sequence[np.ndarray], progress: bool = False) -> np.ndarray:
        from model.cacara_model import embed_waveforms

        return embed_waveforms(self.model, [torch.from_numpy(np.asarray(w, dtype=np.float32)) for w in waves],
                               self.device)


def embedder_for(model: "CacaraModel", model_dir: str | Path | None = None, config: dict | None = None,
                 device: str | torch.device = "cpu") -> AudioEmbedder:
    """onnxruntime on CPU wherever the encoder exports; the modules on CUDA or where it does not.

    With ``model_dir`` the folder's own export is used (every consumer reads the same file); without
    one (a model that only lives in memory, such as evaluate's untrained baseline) it is exported now.
    """
    if torch.device(device).type != "cpu" or not model.encoder.onnx_exportable:
        if torch.device(device).type == "cpu":
            log.info("%s does not export to ONNX: embedding with the PyTorch modules", model.encoder.name)
        return TorchAudioEmbedder(model, device)
    if model_dir is not None:
        return OnnxAudioEmbedder.from_model_dir(model_dir, config if config is not None else model.config)
    return OnnxAudioEmbedder(export_audio_branch(model), model.sample_rate)
