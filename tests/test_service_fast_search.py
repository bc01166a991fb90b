"""JSON /search answered by the fast path and by the FastAPI route: the same answers, errors and metrics."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from bench.common import random_gated_bundle
from embedder.bundle import load_bundle
from service.api.app import create_app
from service.config import load_settings
from service.runtime import Runtime
from service.store import NewItem, Store
from tests.conftest import write_config

KEY = "fast-key-123"
DIM = 128  # the embedding size of bench.common.random_gated_bundle's model (checked in the fixture)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    bundle = random_gated_bundle(root / "bundle")
    assert load_bundle(bundle).model_config.out_dim == DIM
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((300, DIM)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    with Store(root / "store").open_or_create("c", load_bundle(bundle).id, DIM) as collection:
        collection.add_many(
            [
                NewItem(sha256=f"{i:064x}", vector=v, name=f"item{i}", label="odd" if i % 2 else "even")
                for i, v in enumerate(xb)
            ]
        )
    rt = Runtime(load_settings(write_config(root / "lookalike.toml", root / "store", {"c": bundle}, (KEY,))))
    rt.load()
    yield rt
    rt.close()


class Client:
    """Requests to the app in this process. No lifespan runs: no parser pool, which JSON never needs."""

    def __init__(self, app) -> None:
        self.app = app

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.request(method, path, **kwargs)

        return asyncio.run(go())

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.request("POST", path, **kwargs)


@pytest.fixture(scope="module")
def clients(runtime):
    return Client(create_app(runtime)), Client(create_app(runtime, fast_json_search=False))


def _both(clients, body: object, **kwargs) -> tuple:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    fast, route = (c.post("/search", content=content, headers=headers, **kwargs) for c in clients)
    return fast, route


def _without_timing(r) -> dict:
    body = r.json()
    body.pop("took_ms", None)
    return body


QUERIES = [
    {"vector": list(np.linspace(-1, 1, DIM))},
    {"collection": "c", "vector": list(np.cos(np.arange(DIM))), "k": 25},
    {"vector": list(np.sin(np.arange(DIM))), "k": 7, "label": "even"},
    {"vector": list(np.sin(np.arange(DIM))), "k": 50, "score_threshold": 0.05},
    {"vector": list(np.sin(np.arange(DIM))), "label": "no such label"},
    {"id": 17, "k": 5},
    {"id": 17, "k": 5, "label": "odd"},
]


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: ",".join(q))
def test_same_answers(clients, query):
    fast, route = _both(clients, query)
    assert fast.status_code == route.status_code == 200, (fast.text, route.text)
    assert fast.headers["content-type"] == route.headers["content-type"] == "application/json"
    assert _without_timing(fast) == _without_timing(route)
    assert fast.json()["took_ms"] >= 0


def test_results_are_the_store_s(clients, runtime):
    fast, _ = _both(clients, {"id": 17, "k": 3})
    hits = fast.json()["results"]
    assert hits[0]["id"] == 17 and hits[0]["name"] == "item16" and hits[0]["label"] == "even"
    assert pytest.approx(hits[0]["score"], abs=1e-5) == 1.0
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


BAD = [
    (b"{not json", 400, "bad_request"),
    (b"", 400, "bad_request"),
    (b"[1, 2]", 400, "bad_request"),
    ({"k": 3}, 400, "bad_request"),
    ({"vector": [1.0, 2.0]}, 400, "bad_request"),
    ({"vector": [0.0] * DIM}, 400, "bad_request"),
    ({"vector": [1.0] * DIM, "id": 3}, 400, "bad_request"),
    ({"vector": [1.0] * DIM, "k": 0}, 400, "bad_request"),
    ({"vector": [1.0] * DIM, "k": 100_000}, 400, "bad_request"),
    ({"vector": [1.0] * DIM, "k": "many"}, 400, "bad_request"),
    ({"vector": [1.0] * DIM, "collection": "nope"}, 404, "not_found"),
    ({"id": 999_999}, 404, "not_found"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD, ids=lambda x: str(x)[:30])
def test_same_errors(clients, body, status, code):
    fast, route = _both(clients, body)
    assert fast.status_code == route.status_code == status, (fast.text, route.text)
    assert fast.json() == route.json() and fast.json()["code"] == code and fast.json()["message"]


def test_read_key_when_required(clients, runtime, monkeypatch):
    monkeypatch.setattr(runtime.settings, "require_key_for_reads", True)
    query = {"vector": [1.0] * DIM}
    for headers, status in (({}, 401), ({"X-API-Key": "wrong-key-9"}, 403), ({"X-API-Key": KEY}, 200)):
        fast, route = _both(clients, query, headers=headers)
        assert fast.status_code == route.status_code == status
        assert fast.headers.get("www-authenticate") == route.headers.get("www-authenticate")
    fast, _ = _both(clients, query, headers={"Authorization": f"Bearer {KEY}"})
    assert fast.status_code == 200


def test_oversized_body_is_refused_before_parsing(clients, runtime):
    limit = runtime.settings.max_upload_bytes
    fast, route = _both(clients, b'{"vector": [' + b"1.0, " * (limit // 4) + b"1.0]}")
    assert fast.status_code == route.status_code == 413 and fast.json()["code"] == "too_large"


def test_other_requests_pass_through(clients):
    fast, route = clients
    assert fast.get("/search").status_code == route.get("/search").status_code == 405
    wrong = fast.post("/search", content=b"x", headers={"content-type": "text/plain"})
    assert wrong.status_code == 415 and wrong.json()["code"] == "unsupported_media_type"
    no_file = fast.post("/search", files={"other": ("x", b"1")}, data={"collection": "c"})
    assert no_file.status_code == 400 and no_file.json()["code"] == "bad_request"


def test_metrics_and_docs_still_describe_search(clients):
    fast, _ = clients
    fast.post("/search", json={"vector": [1.0] * DIM})
    fast.post("/search", json={"vector": [1.0]})
    metrics = fast.get("/metrics").text
    assert 'lookalike_requests_total{method="POST",route="/search",status="200"}' in metrics
    assert 'lookalike_requests_total{method="POST",route="/search",status="400"}' in metrics
    body = fast.get("/openapi.json").json()["paths"]["/search"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert fast.get("/docs").status_code == 200


def test_large_index_searches_run_on_one_openmp_thread_with_the_same_answers(clients, runtime, monkeypatch):
    """Indexes above INLINE_SEARCH_MAX are searched on a worker thread. omp_set_num_threads is per
    thread, so that worker must set it itself (with OpenMP's default a 100k search took 3x longer)."""
    import threading

    import faiss

    default: list[int] = []
    t = threading.Thread(target=lambda: default.append(faiss.omp_get_max_threads()))
    t.start()
    t.join()
    if default[0] == 1:
        pytest.skip("one core: a fresh thread already gets one OpenMP thread, nothing to tell apart")
    assert asyncio.run(runtime.search_in_thread(faiss.omp_get_max_threads)) == 1
    inline = _both(clients, QUERIES[1])[0]
    monkeypatch.setattr(runtime.served["c"], "inline_search", False)
    threaded = _both(clients, QUERIES[1])[0]
    assert threaded.status_code == inline.status_code == 200
    assert _without_timing(threaded) == _without_timing(inline)
