"""The BentoML service in three layers, on a model trained on the demo corpus (tests/conftest.py `packaged`):

1. SearchEngine, the service's logic, called directly;
2. the service through ``Service.to_asgi()`` and Starlette's test client: the HTTP contract and every
   bad input (oversized, too long, corrupt, not audio, wrong counts and lengths, bad k, pickle);
3. the served process (`cacara serve`, i.e. ``bentoml serve`` of the built Bento) on a free loopback
   port, called with ``bentoml.SyncHTTPClient``: vectors equal the CLI's, concurrent equals single.

The multilingual queries are the Spanish and Japanese captions of demo test-split clips with a
distinctive sound (a toilet flush, a crow, a glass of water), whose own clip must come back in the top
k of an index of all 94 clips. Those clips were picked from ranks measured on the `make run` model:
a check that the served path retrieves across languages, not a measure of how well.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import REPO, write_tone

pytestmark = pytest.mark.slow

#: (clip id, language, its caption in that language) queried against the whole demo index.
MULTILINGUAL = [("household-toilet", "es"), ("household-toilet", "ja"), ("animals-birds-crow", "es"),
                ("animals-birds-crow", "ja"), ("household-dishes-glass", "es")]
TOP_K = 5
#: Batching changes the order of float sums (tests/model/test_inference.py holds the same bound).
BATCHING_TOL = 1e-5


def _caption(packaged, clip_id: str, language: str) -> str:
    clip = next(c for c in packaged.clips if c.clip_id == clip_id)
    assert clip.split == "test", f"{clip_id} is not in the test split any more"
    return clip.captions[language][0]


@pytest.fixture(scope="module")
def engine(packaged):
    import bentoml

    from cacara.config import ServeSection
    from cacara.serving import SearchEngine

    return SearchEngine(bentoml.models.get(packaged.model_tag).path,
                        ServeSection.model_validate(packaged.params["serve"]), name=packaged.model_tag)


@pytest.fixture(scope="module")
def small_limits_engine(packaged):
    """The same model with tight limits, to reach each refusal with small inputs."""
    import bentoml

    from cacara.config import ServeSection
    from cacara.serving import SearchEngine

    limits = ServeSection.model_validate({**packaged.params["serve"], "max_upload_bytes": 200_000,
                                          "max_audio_seconds": 3.0, "max_texts": 3, "max_text_chars": 40,
                                          "max_k": 7})
    return SearchEngine(bentoml.models.get(packaged.model_tag).path, limits)


@pytest.fixture(scope="module")
def client(packaged, tmp_path_factory):
    """The service as an ASGI app in this process, with uploads spooled to a temporary folder of its own."""
    import tempfile

    from starlette.testclient import TestClient

    spool = tmp_path_factory.mktemp("spool")
    previous = tempfile.tempdir
    tempfile.tempdir = str(spool)
    os.environ["CACARA_BENTO_MODEL"] = packaged.model_tag
    import cacara.service as service

    service = importlib.reload(service)  # it resolves its model when imported
    with TestClient(service.CacaraSearch.to_asgi(), raise_server_exceptions=False) as c:
        c.spool = spool
        c.service = service
        yield c
    tempfile.tempdir = previous


def _upload(path: Path, content_type: str = "audio/wav") -> dict:
    return {"audio": (path.name, path.read_bytes(), content_type)}


def _files_under(*roots: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for root in roots for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------- 1. unit


@pytest.mark.parametrize("clip_id,language", MULTILINGUAL)
def test_a_query_in_another_language_finds_its_clip(engine, packaged, clip_id, language):
    hits = engine.search_text(_caption(packaged, clip_id, language), k=TOP_K)
    assert clip_id in [h.clip_id for h in hits], [h.to_json() for h in hits]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_query_by_example_finds_the_clip_itself(engine, packaged):
    from cacara import audio

    clip = next(c for c in packaged.clips if c.clip_id == "animals-birds-crow")
    wave = audio.decode(packaged.dataset / clip.audio_path, 16000).samples
    hits = engine.search_audio(wave, k=3)
    assert hits[0].clip_id == clip.clip_id and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_classify_ranks_labels_and_gives_a_distribution(engine, packaged):
    from cacara import audio

    clip = next(c for c in packaged.clips if c.clip_id == "household-toilet")
    wave = audio.decode(packaged.dataset / clip.audio_path, 16000).samples
    labels = ["una cisterna de inodoro", "a church bell", "鳥のさえずり"]
    rows = engine.classify(wave, labels)
    assert sorted(r["label"] for r in rows) == sorted(labels)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert sum(r["probability"] for r in rows) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("call,status,needle", [
    (lambda e: e.search_text("a dog", k=0), 400, "k must be between 1 and 7"),
    (lambda e: e.search_text("a dog", k=8), 400, "k must be between 1 and 7"),
    (lambda e: e.embed_texts([]), 400, "no texts"),
    (lambda e: e.embed_texts(["a", "b", "c", "d"]), 400, "4 texts, above the limit of 3"),
    (lambda e: e.embed_texts(["x" * 41]), 400, "41 characters"),
    (lambda e: e.embed_texts(["  "]), 400, "texts 0 is empty"),
    (lambda e: e.classify(np.zeros(16000, np.float32), ["a", "a"]), 400, "distinct"),
])
def test_engine_refuses_with_a_message(small_limits_engine, call, status, needle):
    from cacara.serving import RequestRefused

    with pytest.raises(RequestRefused, match=needle) as info:
        call(small_limits_engine)
    assert info.value.status == status


def test_engine_refuses_uploads_too_large_too_long_or_not_audio(small_limits_engine, tmp_path):
    from cacara.serving import RequestRefused

    cases = {
        "large.wav": (write_tone(tmp_path / "large.wav", seconds=8.0), 413, "above the limit of 200000"),
        "long.flac": (write_tone(tmp_path / "long.flac", seconds=4.0), 400, "4.0 s by its header, above the limit of 3 s"),
        "noise.wav": (tmp_path / "noise.wav", 400, "not usable audio"),
        "empty.wav": (tmp_path / "empty.wav", 400, "not usable audio"),
    }
    (tmp_path / "noise.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "empty.wav").write_bytes(b"")
    for name, (path, status, needle) in cases.items():
        with pytest.raises(RequestRefused, match=needle) as info:
            small_limits_engine.decode_upload(path, name)
        assert info.value.status == status, name
        assert name in str(info.value)


# ----------------------------------------------------------------------------------------------- 2. ASGI


def test_embed_text_returns_the_cli_vectors(client, packaged):
    from cacara.embed import Embedder

    texts = ["a dog barks", "un perro ladra", "犬が吠える"]
    r = client.post("/embed_text", json={"texts": texts})
    assert r.status_code == 200, r.text
    got = np.asarray(r.json(), dtype=np.float32)
    want = Embedder.load(packaged.model_dir).embed_texts(texts)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=BATCHING_TOL)


@pytest.mark.parametrize("name,sr,channels,subtype", [("mono16k.wav", 16000, 1, None), ("stereo44k.flac", 44100, 2, None),
                                                      ("mono22k.ogg", 22050, 1, "VORBIS"), ("stereo48k.mp3", 48000, 2, "MPEG_LAYER_III")])
def test_embed_audio_returns_one_vector_equal_to_the_cli(client, packaged, tmp_path, name, sr, channels, subtype):
    from cacara.embed import Embedder

    path = tmp_path / name
    t = np.arange(int(1.5 * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * 660 * t) * np.exp(-t)
    sf.write(str(path), np.stack([wave] * channels, axis=1) if channels > 1 else wave, sr, subtype=subtype)
    r = client.post("/embed_audio", files=_upload(path, "audio/mpeg" if name.endswith("mp3") else "audio/x-" + name[-3:]))
    assert r.status_code == 200, r.text
    vector = np.asarray(r.json(), dtype=np.float32)
    assert vector.ndim == 1, "one file, one vector"
    want = Embedder.load(packaged.model_dir).embed_audio_files([path])[0]
    np.testing.assert_allclose(vector, want, atol=BATCHING_TOL)


def test_search_answers_the_contract(client, packaged):
    query = _caption(packaged, "household-toilet", "es")
    r = client.post("/search", json={"query": query, "k": TOP_K})
    assert r.status_code == 200, r.text
    hits = r.json()
    assert len(hits) == TOP_K and all(set(h) == {"clip_id", "caption", "score"} for h in hits)
    assert "household-toilet" in [h["clip_id"] for h in hits]
    assert hits == sorted(hits, key=lambda h: -h["score"])
    # The page asks for the caption in the query's language when it knows it.
    r = client.post("/search", json={"query": query, "k": 1, "language": "es"})
    assert r.status_code == 200 and r.json()[0]["caption"] in {c.captions.get("es", [""])[0] for c in packaged.clips}


def test_uploads_need_no_particular_content_type_or_file_name(client, packaged, tmp_path):
    """curl sends application/octet-stream; a client may send any file name: the bytes decide."""
    clip = next(c for c in packaged.clips if c.clip_id == "animals-birds-crow")
    data = (packaged.dataset / clip.audio_path).read_bytes()
    for name, content_type in (("crow.flac", "application/octet-stream"), ("x" * 300 + ".flac", "audio/flac"),
                               ("../../etc/passwd", "audio/flac"), ("noext", "text/plain")):
        r = client.post("/embed_audio", files={"audio": (name, data, content_type)})
        assert r.status_code == 200, (name[:20], r.text[:200])
        assert len(r.json()) == 896 or len(r.json()) > 0
    assert not [p for p in client.spool.rglob("*") if p.is_file()]


def test_search_audio_and_classify_take_multipart(client, packaged):
    clip = next(c for c in packaged.clips if c.clip_id == "animals-birds-crow")
    path = packaged.dataset / clip.audio_path
    r = client.post("/search_audio", files=_upload(path, "audio/flac"), data={"k": "2"})
    assert r.status_code == 200, r.text
    assert r.json()[0]["clip_id"] == clip.clip_id
    labels = ["un cuervo", "un tren", "花火"]
    r = client.post("/classify", files=_upload(path, "audio/flac"), data={"labels": json.dumps(labels)})
    assert r.status_code == 200, r.text
    rows = r.json()
    assert sorted(row["label"] for row in rows) == sorted(labels) and {"label", "score"} <= set(rows[0])


def test_info_and_bentoml_routes(client, packaged):
    info = client.get("/info").json()
    assert info["model"] == packaged.model_tag and info["index_size"] == len(packaged.clips)
    assert info["data_md5"] == "0" * 32 and info["text_encoder"] == packaged.params["model"]["text_encoder"]
    assert info["quality_gate"]["passed"] is True
    # /metrics needs the Prometheus set-up `bentoml serve` makes: checked on the served process.
    for route in ("/livez", "/readyz", "/docs.json", "/docs", "/"):
        assert client.get(route).status_code == 200, route
    paths = client.get("/docs.json").json()["paths"]
    assert {"/embed_text", "/embed_audio", "/search", "/search_audio", "/classify"} <= set(paths)
    assert "CACARA audio search" in client.get("/").text


def test_clip_audio_is_served_by_id_only(client, packaged, engine):
    r = client.get("/clips/animals-birds-crow/audio")
    assert r.status_code == 200 and len(r.content) > 1000
    assert sf.info(io.BytesIO(r.content)).samplerate == 16000
    for bad in ("no-such-clip", "index.json", "clips.jsonl"):
        r = client.get(f"/clips/{bad}/audio")
        assert r.status_code == 404 and r.json() == {"error": "no such clip in the index"}, bad
    # The router matches no clip id holding a slash; nothing else reaches a file.
    for bad in ("..%2F..%2Fmanifest.jsonl", "%2Fetc%2Fpasswd", "animals-birds-crow%00", ".."):
        assert client.get(f"/clips/{bad}/audio").status_code == 404, bad
    for bad in ("../index.json", "/etc/passwd", "audio/x.flac", ""):
        assert engine.index.audio_path(bad) is None, bad


def test_batcher_batches_what_is_queued_and_fails_only_its_own_batch():
    import asyncio

    from cacara.serving import Batcher

    calls: list[list[int]] = []

    def double(items):
        calls.append(list(items))
        if -1 in items:
            raise ValueError("bad item")
        return [2 * i for i in items] if 99 not in items else [0]

    async def scenario():
        batcher = Batcher(double, max_batch_size=4)
        first = await asyncio.gather(*(batcher.submit(i) for i in range(6)))
        failed = await asyncio.gather(batcher.submit(-1), return_exceptions=True)
        short = await asyncio.gather(batcher.submit(99), batcher.submit(98), return_exceptions=True)
        after = await batcher.submit(5)
        return batcher, first, failed, short, after

    batcher, first, failed, short, after = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert first == [0, 2, 4, 6, 8, 10] and max(len(c) for c in calls[:2]) == 4, calls
    assert isinstance(failed[0], ValueError)
    assert all(isinstance(r, RuntimeError) for r in short), "a short answer fails its batch, nobody waits"
    assert after == 10 and batcher.batches[-1] == 1


def test_batcher_prepares_in_the_batch_thread_and_a_refused_item_fails_only_itself():
    import asyncio
    import threading

    from cacara.serving import Batcher

    threads: dict[str, set[int]] = {"prepare": set(), "fn": set()}

    def prepare(item):
        threads["prepare"].add(threading.get_ident())
        if item == "bad":
            raise ValueError("not audio")
        return len(item)

    def lengths(items):
        threads["fn"].add(threading.get_ident())
        return [10 * n for n in items]

    async def scenario():
        batcher = Batcher(lengths, max_batch_size=8, prepare=prepare)
        got = await asyncio.gather(*(batcher.submit(x) for x in ["a", "bad", "ccc", "dd"]), return_exceptions=True)
        return batcher, got, threading.get_ident()

    batcher, got, loop_thread = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert got[0] == 10 and got[2] == 30 and got[3] == 20, got
    assert isinstance(got[1], ValueError) and "not audio" in str(got[1])
    assert batcher.batches == [4], "the refused item was queued with the others, and failed alone"
    assert threads["prepare"] == threads["fn"] and loop_thread not in threads["fn"], "one thread, off the loop"


def test_max_batch_size_1_turns_batching_off(packaged, tmp_path, monkeypatch):
    """BentoML refuses a batchable API with max_batch_size 1: the service declares embed_text unbatched."""
    import bentoml
    import yaml

    from cacara.config import ServeSection

    limits = ServeSection.model_validate({**packaged.params["serve"], "max_batch_size": 1})
    assert not limits.batching and limits.max_texts > 1, "without batching, max_texts is not bounded by a batch"
    source = Path(bentoml.models.get(packaged.model_tag).path)
    name, version = packaged.model_tag.split(":")
    home = tmp_path / "home"
    shutil.copytree(source, home / "models" / name / version)
    info_file = home / "models" / name / version / "model.yaml"
    info = yaml.safe_load(info_file.read_text())
    info["metadata"]["serve"]["max_batch_size"] = 1
    info_file.write_text(yaml.safe_dump(info, sort_keys=False, allow_unicode=True))
    monkeypatch.setenv("BENTOML_HOME", str(home))
    monkeypatch.setenv("CACARA_BENTO_MODEL", packaged.model_tag)
    code = f"""
import json, sys
from starlette.testclient import TestClient
import cacara.service as s
assert not s.CacaraSearch.apis["embed_text"].batchable
with TestClient(s.CacaraSearch.to_asgi()) as c:
    r = c.post("/embed_text", json={{"texts": ["a dog barks", "un perro ladra"]}})
    info = c.get("/info").json()
print(json.dumps([r.status_code, len(r.json()), info["limits"]["max_batch_size"]]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [200, 2, 1]


def test_traffic_limits_come_from_the_packaged_settings(client, packaged):
    config = client.service.CacaraSearch.config
    assert config["traffic"]["timeout"] == packaged.params["serve"]["timeout_s"]
    assert config["traffic"]["max_concurrency"] == packaged.params["serve"]["max_concurrency"]


def _bad_requests(packaged, tmp_path: Path) -> list[tuple[str, str, dict, int, str]]:
    """(name, route, request kwargs, expected status, text the message must hold)."""
    serve = packaged.params["serve"]
    long_clip = write_tone(tmp_path / "long.wav", seconds=serve["max_audio_seconds"] + 1, sr=8000)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF" + np.random.default_rng(1).bytes(4000))
    text_file = tmp_path / "notes.wav"
    text_file.write_text("this is not audio\n" * 50)
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    good = write_tone(tmp_path / "good.wav", seconds=1.0)
    big = b"0" * (serve["max_upload_bytes"] + 1)
    # Small files that decode to far more than they weigh: refused from the header, before decoding.
    ten_minutes = tmp_path / "ten_minutes.flac"
    with sf.SoundFile(str(ten_minutes), "w", samplerate=48000, channels=2, format="FLAC") as f:
        block = np.zeros((48000 * 10, 2), dtype=np.int16)
        for _ in range(60):
            f.write(block)
    assert ten_minutes.stat().st_size < serve["max_upload_bytes"]
    wide = tmp_path / "wide.wav"
    sf.write(str(wide), np.zeros((96000, 16), dtype=np.int16), 192000, subtype="PCM_16")
    return [
        ("upload above the size limit", "/embed_audio", {"files": {"audio": ("big.wav", big, "audio/wav")}}, 413, "above the limit"),
        ("chunked body above the size limit", "/embed_text",
         {"content": iter([b'{"texts": ["' + b"a" * 1_000_000] * (serve["max_upload_bytes"] // 1_000_000 + 2)),
          "headers": {"content-type": "application/json"}}, 413, "above the limit"),
        ("audio longer than allowed", "/embed_audio", {"files": _upload(long_clip)}, 400, "by its header, above the limit of"),
        ("corrupt audio", "/embed_audio", {"files": _upload(corrupt)}, 400, "not usable audio"),
        ("text file named .wav", "/search_audio", {"files": _upload(text_file)}, 400, "not usable audio"),
        ("empty upload", "/classify", {"files": _upload(empty, "audio/flac"), "data": {"labels": '["a"]'}}, 400, "not usable audio"),
        ("audio field sent as a URL", "/embed_audio", {"data": {"audio": "https://example.com/a.wav"}}, 400,
         "must be an uploaded file"),
        ("header claims ten minutes", "/embed_audio", {"files": _upload(ten_minutes, "audio/flac")}, 400, "600.0 s by its header"),
        ("many channels at a high rate", "/search_audio", {"files": _upload(wide)}, 400, "16 channels at 192000 Hz"),
        ("k as a float", "/search", {"json": {"query": "a dog", "k": 2.0}}, 400, "k"),
        ("k as a boolean", "/search", {"json": {"query": "a dog", "k": True}}, 400, "k"),
        ("blank text", "/embed_text", {"json": {"texts": ["a dog", "   "]}}, 400, "texts"),
        ("no texts", "/embed_text", {"json": {"texts": []}}, 400, "texts"),
        ("too many texts", "/embed_text", {"json": {"texts": ["a"] * (serve["max_texts"] + 1)}}, 400, "texts"),
        ("text too long", "/embed_text", {"json": {"texts": ["a" * (serve["max_text_chars"] + 1)]}}, 400, "texts"),
        ("texts not strings", "/embed_text", {"json": {"texts": [{"x": 1}]}}, 400, "texts"),
        ("empty query", "/search", {"json": {"query": "", "k": 3}}, 400, "query"),
        ("query too long", "/search", {"json": {"query": "a" * (serve["max_text_chars"] + 1)}}, 400, "query"),
        ("k zero", "/search", {"json": {"query": "a dog", "k": 0}}, 400, "k"),
        ("k above the limit", "/search", {"json": {"query": "a dog", "k": serve["max_k"] + 1}}, 400, "k"),
        ("k not a number", "/search", {"json": {"query": "a dog", "k": "lots"}}, 400, "k"),
        ("bad language code", "/search", {"json": {"query": "a dog", "language": "../../etc"}}, 400, "language"),
        ("malformed JSON", "/search", {"content": b'{"query": "a dog", ', "headers": {"content-type": "application/json"}}, 400, ""),
        ("too many labels", "/classify",
         {"files": _upload(good), "data": {"labels": json.dumps([f"l{i}" for i in range(serve["max_texts"] + 1)])}}, 400, "labels"),
        ("repeated labels", "/classify", {"files": _upload(good), "data": {"labels": '["a dog", "a dog"]'}}, 400, "distinct"),
        ("no audio field", "/embed_audio", {"data": {"sound": "x"}}, 400, "audio"),
    ]


def test_every_bad_request_gets_a_clear_4xx_and_writes_nothing(client, packaged, tmp_path):
    watched = (packaged.home, packaged.package_dir, REPO / "cacara", REPO / "components")
    before = _files_under(*watched)
    failures = []
    for name, route, kwargs, status, needle in _bad_requests(packaged, tmp_path):
        r = client.post(route, **kwargs)
        if r.status_code != status or needle.lower() not in r.text.lower():
            failures.append((name, r.status_code, r.text[:300]))
    assert not failures, failures
    assert client.get("/readyz").status_code == 200
    assert _files_under(*watched) == before, "a request wrote outside its temporary folder"
    assert not [p for p in client.spool.rglob("*") if p.is_file()], "an upload was left behind"


@pytest.mark.parametrize("route", ["/embed_text", "/embed_audio", "/search", "/search_audio", "/classify"])
def test_pickle_is_refused_on_every_endpoint(client, route):
    import pickle

    r = client.post(route, content=pickle.dumps({"texts": ["a"]}), headers={"content-type": "application/vnd.bentoml+pickle"})
    assert r.status_code == 415, (route, r.status_code, r.text[:200])


# ------------------------------------------------------------------------------------- 3. served process


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cacara.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_served_process_answers_like_the_cli(served, packaged, tmp_path):
    import bentoml

    texts = ["el inodoro", "カラスが鳴く", "a church bell"]
    files = [packaged.dataset / c.audio_path for c in packaged.clips[:3]]
    assert _cli("embed-text", "--model", str(packaged.model_dir), "--out", str(tmp_path / "t.npy"), *texts).returncode == 0
    assert _cli("embed-audio", "--model", str(packaged.model_dir), "--out", str(tmp_path / "a.npy"),
                *map(str, files)).returncode == 0
    with bentoml.SyncHTTPClient(served.url, timeout=120) as c:
        assert c.is_ready()
        np.testing.assert_allclose(np.asarray(c.embed_text(texts=texts), np.float32), np.load(tmp_path / "t.npy"),
                                   atol=BATCHING_TOL)
        for i, f in enumerate(files):
            np.testing.assert_allclose(np.asarray(c.embed_audio(audio=f), np.float32), np.load(tmp_path / "a.npy")[i],
                                       atol=BATCHING_TOL)
        for clip_id, language in MULTILINGUAL[:2]:
            hits = c.search(query=_caption(packaged, clip_id, language), k=TOP_K)
            assert clip_id in [h["clip_id"] for h in hits]


def test_concurrent_requests_give_the_single_request_vectors(served, packaged):
    import bentoml

    files = [packaged.dataset / c.audio_path for c in packaged.clips[:12]]
    texts = [c.captions["en"][0] for c in packaged.clips[:24]]
    with bentoml.SyncHTTPClient(served.url, timeout=120) as c:
        single_audio = [np.asarray(c.embed_audio(audio=f), np.float32) for f in files]
        single_text = [np.asarray(c.embed_text(texts=[t]), np.float32)[0] for t in texts]

    def audio(i):
        with bentoml.SyncHTTPClient(served.url, timeout=120) as c:
            return i, np.asarray(c.embed_audio(audio=files[i]), np.float32)

    def text(i):
        with bentoml.SyncHTTPClient(served.url, timeout=120) as c:
            return i, np.asarray(c.embed_text(texts=[texts[i]]), np.float32)[0]

    with ThreadPoolExecutor(16) as pool:
        audio_rows = list(pool.map(audio, list(range(len(files))) * 2))
        text_rows = list(pool.map(text, list(range(len(texts))) * 2))
    for i, row in audio_rows:
        np.testing.assert_allclose(row, single_audio[i], atol=BATCHING_TOL)
    for i, row in text_rows:
        np.testing.assert_allclose(row, single_text[i], atol=BATCHING_TOL)


def test_a_bad_request_never_fails_the_good_ones_batched_with_it(served):
    import urllib.error
    import urllib.request

    def post(texts):
        request = urllib.request.Request(served.url + "/embed_text", data=json.dumps({"texts": texts}).encode(),
                                         headers={"content-type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    bodies = [["   "] if i % 4 == 0 else [f"a dog barks {i}"] for i in range(48)]
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(post, bodies))
    assert [s for s, b in zip(statuses, bodies) if b != ["   "]] == [200] * 36
    assert [s for s, b in zip(statuses, bodies) if b == ["   "]] == [400] * 12


def test_served_process_logs_audio_requests_for_drift_checks_without_audio_or_text(served, packaged):
    """One record per audio request (embed_audio, search_audio, classify), none for text requests; the
    records hold the features and the vector the client got, and `read_log` takes them."""
    import urllib.request

    from components.drift import read_log

    def lines() -> list[dict]:
        return [json.loads(l) for f in sorted(served.drift_log.glob("requests-*")) for l in f.read_text().splitlines()]

    with urllib.request.urlopen(served.url + "/info", timeout=30) as r:
        assert Path(json.load(r)["drift_log"]).parent == served.drift_log
    before = len(lines()) if served.drift_log.exists() else 0
    clip = packaged.dataset / packaged.clips[0].audio_path
    import bentoml

    with bentoml.SyncHTTPClient(served.url, timeout=120) as client:
        vector = np.asarray(client.embed_audio(audio=clip))
        client.search_audio(audio=clip, k=3)
        client.classify(audio=clip, labels=["a dog", "un perro"])
        client.embed_text(texts=["a private sentence nobody may log"])
        client.search(query="another private query", k=3)
    import time

    deadline = time.monotonic() + 30  # the log's own thread writes them, after the answers
    while len(lines()) < before + 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    records = lines()[before:]
    assert [r["endpoint"] for r in records] == ["embed_audio", "search_audio", "classify"]
    np.testing.assert_allclose(records[0]["embedding"], vector, atol=1e-6)
    text = "\n".join(f.read_text() for f in served.drift_log.glob("requests-*"))
    assert "private" not in text and "perro" not in text and packaged.clips[0].clip_id not in text
    assert records[0]["orig_sample_rate"] == 16000 and records[0]["duration_s"] > 0
    assert len(read_log(served.drift_log).features) >= 3


def test_a_failing_drift_log_never_fails_a_request_nor_the_start(client, engine, packaged, monkeypatch, tmp_path):
    """A full or lost log volume costs records, counted in /info, never an answer; an unwritable folder at
    start-up costs the log, not the service."""
    from cacara import audio

    class FullDisk:
        path = tmp_path / "requests-x.jsonl"

        def append(self, *args):
            raise OSError(28, "No space left on device")

    clip = audio.decode(packaged.dataset / packaged.clips[0].audio_path, 16000)
    saved = engine.drift_log
    engine.drift_log = FullDisk()
    try:
        rows = engine.embed_waves([clip, clip])
        assert rows.shape == (2, engine.embedder.dim) and engine.drift_log_errors >= 2
        assert engine.info()["drift_log_errors"] == engine.drift_log_errors
    finally:
        engine.drift_log = saved
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(client.service.DRIFT_LOG_ENV, str(blocked / "logs"))
    assert client.service._drift_log(bentoml_model_path(packaged)) is None


def bentoml_model_path(packaged) -> str:
    import bentoml

    return bentoml.models.get(packaged.model_tag).path


def test_served_process_refuses_bad_input_and_stays_ready(served, tmp_path):
    import urllib.error
    import urllib.request

    corrupt = tmp_path / "bad.wav"
    corrupt.write_bytes(b"RIFF\x00\x00junk" * 100)
    import bentoml

    with bentoml.SyncHTTPClient(served.url, timeout=60) as c:
        with pytest.raises(bentoml.exceptions.BentoMLException) as info:
            c.embed_audio(audio=corrupt)
        assert "not usable audio" in str(info.value)
    request = urllib.request.Request(served.url + "/search", data=b"\x80\x03}q\x00.", method="POST",
                                     headers={"content-type": "application/vnd.bentoml+pickle"})
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(request, timeout=30)
    assert http.value.code == 415
    with urllib.request.urlopen(served.url + "/readyz", timeout=10) as r:
        assert r.status == 200
    with urllib.request.urlopen(served.url + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert r.status == 200 and "bentoml_service_request_total" in metrics and 'endpoint="/embed_audio"' in metrics


def test_fuzzed_requests_get_no_5xx_and_the_service_stays_ready(served, tmp_path):
    """schemathesis against the running service's own OpenAPI schema, on loopback, bounded: the long run
    (over 1000 requests) is benchmarks/fuzz_service.py."""
    from benchmarks.fuzz_service import fuzz

    result = fuzz(served.url, tmp_path, max_examples=3, seed=1, max_time_s=40, timeout_s=300)
    assert result.requests >= 50, result.output_tail
    assert result.five_xx == 0, result.server_errors
    assert result.exit_code == 0, result.output_tail
    assert result.ready_after and result.search_after
    assert {"POST /search", "POST /embed_text", "POST /embed_audio"} <= set(result.by_operation), result.by_operation
