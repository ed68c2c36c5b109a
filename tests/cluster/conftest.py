"""A real local Ray head with token authentication, started with the `ray` CLI.

`ray_head` is what `cluster/README.md` tells a user to do, on 127.0.0.1 and in temp dirs:

    HOME=<tmp>/home ray get-auth-token --generate       # the token, in <tmp>/home/.ray/auth_token
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<that file> ray start --head --block \\
        --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --temp-dir=<tmp>/r ...

The user's own `~/.ray/auth_token` is never read or written. Every port is a free one picked
here (other Ray instances may run on the same machine), and teardown stops only this head:
`ray stop` would kill every Ray process on the machine, so the fixture sends SIGTERM to its own
`ray start --block` (which then stops the processes it started) and kills, by pid, whatever
still carries this head's token path in its environment.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
# The `ray` CLI of the interpreter running the tests (the venv's); its directory goes first on
# PATH so the head, and hence every job entrypoint it runs, uses this same Python.
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
HEAD_START_TIMEOUT_S = 240
# Variables that would point a process at another cluster or another token.
_FOREIGN_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_JOB_HEADERS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment minus anything naming a Ray cluster or token, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_VARS}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"  # no network here; don't try to report
    env.update(extra)
    return env


@dataclasses.dataclass
class RayHead:
    """Addresses and credentials of the running head."""

    dashboard_port: int
    gcs_address: str
    token: str
    token_path: Path
    temp_dir: Path
    log_path: Path

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_header(self) -> dict[str, str]:
        """The header Ray's dashboard middleware checks (`Authorization: Bearer <token>`)."""
        return {"Authorization": f"Bearer {self.token}"}

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment of an authorised `ray` CLI: token mode on, token from the temp file."""
        return _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path), **extra)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def _wait_until_serving(head: RayHead, proc: subprocess.Popen) -> None:
    """Until the Jobs API answers an authorised request (the dashboard loads it after /api/gcs_healthz)."""
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`ray start --head` exited with {proc.returncode}:\n{head.log_tail()}")
        try:
            r = requests.get(f"{head.dashboard_url}/api/jobs/", headers=head.auth_header, timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.RequestException as err:
            last = repr(err)
        time.sleep(1)
    pytest.fail(f"Ray dashboard on {head.dashboard_url} not serving after {HEAD_START_TIMEOUT_S}s ({last}):\n"
                f"{head.log_tail()}")


def _own_processes(head: RayHead) -> list[psutil.Process]:
    """Processes of this head: their environment holds its (unique, temporary) token path."""
    marker = str(head.token_path)
    found = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get("RAY_AUTH_TOKEN_PATH") == marker:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _stop(head: RayHead, proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # Node's SIGTERM handler stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    leftovers = _own_processes(head)
    for p in leftovers:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(leftovers, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def clean_env():
    """`clean_env(**extra)`: this process's environment without any Ray address or token."""
    return _clean_env


@pytest.fixture(scope="module")
def ray_head():
    """A token-authenticated Ray head (4 CPUs, dashboard + Jobs API on 127.0.0.1), for one module."""
    # Short: Ray's unix sockets live under <temp-dir>/session_*/sockets/ (108-byte path limit).
    base = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    home = base / "home"
    home.mkdir()
    gen = subprocess.run([RAY, "get-auth-token", "--generate"], env=_clean_env(HOME=str(home)),
                         capture_output=True, text=True, timeout=120)
    token_path = home / ".ray" / "auth_token"
    assert gen.returncode == 0 and token_path.is_file(), f"ray get-auth-token failed:\n{gen.stdout}\n{gen.stderr}"
    token = token_path.read_text().strip()
    assert gen.stdout.strip() == token and len(token) >= 32

    gcs_port, dash_port = free_port(), free_port()
    head = RayHead(dashboard_port=dash_port, gcs_address=f"127.0.0.1:{gcs_port}", token=token,
                   token_path=token_path, temp_dir=base / "r", log_path=base / "ray_start.log")
    cmd = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
        # The fixed defaults (10001, 52365) may be taken by another Ray on this machine.
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        "--num-cpus=4", f"--temp-dir={head.temp_dir}",
    ]
    with open(head.log_path, "w") as log:
        # No drain on SIGTERM: nothing here serves requests, and the wait would add 30 s.
        proc = subprocess.Popen(cmd, cwd=base, env=head.client_env(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0"),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_serving(head, proc)
        yield head
    finally:
        _stop(head, proc)
        shutil.rmtree(base, ignore_errors=True)
