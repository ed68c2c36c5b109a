"""rayjobs.serve over real HTTP on loopback: one Ray Serve app for the module, answers checked against
brute force over embeddings.parquet and against the batch job; every bad input gets its 4xx."""

from __future__ import annotations

import base64
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests

from core.related_index import EMBEDDINGS_FILE, read_embeddings
from rayjobs import embed
from rayjobs import serve as serve_job
from tests.conftest import free_port

# One Ray Data embedding job plus one Serve start for the module: about a minute on 2 idle cores
# (400 s measured with the machine's 1-min load at 90-125).
pytestmark = pytest.mark.slow

TOKEN = "test-token-1234"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tests.core.test_evaluation import tiny_eval_setup

    return tiny_eval_setup(tmp_path_factory.mktemp("serve"), num_notes=40)


@pytest.fixture(scope="module")
def service(ray_local, tiny_run, tmp_path_factory):
    """The exact index of the tiny catalogue, served by one replica on a free loopback port."""
    from ray import serve

    out = tmp_path_factory.mktemp("index") / "exact"
    embed.run_embed(tiny_run.export_dir, tiny_run.data_dir, out, index_kind="exact", actors=1, batch_size=20,
                    shard_size=100)
    port = free_port()
    serve_job.start({"index": str(out), "token": TOKEN, "max_k": 20, "max_image_bytes": 50_000}, port=port)
    yield f"http://127.0.0.1:{port}", out
    serve.shutdown()


def _note(tiny_run, note_id: int) -> dict:
    notes = pq.read_table(f"{tiny_run.data_dir}/notes.parquet").to_pylist()
    row = next(n for n in notes if n["note_id"] == note_id)
    return {"title": row["title"], "topics": row["topics"] or [], "content": row["content"] or "",
            "image": base64.b64encode(row["image"]).decode() if row["image"] else None}


def test_healthz(service):
    url, _ = service
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["count"] == 40 and health["dim"] == 16 and health["index"] == "exact"


def test_related_equals_brute_force_over_the_embeddings_file(service):
    url, out = service
    ids, emb = read_embeddings(out / EMBEDDINGS_FILE)
    for row in (0, 7, 39):
        got = requests.get(f"{url}/related/{ids[row]}", params={"k": 5}, headers=AUTH, timeout=30).json()
        scores = emb @ emb[row]  # [N]
        scores[row] = -np.inf  # the note itself is excluded
        best = np.argsort(-scores, kind="stable")[:5]
        assert got["note_id"] == ids[row]
        assert [r["note_id"] for r in got["related"]] == ids[best].tolist()
        np.testing.assert_allclose([r["score"] for r in got["related"]], scores[best], rtol=1e-5, atol=1e-6)
    default = requests.get(f"{url}/related/{ids[3]}", headers=AUTH, timeout=30).json()
    assert len(default["related"]) == 10


def test_embed_equals_the_batch_job_and_post_related_finds_the_note(service, tiny_run):
    url, out = service
    ids, emb = read_embeddings(out / EMBEDDINGS_FILE)
    for row in (2, 11):
        note = _note(tiny_run, int(ids[row]))
        got = requests.post(f"{url}/embed", json=note, headers=AUTH, timeout=60)
        assert got.status_code == 200, got.text
        np.testing.assert_allclose(got.json()["embedding"], emb[row], rtol=1e-4, atol=1e-5)
        related = requests.post(f"{url}/related", params={"k": 3}, json=note, headers=AUTH, timeout=60).json()
        assert related["related"][0]["note_id"] == ids[row]  # its own stored embedding ranks first
        excluded = requests.post(f"{url}/related", params={"k": 3}, json={**note, "note_id": int(ids[row])},
                                 headers=AUTH, timeout=60).json()
        assert ids[row] not in [r["note_id"] for r in excluded["related"]]


def _png(size: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("method,path,body,status,needle", [
    ("get", "/related/999999", None, 404, "note 999999 is not in the index"),
    ("get", "/related/abc", None, 400, "not an integer"),
    ("get", "/related/{id}?k=0", None, 400, "k 0: out of range (allowed 1..20)"),
    ("get", "/related/{id}?k=21", None, 400, "k 21: out of range"),
    ("get", "/related/{id}?k=ten", None, 400, "k 'ten': not an integer"),
    ("post", "/embed", {"content": "x"}, 400, "missing field(s) title"),
    ("post", "/embed", {"title": 3, "content": "x"}, 400, "field title: expected a string"),
    ("post", "/embed", {"title": "a", "content": "b", "topics": "t"}, 400, "field topics"),
    ("post", "/embed", {"title": "a", "content": "b", "image": "%%%"}, 400, "not valid base64"),
    ("post", "/embed", {"title": "a", "content": "b", "image": base64.b64encode(b"not an image").decode()}, 400,
     "image: does not decode (corrupt)"),
    ("post", "/embed", {"title": "a", "content": "b", "image": _png(200)}, 413, "over the size limit of 50000 bytes"),
    ("post", "/embed", {"title": "a", "content": "b", "image_uri": "/etc/passwd"}, 400, "not under an allowed prefix"),
    ("post", "/embed", "not json", 400, "body: not a JSON object"),
    ("post", "/related?k=500", {"title": "a", "content": "b"}, 400, "k 500: out of range"),
])
def test_bad_inputs_get_their_4xx_and_the_replica_survives(service, method, path, body, status, needle):
    url, out = service
    ids, _ = read_embeddings(out / EMBEDDINGS_FILE)
    pid = requests.get(f"{url}/healthz", timeout=30).json()["pid"]
    kwargs = {"data": body} if isinstance(body, str) else {"json": body} if body is not None else {}
    got = getattr(requests, method)(url + path.format(id=ids[0]), headers=AUTH, timeout=60, **kwargs)
    assert got.status_code == status, got.text
    detail = got.json()["detail"]
    assert needle in detail and "\n" not in detail
    after = requests.get(f"{url}/healthz", timeout=30).json()
    assert after["pid"] == pid  # same replica process: nothing crashed
    assert requests.get(f"{url}/related/{ids[1]}?k=2", headers=AUTH, timeout=30).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_token_is_enforced_over_http(service, headers):
    url, out = service
    ids, _ = read_embeddings(out / EMBEDDINGS_FILE)
    for method, path, kwargs in (("get", f"/related/{ids[0]}", {}),
                                 ("post", "/embed", {"json": {"title": "a", "content": "b"}}),
                                 ("post", "/related", {"json": {"title": "a", "content": "b"}})):
        got = getattr(requests, method)(url + path, headers=headers, timeout=30, **kwargs)
        assert got.status_code == 401 and "token" in got.json()["detail"]
    assert requests.get(f"{url}/healthz", headers=headers, timeout=30).status_code == 200  # probes stay open


def test_cli_refuses_a_public_bind_without_token_and_a_missing_index(service, tmp_path, capsys):
    _, out = service
    assert serve_job.main(["--index", str(out), "--host", "0.0.0.0", "--token", ""]) == 2
    assert "needs --token" in capsys.readouterr().err
    assert serve_job.main(["--index", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "python -m rayjobs.embed" in err


def test_app_builder_options():
    app = serve_job.build_app({"index": "/x", "replicas": 2, "max_replicas": 4})
    deployment = app._bound_deployment
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4
    fixed = serve_job.build_app({"index": "/x", "replicas": 3})._bound_deployment
    assert fixed.num_replicas == 3
    with pytest.raises(ValueError, match="args.index"):
        serve_job.build_app({})
