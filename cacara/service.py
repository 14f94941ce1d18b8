"""The BentoML service: multilingual audio search over a packaged CACARA model.

A thin HTTP shell over cacara/serving.py. The model comes from the BentoML model store
(``$CACARA_BENTO_MODEL``, default the latest ``cacara-audio-search``), and so do the limits: they were
recorded when the model was packaged, so a deployed Bento behaves as it was built.

    POST /embed_text     {"texts": [...]}                 -> [[...], ...]       (adaptive batching)
    POST /embed_audio    multipart audio=FILE               -> [...]             (adaptive batching)
    POST /search         {"query": "...", "k": 5}          -> [{"clip_id", "caption", "score"}, ...]
    POST /search_audio   multipart audio=FILE, k            -> the same, query by example
    POST /classify       multipart audio=FILE, labels=[...] -> [{"label", "score", "probability"}, ...]
    GET  /info, GET / (search page), GET /clips/{id}/audio, GET /docs (OpenAPI page)

BentoML 1.4 has no request-body limit, so ``RequestGuard`` answers 413 before an oversized body is read
(the ingress caps it too), and 400 for a multipart body that cannot be parsed (BentoML would answer 500:
found by fuzzing, benchmarks/fuzz_service.py). The pickle content type is refused by BentoML itself on
every endpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
import orjson
from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, Field
from starlette.responses import Response

from cacara.config import ServeSection
from cacara.serving import Batcher, RequestRefused, SearchEngine

log = logging.getLogger(__name__)

MODEL_ENV = "CACARA_BENTO_MODEL"
DRIFT_LOG_ENV = "CACARA_DRIFT_LOG_DIR"
DEFAULT_MODEL = "cacara-audio-search:latest"
MODEL_TAG = os.environ.get(MODEL_ENV, DEFAULT_MODEL)

_stored = bentoml.models.get(MODEL_TAG)
LIMITS = ServeSection.model_validate(_stored.info.metadata["serve"])

# Checked per request, before requests are batched together: one client's bad input never fails another's.
Text = Annotated[str, Field(min_length=1, max_length=LIMITS.max_text_chars, pattern=r"\S")]
Texts = Annotated[list[Text], Field(min_length=1, max_length=LIMITS.max_texts)]
K = Annotated[int, Field(ge=1, le=LIMITS.max_k)]
KJson = Annotated[int, Field(ge=1, le=LIMITS.max_k, strict=True)]  # JSON: 2.0 and true are not a k
#: Any content type: the bytes decide (curl sends application/octet-stream); undecodable bytes get 400.
Audio = Path
Language = Annotated[str, Field(pattern=r"^[a-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")]


class SearchHit(BaseModel):
    clip_id: str
    caption: str
    score: float


class LabelScore(BaseModel):
    label: str
    score: float
    probability: float


def _uploads_only() -> None:
    """BentoML 1.4 fetches a multipart file field sent as a string as a URL, with no size limit, from the
    server (``MultipartSerde.ensure_file``): refuse that, and replace the client's file name (BentoML
    makes it the temporary file's suffix: a long one fails the request with an OSError)."""
    import re

    from _bentoml_impl.serde import MultipartSerde
    from bentoml.exceptions import BadInput
    from starlette.datastructures import UploadFile

    async def ensure_file(obj):
        if not isinstance(obj, UploadFile):
            raise BadInput("audio must be an uploaded file (multipart), not a URL or text")
        suffix = re.sub(r"[^A-Za-z0-9.]", "", Path(obj.filename or "").suffix)[:10]
        obj.filename = "upload" + suffix
        return obj

    MultipartSerde.ensure_file = staticmethod(ensure_file)


_uploads_only()


class Refused(BentoMLException):
    """RequestRefused as BentoML answers it: the status and the message."""

    def __init__(self, exc: RequestRefused):
        from http import HTTPStatus

        super().__init__(str(exc), error_code=HTTPStatus(exc.status))


class RequestGuard:
    """ASGI middleware, before BentoML sees a request: 413 for a body above the limit (by Content-Length
    before reading it, by counting for bodies sent without one), and 400 for a multipart body without a
    boundary or that does not parse.

    Why the multipart check: BentoML parses forms inside its endpoint wrapper, which turns Starlette's own
    400 for a malformed form into a 500. A multipart body is therefore read here (it is bounded by the
    limit, and BentoML reads it whole anyway), parsed with Starlette's parser, and replayed to the app.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)  # the first of repeated headers, as Starlette and BentoML read them
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return await _refuse(send, 400, f"Content-Length {length[:40]!r} is not a number")
        if length is not None and int(length) > self.max_bytes:
            return await _refuse(send, 413, f"request body of {length} bytes, above the limit of {self.max_bytes}")
        if scope.get("method") == "POST" and _is_multipart(headers.get("content-type", "")):
            body = await self._read(receive)
            if body is _GONE:
                return None  # the client left mid-body: nothing to answer, nothing to run
            if body is None:
                return await _refuse(send, 413, f"request body above the limit of {self.max_bytes} bytes")
            problem = await _multipart_problem(scope, body)
            if problem:
                return await _refuse(send, 400, f"malformed multipart/form-data body: {problem}")
            receive = _replay(body, receive)
        seen, too_large, started = 0, False, False

        async def counting_receive():
            # Past the limit the app is told the client left, so it stops reading; its answer is
            # dropped below and the 413 sent instead.
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if too_large:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            await _refuse(send, 413, f"request body above the limit of {self.max_bytes} bytes")

    async def _read(self, receive) -> bytes | object | None:
        """The whole body; None past the limit, _GONE when the client disconnected before the end."""
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _GONE
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)


_GONE = object()


def _is_multipart(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


async def _multipart_problem(scope, body: bytes) -> str | None:
    """What Starlette's form parser (the one BentoML uses) says is wrong with ``body``, or None."""
    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body
        yield b""

    try:
        form = await MultiPartParser(Headers(scope=scope), stream()).parse()
    except MultiPartException as exc:
        return exc.message
    await form.close()
    return None


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _page_app():
    """The search page, the clips' audio (only clips of the index, by id) and /info, as a Starlette app
    mounted at / (BentoML's own routes and APIs match first)."""
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.routing import Route

    page = (Path(__file__).parent / "static" / "search.html").read_text(encoding="utf-8")

    def engine() -> SearchEngine:
        return bentoml.get_current_service().engine

    async def index(_request):
        return HTMLResponse(page)

    async def info(_request):
        service = bentoml.get_current_service()
        return JSONResponse({**service.engine.info(), "recent_audio_batches": service.audio_batches.batches[-20:]})

    async def clip_audio(request):
        path = engine().index.audio_path(request.path_params["clip_id"])
        if path is None:
            return JSONResponse({"error": "no such clip in the index"}, status_code=404)
        return FileResponse(path, media_type="audio/flac" if path.suffix == ".flac" else "audio/wav")

    async def docs(_request):
        import _bentoml_impl.server as bentoml_server

        return FileResponse(Path(bentoml_server.__file__).parent / "main-openapi.html")

    return Starlette(routes=[Route("/", index), Route("/info", info), Route("/docs", docs),
                             Route("/clips/{clip_id:str}/audio", clip_audio)])


def _drift_log(root: str):
    """The request log ``cacara drift`` reads, in ``$CACARA_DRIFT_LOG_DIR`` (off when unset), measured as the
    packaged drift reference was."""
    folder = os.environ.get(DRIFT_LOG_ENV, "").strip()
    if not folder:
        return None
    from components.drift import DriftLog, model_sha, profile_settings
    from components.package import DRIFT_REFERENCE

    reference = Path(root) / DRIFT_REFERENCE
    if not reference.is_dir():
        log.warning("%s is set but the packaged model has no drift reference: no request log", DRIFT_LOG_ENV)
        return None
    try:
        settings = profile_settings(reference)
        drift_log = DriftLog(folder, LIMITS.drift_log_max_bytes, LIMITS.drift_log_backups,
                             settings["silence_rms_dbfs"], settings["clip_level"], model=model_sha(Path(root) / "model"))
    except Exception as exc:  # noqa: BLE001  an unwritable volume costs the log, never the service
        log.warning("no request log in %s: %s; serving without it", folder, exc)
        return None
    log.info("logging audio requests' drift features to %s", drift_log.path)
    return drift_log


@bentoml.asgi_app(_page_app(), path="/")
@bentoml.service(name="cacara", traffic={"timeout": LIMITS.timeout_s, "max_concurrency": LIMITS.max_concurrency},
                 resources={"cpu": "2"}, workers=1)
class CacaraSearch:
    packaged = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        self.engine = SearchEngine(self.packaged.path, LIMITS, name=str(_stored.tag),
                                   drift_log=_drift_log(self.packaged.path))
        self.audio_batches = Batcher(self.engine.embed_waves, LIMITS.max_batch_size, prepare=self.engine.decode_upload)
        self.engine.embed_texts(["warm-up"])  # the text towers load lazily: not on the first user's request
        log.info("serving %s: %d clips", MODEL_TAG, len(self.engine.index))

    # BentoML refuses a batchable API with max_batch_size 1: there, batching is off (ServeSection.batching).
    @bentoml.api(**({"batchable": True, "max_batch_size": LIMITS.max_batch_size,
                     "max_latency_ms": LIMITS.max_latency_ms} if LIMITS.batching else {}))
    def embed_text(self, texts: Texts) -> np.ndarray:
        return self.engine.embedder.embed_texts(texts)  # each request's texts were validated on their own

    @bentoml.api
    async def embed_audio(self, audio: Audio) -> np.ndarray:
        """One uploaded audio file (any format soundfile reads, any rate) -> its embedding, a JSON array."""
        # Decoded and embedded in one batch thread. The vector is written by orjson: BentoML's own
        # serialisation of 896 floats takes 0.6 ms, 4% of a 10-s clip's time; the body is the same JSON array
        # (the annotation keeps the OpenAPI schema; over HTTP clients get that array, in-process a Response).
        try:
            vector = await self.audio_batches.submit(audio)
        except RequestRefused as exc:
            raise Refused(exc) from None
        return Response(orjson.dumps(np.asarray(vector, dtype=np.float32), option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json")

    @bentoml.api
    async def search(self, query: Text, k: KJson = 5, language: Language | None = None) -> list[SearchHit]:
        hits = await self._off_loop(self.engine.search_text, query, k, language)
        return [SearchHit(**h.to_json()) for h in hits]

    @bentoml.api
    async def search_audio(self, audio: Audio, k: K = 5) -> list[SearchHit]:
        hits = await self._off_loop(self.engine.search_audio, await self._decode(audio), k)
        return [SearchHit(**h.to_json()) for h in hits]

    @bentoml.api
    async def classify(self, audio: Audio, labels: Texts, language: Language | None = None) -> list[LabelScore]:
        rows = await self._off_loop(self.engine.classify, await self._decode(audio), labels, language)
        return [LabelScore(**row) for row in rows]

    async def _decode(self, audio: Path):  # -> cacara.audio.DecodedAudio
        return await self._off_loop(self.engine.decode_upload, audio)

    @staticmethod
    async def _off_loop(fn, *args: Any):
        """Decoding and embedding run in a thread: the event loop keeps answering (probes, other requests)."""
        try:
            return await asyncio.to_thread(fn, *args)
        except RequestRefused as exc:
            raise Refused(exc) from None


CacaraSearch.add_asgi_middleware(RequestGuard, max_bytes=LIMITS.max_upload_bytes)
