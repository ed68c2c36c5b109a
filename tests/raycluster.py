"""Real Ray clusters on this one machine, started with the `ray` CLI as `cluster/README.md` tells
a user to, on 127.0.0.1 and in temp dirs:

    HOME=<tmp>/home ray get-auth-token --generate       # the token, in <tmp>/home/.ray/auth_token
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<that file> ray start --head --block \\
        --node-ip-address=127.0.0.1 --temp-dir=<tmp>/r ...
    ... ray start --block --address=<head> ...          # more nodes (`add_node`), one raylet each

The user's own `~/.ray/auth_token` is never read or written. Every port is a free one picked
here (other Ray instances may run on the same machine), and stopping touches only this cluster:
`ray stop` would kill every Ray process on the machine, so each node's own `ray start --block`
gets SIGTERM (it then stops the processes it started) and whatever still carries this cluster's
token path in its environment is killed by pid.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
# The `ray` CLI of the interpreter running the tests (the venv's); its directory goes first on
# PATH so the head, and hence every job entrypoint it runs, uses this same Python.
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
START_TIMEOUT_S = 240
# Variables that would point a process at another cluster or another token.
FOREIGN_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_JOB_HEADERS")


class ClusterError(RuntimeError):
    """A node did not start; the message carries its log tail."""


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment minus anything naming a Ray cluster or token, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_VARS}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"  # no network here; don't try to report
    env.update(extra)
    return env


@dataclasses.dataclass
class RayNode:
    """One raylet: its `ray start --block` process and the node id the raylet registered."""

    proc: subprocess.Popen
    node_id: str
    log_path: Path

    def processes(self) -> list[psutil.Process]:
        """The node's processes: its raylet and everything the raylet started (workers included)."""
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """The node goes, as a reclaimed spot instance does: SIGKILL to all of it at once."""
        victims = [psutil.Process(self.proc.pid), *self.processes()]
        for p in victims:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=30)


@dataclasses.dataclass
class RayCluster:
    """Addresses and credentials of a running head, and the nodes added to it."""

    dashboard_port: int | None
    gcs_address: str
    token: str
    token_path: Path
    base: Path
    head: RayNode | None = None
    nodes: list[RayNode] = dataclasses.field(default_factory=list)
    node_env: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_header(self) -> dict[str, str]:
        """The header Ray's dashboard middleware checks (`Authorization: Bearer <token>`)."""
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def log_path(self) -> Path:
        return self.head.log_path

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment of an authorised `ray` CLI or driver: token mode on, token from the temp file."""
        return clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path), **extra)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def add_node(self, num_cpus: int) -> RayNode:
        """Start one more raylet on this machine and wait until the head lists it alive.

        Nodes start one at a time: raylets started together in one session directory race for
        the same plasma-store socket name and one of them aborts."""
        log_path = self.base / f"node{len(self.nodes) + 1}.log"
        cmd = [RAY, "start", "--block", "--disable-usage-stats", f"--address={self.gcs_address}",
               "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
               f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}"]
        node = _launch(cmd, self.base, self.client_env(**self.node_env), log_path)
        self.nodes.append(node)
        self.wait_alive({node.node_id})
        return node

    def alive_node_ids(self) -> set[str]:
        """Node ids the GCS lists alive, asked by a short driver process (this process may be
        connected to another Ray)."""
        probe = ("import json, ray; ray.init(logging_level='ERROR', log_to_driver=False); "
                 "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))")
        proc = subprocess.run([sys.executable, "-c", probe], env=self.client_env(RAY_ADDRESS=self.gcs_address),
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise ClusterError(f"listing nodes failed:\n{proc.stderr[-2000:]}")
        return set(json.loads(proc.stdout.strip().splitlines()[-1]))

    def wait_alive(self, node_ids: set[str]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not node_ids <= self.alive_node_ids():
            if time.monotonic() > deadline:
                raise ClusterError(f"nodes {sorted(node_ids)} not alive after {START_TIMEOUT_S}s:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        for node in [*reversed(self.nodes), self.head]:
            if node is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)  # Node's SIGTERM handler stops what it started
                try:
                    node.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait(timeout=10)
        leftovers = processes_marked(self.token_path)
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
        shutil.rmtree(self.base, ignore_errors=True)


def processes_marked(token_path: Path) -> list[psutil.Process]:
    """Processes of one cluster: their environment holds its (unique, temporary) token path."""
    marker = str(token_path)
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


_NODE_ID = re.compile(r"--node_id=([0-9a-f]+)")


def _launch(cmd: list[str], cwd: Path, env: dict[str, str], log_path: Path) -> RayNode:
    """Run one `ray start --block` and wait for its raylet (whose command line names the node id)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"`{' '.join(cmd[:3])}` exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        for child in RayNode(proc, "", log_path).processes():
            try:
                found = _NODE_ID.search(" ".join(child.cmdline()))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if found:
                return RayNode(proc, found.group(1), log_path)
        time.sleep(0.2)
    proc.kill()
    raise ClusterError(f"no raylet from `{' '.join(cmd[:3])}` after {START_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")


def start_cluster(*, num_cpus: int, dashboard: bool = True, node_env: dict[str, str] | None = None) -> RayCluster:
    """A token-authenticated head on 127.0.0.1 (`num_cpus` CPUs; with `dashboard`, the dashboard
    and Jobs API, waited for until they answer). `node_env` goes into every node's environment
    (the head's and `add_node`'s), hence into every worker's. Call `stop()` when done."""
    # Short: Ray's unix sockets live under <temp-dir>/session_*/sockets/ (108-byte path limit).
    base = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    home = base / "home"
    home.mkdir()
    gen = subprocess.run([RAY, "get-auth-token", "--generate"], env=clean_env(HOME=str(home)),
                         capture_output=True, text=True, timeout=120)
    token_path = home / ".ray" / "auth_token"
    if gen.returncode != 0 or not token_path.is_file():
        raise ClusterError(f"ray get-auth-token failed:\n{gen.stdout}\n{gen.stderr}")
    token = token_path.read_text().strip()
    assert gen.stdout.strip() == token and len(token) >= 32

    gcs_port = free_port()
    cluster = RayCluster(dashboard_port=free_port() if dashboard else None, gcs_address=f"127.0.0.1:{gcs_port}",
                         token=token, token_path=token_path, base=base, node_env=dict(node_env or {}))
    web = (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={cluster.dashboard_port}"]
           if dashboard else ["--include-dashboard=false"])
    cmd = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs_port}", *web,
        # The fixed defaults (10001, 52365) may be taken by another Ray on this machine.
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--num-cpus={num_cpus}", f"--temp-dir={base / 'r'}",
    ]
    # No drain on SIGTERM: nothing here serves requests, and the wait would add 30 s.
    env = cluster.client_env(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", **cluster.node_env)
    try:
        cluster.head = _launch(cmd, base, env, base / "ray_start.log")
        if dashboard:
            _wait_until_serving(cluster)
        else:
            cluster.wait_alive({cluster.head.node_id})
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_until_serving(cluster: RayCluster) -> None:
    """Until the Jobs API answers an authorised request (the dashboard loads it after /api/gcs_healthz)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if cluster.head.proc.poll() is not None:
            raise ClusterError(f"`ray start --head` exited with {cluster.head.proc.returncode}:\n{cluster.log_tail()}")
        try:
            r = requests.get(f"{cluster.dashboard_url}/api/jobs/", headers=cluster.auth_header, timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.RequestException as err:
            last = repr(err)
        time.sleep(1)
    raise ClusterError(f"Ray dashboard on {cluster.dashboard_url} not serving after {START_TIMEOUT_S}s ({last}):\n"
                       f"{cluster.log_tail()}")
