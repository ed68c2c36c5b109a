"""cluster/spot_watcher.py against a fake metadata server on 127.0.0.1 (no real network)."""

from __future__ import annotations

import datetime as dt
import http.server
import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "spot_watcher.py"


def _load_watcher():
    spec = importlib.util.spec_from_file_location("spot_watcher", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


sw = _load_watcher()


class FakeMetadata:
    """IMDSv2 / GCE metadata imitation: no notice for the first `quiet_polls` polls, then one."""

    def __init__(self, cloud: str, quiet_polls: int, notice_time: str | None = None):
        self.cloud, self.quiet_polls, self.notice_time = cloud, quiet_polls, notice_time
        self.polls = 0
        self.token_requests = 0
        self.bad_requests: list[str] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, code: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    fake.token_requests += 1
                    return self._send(200, "tok-123")
                fake.bad_requests.append(f"PUT {self.path}")
                self._send(400)

            def do_GET(self):
                if fake.cloud == "aws" and self.path == "/latest/meta-data/spot/instance-action":
                    if self.headers.get("X-aws-ec2-metadata-token") != "tok-123":
                        fake.bad_requests.append("GET without IMDSv2 token")
                        return self._send(401)
                    fake.polls += 1
                    if fake.polls <= fake.quiet_polls:
                        return self._send(404)
                    return self._send(200, json.dumps({"action": "terminate", "time": fake.notice_time}))
                if fake.cloud == "gcp" and self.path == "/computeMetadata/v1/instance/preempted":
                    if self.headers.get("Metadata-Flavor") != "Google":
                        fake.bad_requests.append("GET without Metadata-Flavor")
                        return self._send(403)
                    fake.polls += 1
                    return self._send(200, "FALSE" if fake.polls <= fake.quiet_polls else "TRUE")
                fake.bad_requests.append(f"GET {self.path}")
                self._send(404)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _in(seconds: int) -> str:
    return (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_aws_notice_after_n_polls_drains_with_deadline():
    calls = []
    with FakeMetadata("aws", quiet_polls=3, notice_time=_in(110)) as fake:
        rc = sw.watch("aws", fake.url, interval_s=0.01, max_polls=20, drain_cmd=["ray"],
                      run=lambda cmd: calls.append(cmd) or 0, log=lambda m: None)
    assert rc == 0
    assert fake.polls == 4 and fake.bad_requests == []
    assert fake.token_requests == 1  # the IMDSv2 session token is reused across polls
    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[:4] == ["ray", "drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION"]
    assert "--reason-message" in cmd and "terminate" in cmd[cmd.index("--reason-message") + 1]
    deadline = int(cmd[cmd.index("--deadline-remaining-seconds") + 1])
    assert 100 <= deadline <= 110


def test_gcp_notice_uses_default_deadline():
    calls = []
    with FakeMetadata("gcp", quiet_polls=2) as fake:
        rc = sw.watch("gcp", fake.url, interval_s=0.01, max_polls=10, default_deadline_s=30,
                      drain_cmd=["/opt/ray/bin/ray"], run=lambda cmd: calls.append(cmd) or 0, log=lambda m: None)
    assert rc == 0 and fake.polls == 3 and fake.bad_requests == []
    assert calls == [["/opt/ray/bin/ray", "drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                      "--reason-message", "GCP preemption: instance/preempted is TRUE",
                      "--deadline-remaining-seconds", "30"]]


def test_no_notice_gives_up_after_max_polls_without_draining():
    calls = []
    with FakeMetadata("aws", quiet_polls=1000) as fake:
        rc = sw.watch("aws", fake.url, interval_s=0.0, max_polls=5, run=lambda cmd: calls.append(cmd) or 0,
                      log=lambda m: None)
    assert rc == 1 and calls == [] and fake.polls == 5


def test_unreachable_metadata_service_is_not_fatal():
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    calls = []
    rc = sw.watch("aws", f"http://127.0.0.1:{port}", interval_s=0.0, max_polls=3,
                  run=lambda cmd: calls.append(cmd) or 0, log=lambda m: None)
    assert rc == 1 and calls == []


def test_drain_command_parses_with_the_installed_ray_cli():
    """The arguments we emit are accepted by `ray drain-node`'s own option parser (not executed)."""
    pytest.importorskip("ray")
    from ray.scripts.scripts import drain_node

    cmd = sw.drain_command(["ray"], "AWS spot interruption: terminate at 2026-01-01T00:00:00Z", 95)
    ctx = drain_node.make_context("drain-node", cmd[2:])
    assert ctx.params["reason"] == "DRAIN_NODE_REASON_PREEMPTION"
    assert ctx.params["deadline_remaining_seconds"] == 95
    assert ctx.params["node_id"] is None  # defaults to the local node


def test_cli_end_to_end_with_recorder_drain_cmd(tmp_path):
    """`python cluster/spot_watcher.py` as the cluster runs it, with `ray` replaced by a recorder."""
    record = tmp_path / "argv.json"
    recorder = tmp_path / "recorder.py"
    recorder.write_text(f"import json, sys\nopen({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    with FakeMetadata("aws", quiet_polls=2, notice_time=_in(60)) as fake:
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "--cloud", "aws", "--metadata-url", fake.url, "--interval", "0.01",
             "--max-polls", "50", "--drain-cmd", f"{sys.executable} {recorder}"],
            capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(record.read_text())
    assert argv[:3] == ["drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION"]
    assert 50 <= int(argv[argv.index("--deadline-remaining-seconds") + 1]) <= 60
    assert "AWS spot interruption" in proc.stderr


def test_metadata_url_env_var_is_honoured(tmp_path, monkeypatch):
    calls = []
    with FakeMetadata("gcp", quiet_polls=0) as fake:
        monkeypatch.setenv("SPOT_WATCHER_METADATA_URL", fake.url)
        monkeypatch.setattr(sw, "watch", lambda cloud, url, **kw: calls.append((cloud, url, kw)) or 0)
        assert sw.main(["--cloud", "gcp", "--max-polls", "1"]) == 0
    assert calls[0][0] == "gcp" and calls[0][1] == fake.url and calls[0][2]["default_deadline_s"] == 30
