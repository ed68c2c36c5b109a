"""cluster/spot_watcher.py against a fake metadata server on 127.0.0.1 (no real network)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.fake_metadata import FakeMetadata, in_seconds

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "spot_watcher.py"


def _load_watcher():
    spec = importlib.util.spec_from_file_location("spot_watcher", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


sw = _load_watcher()


def test_aws_notice_after_n_polls_drains_with_deadline():
    calls = []
    with FakeMetadata("aws", quiet_polls=3, notice_time=in_seconds(110)) as fake:
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
    named = sw.drain_command(["ray"], "notice", None, node_id="ab" * 28)
    assert drain_node.make_context("drain-node", named[2:]).params["node_id"] == "ab" * 28


def test_cli_end_to_end_with_recorder_drain_cmd(tmp_path):
    """`python cluster/spot_watcher.py` as the cluster runs it, with `ray` replaced by a recorder."""
    record = tmp_path / "argv.json"
    recorder = tmp_path / "recorder.py"
    recorder.write_text(f"import json, sys\nopen({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    with FakeMetadata("aws", quiet_polls=2, notice_time=in_seconds(60)) as fake:
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
