"""Spot preemption end to end on a real multi-node Ray cluster on this machine.

A head (1 CPU: the driver's node, too small for the 2 training workers) and a spot worker node
of 6 logical CPUs, each a `ray start --block` process; the run's 2 workers sit on the spot node.
A replacement node joins (the autoscaler's part), then a fake AWS metadata service announces a
spot interruption: `cluster/spot_watcher.py` polls it and runs the real `ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION` on the spot node, as it does on a cloud spot node. Ray Train tells
the workers (`get_preemption_info`), they write the just-in-time checkpoint, the spot node is
killed, and the run resumes from that checkpoint on the replacement node and ends with the
uninterrupted run's steps and losses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

from rayjobs.train import local_env_defaults
from tests.cluster.fake_metadata import FakeMetadata, in_seconds
from tests.raycluster import RAY, RayCluster, start_cluster
from tests.reliability.conftest import FAULT_RUN, REPO, saved_state, subprocess_env
from tests.reliability.test_faults import LOSS_TOLERANCE, wait_for

NOTICE_STEP = 4  # not a multiple of FAULT_RUN's checkpoint_every=3: only the notice saves here
DRIVER = """
import json, sys
from core.config import load_run_config
from rayjobs.train import run_training
from tests.reliability.faults import HoldForPreemption
cfg = load_run_config(sys.argv[1], sys.argv[4:])
final = run_training(cfg, before_backward=HoldForPreemption(sys.argv[2], int(sys.argv[3])))
print("FINAL " + json.dumps({k: v for k, v in final.items() if isinstance(v, (int, float, str))}), flush=True)
"""


def worker_nodes(cluster: RayCluster) -> set[str]:
    """Node ids hosting this cluster's RayTrainWorker processes."""
    found = set()
    for node in [cluster.head, *cluster.nodes]:
        for proc in node.processes():
            try:
                if "RayTrainWorker" in proc.name() + " ".join(proc.cmdline()):
                    found.add(node.node_id)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
    return found


@pytest.fixture
def spot_cluster():
    env = local_env_defaults()  # what an embedded Ray gets, for every node here
    env.update(RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="0.25", PYTHONPATH=str(REPO),
               TOKENIZERS_PARALLELISM="false", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
               # Raylets prestart one idle Python worker per CPU for the first driver: on 2 cores,
               # a dozen interpreters booting at once delay the run's own workers by many seconds.
               RAY_prestart_worker_first_driver="0", RAY_enable_worker_prestart="0")
    cluster = start_cluster(num_cpus=1, dashboard=False, node_env=env)
    try:
        # Logical CPUs, as ensure_ray gives an embedded Ray: the 2 workers hold 2, Ray Data the rest.
        cluster.add_node(num_cpus=6)
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_spot_notice_drains_the_node_and_the_run_resumes_from_the_just_in_time_checkpoint(
        spot_cluster, rel_data, reference_run, tmp_path):
    cluster = spot_cluster
    flags, storage = tmp_path / "flags", tmp_path / "runs"
    flags.mkdir()
    run_dir = storage / "preempted"
    sets = [f"data.path={rel_data}", f"train.storage_path={storage}", "train.name=preempted", *FAULT_RUN]
    log_path = tmp_path / "driver.log"
    # the driver plans the Ray Data reads: it needs local_env.yaml's settings as the nodes do
    env = {**subprocess_env(), **cluster.client_env(RAY_ADDRESS=cluster.gcs_address, **cluster.node_env)}
    with open(log_path, "w") as log:
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(REPO / "rayjobs/configs/smoke.yaml"), str(flags),
                                   str(NOTICE_STEP), *sets], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: all((flags / f"waiting.rank{r}").exists() for r in range(2)) or driver.poll() is not None,
                 300, "both workers at the notice step")
        assert driver.poll() is None, log_path.read_text()[-4000:]
        doomed = cluster.nodes[0]
        assert worker_nodes(cluster) == {doomed.node_id}  # both workers on the spot node
        survivor = cluster.add_node(num_cpus=6)  # the replacement, while the workers wait

        # The cloud's notice, seen by the real watcher, which runs the real `ray drain-node`.
        with FakeMetadata("aws", quiet_polls=1, notice_time=in_seconds(30)) as fake:
            watcher = subprocess.run(
                [sys.executable, str(REPO / "cluster/spot_watcher.py"), "--cloud", "aws", "--metadata-url", fake.url,
                 "--interval", "0.2", "--max-polls", "20", "--node-id", doomed.node_id, "--drain-cmd", RAY],
                env=cluster.client_env(RAY_ADDRESS=cluster.gcs_address), capture_output=True, text=True, timeout=120)
        assert watcher.returncode == 0, watcher.stderr
        assert "DRAIN_NODE_REASON_PREEMPTION" in watcher.stderr and doomed.node_id in watcher.stderr, watcher.stderr
        (flags / "drained").touch()

        jit = run_dir / f"checkpoint_{NOTICE_STEP:08d}"
        wait_for(lambda: (jit / "state.json").exists() or driver.poll() is not None, 120, "the just-in-time checkpoint")
        assert (jit / "state.json").exists(), log_path.read_text()[-4000:]
        time.sleep(1.0)  # the report that carries it reaches the controller
        doomed.kill()  # the reclaim: raylet and workers gone at once
        (flags / "node_gone").touch()
        resumed_on = wait_for(lambda: worker_nodes(cluster) or driver.poll() is not None, 300, "the resumed workers")
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    log = log_path.read_text()
    assert driver.returncode == 0, log[-6000:]
    assert f"node preemption notice at step {NOTICE_STEP}: just-in-time checkpoint" in log, log[-4000:]

    final = json.loads(next(line for line in log.splitlines() if line.startswith("FINAL "))[len("FINAL "):])
    state = saved_state(final["checkpoint"])
    # resumed from the notice's checkpoint (step 4), not the periodic one before it (step 3)
    assert [(r["step"], r["checkpoint"]) for r in state["resumes"]] == [(NOTICE_STEP, jit.name)], state["resumes"]
    assert final["steps"] == reference_run["steps"] == 12
    history, reference = state["history"], saved_state(reference_run["checkpoint"])["history"]
    assert [h["step"] for h in history] == list(range(1, 13)), "a step was lost or repeated"
    for got, want in zip(history, reference):
        assert abs(got["loss"] - want["loss"]) <= LOSS_TOLERANCE, (got, want)
    assert resumed_on == {survivor.node_id}, (resumed_on, survivor.node_id)  # on the replacement node
    alive = cluster.alive_node_ids()
    assert survivor.node_id in alive and doomed.node_id not in alive
