"""The real server on loopback: index, search, writes with keys, hostile uploads, the gate at start."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from bench.common import random_gated_bundle
from embedder.bundle import load_bundle, save_bundle
from embedder.inputs import InputSpec
from service.launch import LOOKALIKE, serving
from tests.conftest import image_bytes, png_bomb_bytes, run_cli, write_config

pytestmark = pytest.mark.slow
KEY = {"X-API-Key": "e2e-key-123"}


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory) -> Path:
    """An image model with precise BN statistics: it passes the gate without any training."""
    return random_gated_bundle(
        tmp_path_factory.mktemp("img") / "bundle", spec=InputSpec.for_modality("image")
    )


def _search_file(url: str, path: Path, **fields: object) -> httpx.Response:
    with path.open("rb") as f:
        return httpx.post(
            f"{url}/search",
            files={"file": (path.name, f)},
            data={"collection": "exe", **{k: str(v) for k, v in fields.items()}},
            timeout=60,
        )


def _count(url: str, name: str) -> int:
    cols = httpx.get(f"{url}/collections", timeout=10).json()["collections"]
    return next(c["count"] for c in cols if c["name"] == name)


def test_index_search_and_writes(exec_bundle, family_split, tmp_path):
    manifest, _, queries = family_split
    store = tmp_path / "store"
    config = write_config(tmp_path / "lookalike.toml", store, {"exe": exec_bundle})
    with serving(config) as url:
        assert _count(url, "exe") == 0
        # The batch job writes while the server runs; the server follows the store without a restart.
        run_cli("index", "--store", store, "--collection", "exe", "--model", exec_bundle, "--data", manifest)
        expected = sum(1 for _ in manifest.open()) - 1
        deadline = time.monotonic() + 15
        while _count(url, "exe") < expected and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _count(url, "exe") == expected
        hits = None
        while time.monotonic() < deadline and not hits:
            hits = _search_file(url, queries[0][0], k=3).json()["results"]
        assert hits, "indexed items never became searchable"

        # Held-out files of each family find their own family first.
        correct = 0
        for path, family in queries:
            r = _search_file(url, path, k=5)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == load_bundle(exec_bundle).id and len(body["results"]) == 5
            scores = [h["score"] for h in body["results"]]
            assert scores == sorted(scores, reverse=True)
            correct += body["results"][0]["label"] == family
        assert correct / len(queries) >= 0.75, f"P@1 {correct}/{len(queries)}"

        # Writes need a key: refused without one, refused with a wrong one, then done with the right one.
        new_file = queries[0][0]
        files = {"file": (new_file.name, new_file.read_bytes())}
        data = {"label": "mine", "name": "query-zero"}
        r = httpx.post(f"{url}/collections/exe/items", files=files, data=data, timeout=60)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        r = httpx.post(
            f"{url}/collections/exe/items",
            files=files,
            data=data,
            headers={"X-API-Key": "wrong-key-0"},
            timeout=60,
        )
        assert r.status_code == 403 and r.json()["code"] == "forbidden"
        r = httpx.post(f"{url}/collections/exe/items", files=files, data=data, headers=KEY, timeout=60)
        assert r.status_code == 201 and r.json()["created"] is True
        item_id = r.json()["id"]
        again = httpx.post(f"{url}/collections/exe/items", files=files, data=data, headers=KEY, timeout=60)
        assert again.status_code == 200 and again.json() == {**r.json(), "created": False}

        by_id = httpx.post(
            f"{url}/search", json={"collection": "exe", "id": item_id, "k": 1}, timeout=30
        ).json()
        assert by_id["results"][0]["id"] == item_id and by_id["results"][0]["label"] == "mine"
        label_only = httpx.post(
            f"{url}/search",
            json={"collection": "exe", "id": item_id, "k": 10, "label": "systemd"},
            timeout=30,
        ).json()["results"]
        assert label_only and {h["label"] for h in label_only} == {"systemd"}

        assert httpx.delete(f"{url}/collections/exe/items/{item_id}", timeout=30).status_code == 401
        d = httpx.delete(f"{url}/collections/exe/items/{item_id}", headers=KEY, timeout=30)
        assert d.status_code == 200 and d.json()["deleted"] is True
        gone = httpx.post(f"{url}/search", json={"collection": "exe", "id": item_id}, timeout=30)
        assert gone.status_code == 404
        assert _count(url, "exe") == expected

        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'lookalike_requests_total{method="POST",route="/search",status="200"}' in metrics
        assert f'lookalike_collection_items{{collection="exe"}} {float(expected)}' in metrics


def _store_rows(store: Path) -> list[tuple]:
    rows = []
    for db in sorted(store.rglob("items.sqlite")):
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            rows += conn.execute("SELECT id, sha256 FROM items ORDER BY id").fetchall()
    return rows


def test_hostile_uploads_get_json_4xx_and_change_nothing(
    exec_bundle, image_bundle, elf_path, pe_path, tmp_path
):
    store = tmp_path / "store"
    config = write_config(tmp_path / "lookalike.toml", store, {"exe": exec_bundle, "img": image_bundle})
    elf, pe = elf_path.read_bytes(), pe_path.read_bytes()
    png = image_bytes("PNG")
    corpus = [
        ("exe", "empty", b"", 422, "empty_input"),
        ("exe", "random bytes", os.urandom(3000), 422, "not_an_executable"),
        ("exe", "truncated ELF header", elf[:40], 422, "not_an_executable"),
        ("exe", "truncated PE header", pe[:300], 422, "not_an_executable"),
        ("exe", "text file", b"just some text\n" * 100, 422, "not_an_executable"),
        ("img", "1 GB declared image", png_bomb_bytes(32768, 32768), 422, "decompression_bomb"),
        ("img", "corrupt PNG", png[:50] + b"\xff" * 50, 422, "corrupt_image"),
        ("img", "executable as image", elf, 422, "corrupt_image"),
        ("img", "empty image", b"", 422, "empty_input"),
    ]
    with serving(config) as url:
        httpx.post(f"{url}/collections/exe/items", files={"file": ("ls", elf)}, headers=KEY, timeout=60)
        before = _store_rows(store)
        assert len(before) == 1
        for collection, name, data, status, code in corpus:
            for route, headers in (
                ("/search", {}),
                ("/embed", {}),
                (f"/collections/{collection}/items", KEY),
            ):
                r = httpx.post(
                    f"{url}{route}",
                    files={"file": ("upload.bin", data)},
                    data={"collection": collection},
                    headers=headers,
                    timeout=60,
                )
                assert r.status_code == status, (name, route, r.text)
                assert r.json()["code"] == code, (name, route)
                assert r.json()["message"]
        oversized = httpx.post(
            f"{url}/embed",
            files={"file": ("big", os.urandom(9 * 1024 * 1024))},
            data={"collection": "exe"},
            timeout=60,
        )
        assert oversized.status_code == 413 and oversized.json()["code"] == "too_large"
        wrong_type = httpx.post(
            f"{url}/embed", content=b"\x7fELF", headers={"content-type": "application/octet-stream"}
        )
        assert wrong_type.status_code == 415 and wrong_type.json()["code"] == "unsupported_media_type"
        no_file = httpx.post(f"{url}/search", data={"collection": "exe"}, files={"other": ("x", b"1")})
        assert no_file.status_code == 400
        missing_field = httpx.post(f"{url}/search", json={"collection": "exe", "k": 3})
        assert missing_field.status_code == 400 and missing_field.json()["code"] == "bad_request"
        bad_vector = httpx.post(f"{url}/search", json={"collection": "exe", "vector": [1.0, 2.0]})
        dim = load_bundle(exec_bundle).model_config.out_dim
        assert bad_vector.status_code == 400 and f"{dim} values" in bad_vector.json()["message"]
        unknown = httpx.post(f"{url}/embed", files={"file": ("ls", elf)}, data={"collection": "nope"})
        assert unknown.status_code == 404 and unknown.json()["code"] == "not_found"
        not_json = httpx.post(
            f"{url}/search", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 400

        assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        assert _store_rows(store) == before


def test_unconverged_model_stops_the_server_with_the_gates_explanation(exec_bundle, tmp_path):
    bundle = load_bundle(exec_bundle)
    model = bundle.model
    target = "stages.1.a.norm"
    layer = dict(model.named_modules())[target]
    layer.running_var.mul_(10)  # a hand-corrupted layer: variance ten times the population's
    bad = tmp_path / "bad-bundle"
    save_bundle(bad, model, bundle.input_spec, bundle.labels, bundle.calibration_x, bundle.calibration_y)
    config = write_config(tmp_path / "lookalike.toml", tmp_path / "store", {"exe": bad})
    r = subprocess.run(
        [str(LOOKALIKE), "serve", "--config", str(config), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr
    assert "failed the BN health gate" in r.stderr and target in r.stderr
    assert "lookalike recalibrate" in r.stderr
