"""Step 6, index: every clip of a dataset embedded by a trained model, in a vector index the service searches.

The vectors go into faiss (exact inner product on unit vectors below ``index.exact_below`` clips,
HNSW at or above: exact search reads every vector per query, which stops being cheap somewhere in the
hundreds of thousands). Beside it: the clips' metadata (id, captions, content hash), optionally their
16 kHz audio (the search page plays it), and a record of the model and of every file's sha256.

An earlier index is an explicit input (``previous``): clips whose audio bytes are unchanged, embedded by
the same model export, keep their vectors, so re-indexing a grown dataset embeds only the new clips.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cacara.config import IndexConfig
from cacara.manifest import read_manifest

log = logging.getLogger(__name__)
# faiss logs every SIMD variant it could not load at INFO: noise next to the one it uses.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

VECTORS = "vectors.npy"
CLIPS = "clips.jsonl"
FAISS = "index.faiss"
RECORD = "index.json"
AUDIO = "audio"
FORMAT_VERSION = 1


@dataclass
class IndexResult:
    out_dir: Path
    count: int
    embedded: int
    reused: int
    kind: str

    def summary(self) -> str:
        return (f"index: {self.count} clips ({self.kind}), {self.embedded} embedded now, "
                f"{self.reused} reused from the earlier index; {self.out_dir}")


def _sha256(path: Path) -> str:
    from model.weights_cache import sha256_file

    return sha256_file(path)


def model_identity(model_dir: Path) -> str:
    """What the vectors depend on: the model's weights and, where there is one, its ONNX export."""
    config = json.loads((model_dir / "config.json").read_text())
    return hashlib.sha256(f"{config['sha256']}:{config.get('onnx_sha256')}".encode()).hexdigest()


def _previous_vectors(previous: Path | None, identity: str) -> dict[str, np.ndarray]:
    """clip sha256 -> vector from an earlier index built with the same model, else nothing."""
    if previous is not None and not (previous / RECORD).exists():
        retired = previous.with_name(previous.name + ".old")  # a run stopped between its two renames
        previous = retired if (retired / RECORD).exists() else None
    if previous is None:
        return {}
    record = json.loads((previous / RECORD).read_text())
    if record.get("model_identity") != identity or record.get("format_version") != FORMAT_VERSION:
        log.info("earlier index %s was built with another model: every clip is embedded again", previous)
        return {}
    vectors = np.load(previous / VECTORS, allow_pickle=False)
    rows = [json.loads(line) for line in (previous / CLIPS).read_text(encoding="utf-8").splitlines() if line]
    return {row["sha256"]: vectors[i] for i, row in enumerate(rows)}


def build_faiss(vectors: np.ndarray, config: IndexConfig):
    """Exact inner product below the threshold, HNSW at or above (both on the unit vectors)."""
    import faiss

    settings = config.index
    dim = vectors.shape[1]
    if len(vectors) < settings.exact_below:
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.hnsw_ef_construction
        index.hnsw.efSearch = settings.hnsw_ef_search
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def build_index(dataset_dir: str | Path, model_dir: str | Path, out_dir: str | Path, config: IndexConfig,
                previous: str | Path | None = None) -> IndexResult:
    """Embed every clip of ``dataset_dir`` with ``model_dir`` and write the index to ``out_dir``."""
    import faiss

    from cacara.embed import Embedder

    dataset, model, out = Path(dataset_dir), Path(model_dir), Path(out_dir)
    clips = read_manifest(dataset)
    if not clips:
        raise ValueError(f"{dataset} holds no clips to index")
    identity = model_identity(model)
    earlier = _previous_vectors(Path(previous) if previous is not None else None, identity)
    # Read the earlier index before the output is touched: it may be the same folder (dvc persists it).
    todo = [i for i, c in enumerate(clips) if c.sha256 not in earlier]
    embedder = Embedder.load(model)
    vectors = np.zeros((len(clips), embedder.dim), dtype=np.float32)
    for i, clip in enumerate(clips):
        if clip.sha256 in earlier:
            vectors[i] = earlier[clip.sha256]
    if todo:
        vectors[todo] = embedder.embed_audio_files([dataset / clips[i].audio_path for i in todo])
    kind = "exact" if len(clips) < config.index.exact_below else "hnsw"
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    np.save(staging / VECTORS, vectors)
    faiss.write_index(build_faiss(vectors, config), str(staging / FAISS))
    rows: list[dict[str, Any]] = []
    if config.index.include_audio:
        (staging / AUDIO).mkdir()
    for clip in clips:
        row = {"clip_id": clip.clip_id, "sha256": clip.sha256, "captions": clip.captions,
               "duration_s": clip.duration_s, "split": clip.split}
        if config.index.include_audio:
            name = f"{clip.sha256[:16]}{Path(clip.audio_path).suffix}"
            shutil.copyfile(dataset / clip.audio_path, staging / AUDIO / name)
            row["audio"] = f"{AUDIO}/{name}"
        rows.append(row)
    (staging / CLIPS).write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows),
                                 encoding="utf-8")
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    record = {"format_version": FORMAT_VERSION, "model_identity": identity, "count": len(clips),
              "dim": int(vectors.shape[1]), "kind": kind, "settings": config.index.model_dump(),
              "text_encoder": embedder.model.config["text_encoder"],
              "audio_encoder": embedder.model.config["audio_encoder"],
              "sha256": {str(p.relative_to(staging)): _sha256(p) for p in files}}
    (staging / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
    # Swap in the finished index by renames: a reader finds the old index or the new one, never a mix.
    retired = out.with_name(out.name + ".old")
    shutil.rmtree(retired, ignore_errors=True)
    if out.exists():
        out.rename(retired)
    staging.rename(out)
    shutil.rmtree(retired, ignore_errors=True)
    result = IndexResult(out, len(clips), len(todo), len(clips) - len(todo), kind)
    log.info("%s", result.summary())
    return result


class ClipIndex:
    """A built index, loaded for searching: faiss plus the clips' metadata; sha256 of every file checked."""

    def __init__(self, index_dir: str | Path):
        import faiss

        self.dir = Path(index_dir)
        if not (self.dir / RECORD).exists():
            raise FileNotFoundError(f"{self.dir} is not an index (no {RECORD}); build one with `cacara index`")
        self.record = json.loads((self.dir / RECORD).read_text())
        for rel, sha in self.record["sha256"].items():
            if _sha256(self.dir / rel) != sha:
                raise ValueError(f"{self.dir / rel} does not match its recorded sha256 (corrupt or replaced)")
        self.faiss = faiss.read_index(str(self.dir / FAISS))
        if self.record["kind"] == "hnsw":
            self.faiss.hnsw.efSearch = int(self.record["settings"]["hnsw_ef_search"])
        self.clips = [json.loads(line) for line in (self.dir / CLIPS).read_text(encoding="utf-8").splitlines() if line]
        self.by_id = {c["clip_id"]: i for i, c in enumerate(self.clips)}

    def __len__(self) -> int:
        return len(self.clips)

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """Per query row, up to ``k`` (clip row, inner product), best first."""
        k = min(int(k), len(self.clips))
        scores, rows = self.faiss.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return [[(int(r), float(s)) for r, s in zip(row, score) if r >= 0] for row, score in zip(rows, scores)]

    def audio_path(self, clip_id: str) -> Path | None:
        """The file of a clip of this index (never a path taken from a request), or None."""
        i = self.by_id.get(clip_id)
        if i is None or "audio" not in self.clips[i]:
            return None
        return self.dir / self.clips[i]["audio"]
