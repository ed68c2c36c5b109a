"""`ray job submit` against a real token-authenticated Ray head on 127.0.0.1 (issue #7).

The head comes from `ray_head` in tests/cluster/conftest.py (the `ray` CLI, a temp token, free
ports). What is checked is what cluster/README.md promises:
- the smoke training job, submitted with `--working-dir . --runtime-env cluster/runtime_env.yaml`
  and the token in the environment, succeeds and leaves its metrics and export on storage;
- the same submission without the token, or with a wrong one, is refused before anything runs,
  and so is a bare HTTP request to the Jobs API;
- the dashboard / Jobs API listens on loopback only, and the GCS (which listens on every
  interface) refuses a driver without the token;
- after training, the embedding job runs under `ray job submit` too, and `serve run
  cluster/serve.yaml` serves its index on the same cluster.

    pytest tests/cluster/test_job_submit.py -m slow     # about 4 minutes on 2 busy CPU cores
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import requests
import yaml

from core.related_index import EMBEDDINGS_FILE, MANIFEST_FILE, read_embeddings
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")  # the venv's CLI, as in conftest.py

pytestmark = pytest.mark.slow

SMOKE = "rayjobs/configs/smoke.yaml"
JOB_TIMEOUT_S = 900  # ~1 min on an idle 2-core machine; 4 min seen at load average 18
CLI_TIMEOUT_S = 180
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def submit_cmd(head, submission_id: str, storage: Path, data: Path) -> list[str]:
    """The README's submission command, pointed at this head and at temp storage."""
    return [
        RAY, "job", "submit", "--address", head.dashboard_url, "--no-wait", "--submission-id", submission_id,
        "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--",
        "python", "-m", "rayjobs.train", "--config", SMOKE,
        "--set", f"train.storage_path={storage}", "--set", f"data.path={data}", "--set", "train.name=submitted",
    ]


def ray_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def job_info(head, submission_id: str) -> requests.Response:
    return requests.get(f"{head.dashboard_url}/api/jobs/{submission_id}", headers=head.auth_header, timeout=30)


def job_logs(head, submission_id: str) -> str:
    """`ray job logs` with the token; the output (or the CLI's error) for failure messages."""
    out = ray_cli([RAY, "job", "logs", "--address", head.dashboard_url, submission_id], head.client_env())
    return (out.stdout + out.stderr)[-8000:]


def wait_for_job(head, submission_id: str) -> dict:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    info: dict = {}
    while time.monotonic() < deadline:
        r = job_info(head, submission_id)
        assert r.status_code == 200, f"GET /api/jobs/{submission_id}: HTTP {r.status_code} {r.text[:300]}"
        info = r.json()
        if info["status"] in TERMINAL:
            return info
        time.sleep(1)
    subprocess.run([RAY, "job", "stop", "--address", head.dashboard_url, "--no-wait", submission_id],
                   env=head.client_env(), capture_output=True, timeout=CLI_TIMEOUT_S)
    pytest.fail(f"job {submission_id} still {info.get('status')} after {JOB_TIMEOUT_S}s; logs:\n"
                f"{job_logs(head, submission_id)}")


def submit_and_wait(head, sid: str, cmd: list[str]) -> tuple[dict, str]:
    """Submit, wait for a terminal state; (job info, logs), the job having succeeded."""
    sub = ray_cli(cmd, head.client_env())
    assert sub.returncode == 0, f"ray job submit failed ({sub.returncode}):\n{sub.stdout}\n{sub.stderr}"
    assert sid in sub.stdout + sub.stderr
    info = wait_for_job(head, sid)
    logs = job_logs(head, sid)
    assert info["status"] == "SUCCEEDED", f"job {sid} {info['status']}: {info.get('message')}\nlogs:\n{logs}"
    return info, logs


@pytest.fixture(scope="module")
def submitted_smoke(ray_head, tmp_path_factory):
    """The README's smoke training job, submitted once for the module: (storage, data, logs)."""
    base = tmp_path_factory.mktemp("submitted")
    storage, data = base / "runs", base / "data"
    sid = f"smoke-{uuid.uuid4().hex[:8]}"
    _, logs = submit_and_wait(ray_head, sid, submit_cmd(ray_head, sid, storage, data))
    return storage, data, logs


def test_submitted_smoke_job_succeeds_and_writes_artefacts(submitted_smoke):
    smoke = yaml.safe_load((ROOT / SMOKE).read_text())
    storage, data, logs = submitted_smoke
    assert "[train] run directory:" in logs, logs

    run_dir = storage / "submitted"
    final_path = run_dir / "final_metrics.json"
    assert final_path.is_file(), f"no {final_path}; run dir holds {sorted(p.name for p in run_dir.glob('*'))}\n{logs}"
    final = json.loads(final_path.read_text())
    assert final["steps"] == smoke["train"]["max_steps"]
    recall = {k for k in final if k.startswith("R@")}
    assert recall >= {f"R@{k}" for k in smoke["eval"]["ks"] if k <= 10}, sorted(final)
    assert all(0.0 <= final[k] <= 1.0 for k in recall)
    assert (run_dir / "export" / "model.safetensors").is_file(), sorted(p.name for p in (run_dir / "export").glob("*"))
    # The job ran from the uploaded copy: data and runs went where --set said, not into the repo.
    assert (data / "pairs_train.parquet").is_file()


@pytest.mark.parametrize("credentials", ["none", "token_without_mode", "mode_without_token", "wrong_token"])
def test_submission_without_the_token_is_refused(ray_head, clean_env, tmp_path, credentials):
    # HOME is an empty dir, so ~/.ray/auth_token is not found either.
    home = tmp_path / "home"
    home.mkdir()
    # (environment, what the CLI says): the server answers 401 to no token and 403 to a wrong
    # one; in token mode without any token the CLI itself refuses before sending anything.
    env, expected = {
        "none": (clean_env(HOME=str(home)), "Authentication required"),
        # The CLI sends a token only in token mode: the client needs RAY_AUTH_MODE=token too.
        "token_without_mode": (clean_env(HOME=str(home), RAY_AUTH_TOKEN_PATH=str(ray_head.token_path)),
                               "Authentication required"),
        "mode_without_token": (clean_env(HOME=str(home), RAY_AUTH_MODE="token"),
                               "couldn't find an authentication token"),
        "wrong_token": (clean_env(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64),
                        "Authentication failed"),
    }[credentials]
    sid = f"refused-{credentials}-{uuid.uuid4().hex[:6]}"

    out = ray_cli(submit_cmd(ray_head, sid, tmp_path / "runs", tmp_path / "data"), env)
    text = out.stdout + out.stderr
    assert out.returncode != 0, f"submission without a valid token was accepted:\n{text}"
    assert expected in text and "Token authentication is enabled" in text, text
    assert job_info(ray_head, sid).status_code == 404, "a refused submission must not create a job"
    assert not (tmp_path / "runs").exists()


def test_jobs_api_needs_the_bearer_token(ray_head):
    url = f"{ray_head.dashboard_url}/api/jobs/"

    bare = requests.get(url, timeout=30)
    assert bare.status_code == 401, (bare.status_code, bare.text[:300])
    wrong = requests.get(url, headers={"Authorization": "Bearer " + "0" * 64}, timeout=30)
    assert wrong.status_code == 403, (wrong.status_code, wrong.text[:300])
    bare_post = requests.post(url, json={"entrypoint": "echo should-not-run"}, timeout=30)
    assert bare_post.status_code == 401, (bare_post.status_code, bare_post.text[:300])

    ok = requests.get(url, headers=ray_head.auth_header, timeout=30)
    assert ok.status_code == 200, (ok.status_code, ok.text[:300])
    assert isinstance(ok.json(), list)
    # Behind a proxy that owns `Authorization`, Ray also reads X-Ray-Authorization.
    proxied = requests.get(url, headers={"X-Ray-Authorization": f"Bearer {ray_head.token}"}, timeout=30)
    assert proxied.status_code == 200, (proxied.status_code, proxied.text[:300])
    # Health checks stay public (KubeRay's probes and load balancers carry no token).
    assert requests.get(f"{ray_head.dashboard_url}/api/gcs_healthz", timeout=30).status_code == 200


def test_dashboard_listens_on_loopback_only(ray_head):
    listening = [c for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == ray_head.dashboard_port]
    assert listening, f"nothing listens on dashboard port {ray_head.dashboard_port}"
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}, listening


def test_gcs_refuses_a_driver_without_the_token(ray_head, clean_env, tmp_path):
    # Unlike the dashboard, the GCS, raylet and agents listen on every interface (Ray resolves
    # 127.0.0.1 to the node's reachable IP): there the token is the only guard.
    connect = [sys.executable, "-c",
               f"import ray; ray.init(address='{ray_head.gcs_address}'); print('CONNECTED', ray.cluster_resources())"]
    home = tmp_path / "home"
    home.mkdir()
    refused = subprocess.run(connect, env=clean_env(HOME=str(home)), capture_output=True, text=True,
                             timeout=CLI_TIMEOUT_S)
    text = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "CONNECTED" not in text, text[-3000:]
    assert "InvalidAuthToken" in text, text[-3000:]
    accepted = subprocess.run(connect, env=ray_head.client_env(), capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert accepted.returncode == 0 and "CONNECTED" in accepted.stdout, (accepted.stdout + accepted.stderr)[-3000:]


def test_embed_job_then_serve_run_of_the_shipped_config(ray_head, submitted_smoke, tmp_path):
    """After training: `ray job submit -- python -m rayjobs.embed` on the cluster writes the index;
    `serve run cluster/serve.yaml` (index and port pointed here) serves it over HTTP, and
    /related answers as brute force over the index's embeddings.parquet does."""
    storage, data, _ = submitted_smoke
    index = tmp_path / "index"
    sid = f"embed-{uuid.uuid4().hex[:8]}"
    _, logs = submit_and_wait(ray_head, sid, [
        RAY, "job", "submit", "--address", ray_head.dashboard_url, "--no-wait", "--submission-id", sid,
        "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--",
        "python", "-m", "rayjobs.embed", "--checkpoint", str(storage / "submitted" / "export"), "--data", str(data),
        "--out", str(index), "--shard-size", "64"])
    assert "shard(s) of 64" in logs and (index / MANIFEST_FILE).is_file(), logs
    ids, emb = read_embeddings(index / EMBEDDINGS_FILE)
    assert len(ids) == pq.read_metadata(data / "notes.parquet").num_rows

    config = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["index"] = str(index)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "serve_run.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(tmp_path / "serve.yaml")], cwd=ROOT,
                            env=ray_head.client_env(RAY_ADDRESS=ray_head.gcs_address), stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the proxy holds the request until the app is up
                pass
            time.sleep(1)
        assert proc.poll() is None, (tmp_path / "serve_run.log").read_text()[-4000:]
        health = requests.get(f"{url}/healthz", timeout=30).json()
        assert health["count"] == len(ids) and health["index"] == "exact", health
        for row in (0, len(ids) // 2):
            got = requests.get(f"{url}/related/{ids[row]}", params={"k": 5}, timeout=30).json()["related"]
            scores = emb @ emb[row]  # [N]
            order = [i for i in np.argsort(-scores, kind="stable") if i != row][:6]  # one past k: the boundary
            np.testing.assert_allclose([r["score"] for r in got], scores[order[:5]], rtol=1e-5, atol=1e-6)
            # the same notes in the same order wherever the scores are not near-ties (FAISS and
            # NumPy may round the last bit differently)
            clear = [j for j in range(5) if all(abs(scores[order[j]] - scores[o]) > 1e-5 for o in order if o != order[j])]
            assert len(clear) >= 3 and [got[j]["note_id"] for j in clear] == ids[[order[j] for j in clear]].tolist()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: serve run tears its application down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
