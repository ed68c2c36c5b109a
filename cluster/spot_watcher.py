#!/usr/bin/env python3
"""Drain this Ray node when the cloud announces a spot interruption (standard library only).

Run on every spot GPU node after `ray start` (cluster/aws-spot-gpu.yaml starts it in the
background). It polls the instance metadata service; on a notice it marks the local Ray node as
draining with reason PREEMPTION and the time left, so Ray schedules nothing new there and Ray
Train gets a chance to take a just-in-time checkpoint before the node disappears:

    python cluster/spot_watcher.py --cloud aws              # AWS: ~2 minutes of warning
    python cluster/spot_watcher.py --cloud gcp --deadline 25  # GCP: ~30 seconds of warning

What it polls (the base URL is `--metadata-url` / $SPOT_WATCHER_METADATA_URL, so tests can point
it at a fake server on 127.0.0.1):
    aws  PUT  {base}/latest/api/token (IMDSv2 session token), then
         GET  {base}/latest/meta-data/spot/instance-action  -> 404 until a notice, then JSON
              {"action": "terminate"|"stop"|"hibernate", "time": "2026-01-01T12:00:00Z"}
    gcp  GET  {base}/computeMetadata/v1/instance/preempted (header Metadata-Flavor: Google)
              -> "FALSE" until preempted, then "TRUE"

On a notice it runs (`--drain-cmd` replaces `ray`, e.g. for tests):
    ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --reason-message "<cloud notice>"
                   --deadline-remaining-seconds <seconds until the instance stops>
and exits 0. `ray drain-node` without --node-id drains the node it runs on (`--node-id ID`
names another, e.g. when several raylets share one host, as in the two-node preemption test). Needs RAY_AUTH_MODE
and the token (~/.ray/auth_token or RAY_AUTH_TOKEN) in its environment like any Ray CLI call.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Callable

DEFAULT_URLS = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal"}
DEFAULT_DEADLINES = {"aws": 120, "gcp": 30}  # seconds of warning each cloud gives
TOKEN_TTL_S = 21600  # IMDSv2 session tokens live up to 6 hours; refresh well before


def _request(url: str, *, method: str = "GET", headers: dict | None = None, timeout: float = 2.0) -> tuple[int, str]:
    """(HTTP status, body); 0 and the error text when the server cannot be reached."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, ""
    except (urllib.error.URLError, OSError) as err:
        return 0, str(err)


class AwsNotice:
    """Polls the EC2 spot instance-action document through IMDSv2."""

    def __init__(self, base_url: str, timeout: float = 2.0):
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self._token = ""
        self._token_at = 0.0

    def _session_token(self) -> str:
        if not self._token or time.monotonic() - self._token_at > TOKEN_TTL_S / 2:
            status, body = _request(
                f"{self.base}/latest/api/token", method="PUT", timeout=self.timeout,
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)},
            )
            self._token, self._token_at = (body.strip(), time.monotonic()) if status == 200 else ("", 0.0)
        return self._token

    def poll(self) -> dict | None:
        """The notice as {"message", "deadline_s"} or None when there is none (yet)."""
        token = self._session_token()
        headers = {"X-aws-ec2-metadata-token": token} if token else {}
        status, body = _request(f"{self.base}/latest/meta-data/spot/instance-action", headers=headers, timeout=self.timeout)
        if status == 401:  # token expired or was rejected: fetch a new one next poll
            self._token = ""
        if status != 200:
            return None  # 404: no interruption scheduled
        try:
            doc = json.loads(body)
            action, when = doc.get("action", "terminate"), doc.get("time")
        except (json.JSONDecodeError, AttributeError):
            action, when = "terminate", None
        deadline = None
        if when:
            try:
                stop_at = dt.datetime.fromisoformat(when.replace("Z", "+00:00"))
                deadline = max(0, int((stop_at - dt.datetime.now(dt.timezone.utc)).total_seconds()))
            except ValueError:
                pass
        return {"message": f"AWS spot interruption: {action} at {when or 'unknown time'}", "deadline_s": deadline}


class GcpNotice:
    """Polls the Compute Engine `preempted` flag (Spot and preemptible VMs)."""

    def __init__(self, base_url: str, timeout: float = 2.0):
        self.base = base_url.rstrip("/")
        self.timeout = timeout

    def poll(self) -> dict | None:
        status, body = _request(
            f"{self.base}/computeMetadata/v1/instance/preempted",
            headers={"Metadata-Flavor": "Google"}, timeout=self.timeout,
        )
        if status == 200 and body.strip().upper() == "TRUE":
            return {"message": "GCP preemption: instance/preempted is TRUE", "deadline_s": None}
        return None


def drain_command(drain_cmd: list[str], message: str, deadline_s: int | None, node_id: str | None = None) -> list[str]:
    """The `ray drain-node` argument vector for a preemption notice (of `node_id`, else this node)."""
    cmd = list(drain_cmd) + [
        "drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", message,
    ]
    if deadline_s is not None:
        cmd += ["--deadline-remaining-seconds", str(int(deadline_s))]
    if node_id:
        cmd += ["--node-id", node_id]
    return cmd


def watch(
    cloud: str,
    base_url: str,
    *,
    interval_s: float = 5.0,
    default_deadline_s: int | None = None,
    max_polls: int | None = None,
    drain_cmd: list[str] | None = None,
    node_id: str | None = None,
    run: Callable[[list[str]], int] | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> int:
    """Poll until a notice (then drain and return 0) or until `max_polls` polls (return 1).

    Args:
        cloud: `aws` or `gcp`.
        base_url: metadata service root, e.g. http://169.254.169.254.
        interval_s: seconds between polls (AWS and GCP recommend about 5).
        default_deadline_s: deadline when the notice carries none (GCP; AWS without a time).
        max_polls: stop after this many polls; None polls forever (the service mode).
        drain_cmd: the `ray` executable as an argument list (default: ["ray"]).
        node_id: the Ray node to drain (hex); None drains the node this runs on.
        run: executes the drain command and returns its exit code (default: subprocess.call).
    """
    source = {"aws": AwsNotice, "gcp": GcpNotice}[cloud](base_url)
    run = run or (lambda cmd: subprocess.call(cmd))
    polls = 0
    while max_polls is None or polls < max_polls:
        polls += 1
        notice = source.poll()
        if notice is not None:
            deadline = notice["deadline_s"] if notice["deadline_s"] is not None else default_deadline_s
            cmd = drain_command(drain_cmd or ["ray"], notice["message"], deadline, node_id)
            log(f"spot_watcher: {notice['message']}; running: {shlex.join(cmd)}")
            rc = run(cmd)
            if rc != 0:
                log(f"spot_watcher: drain command exited {rc}")
            return 0
        time.sleep(interval_s)
    log(f"spot_watcher: no interruption notice after {polls} polls")
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cloud", choices=sorted(DEFAULT_URLS), default=os.environ.get("SPOT_WATCHER_CLOUD", "aws"))
    p.add_argument("--metadata-url", default=os.environ.get("SPOT_WATCHER_METADATA_URL"),
                   help="metadata service root (default: the cloud's link-local address)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls")
    p.add_argument("--deadline", type=int, default=None,
                   help="seconds until the node dies when the notice gives no time (default: aws 120, gcp 30)")
    p.add_argument("--max-polls", type=int, default=None, help="give up after N polls (tests); default: forever")
    p.add_argument("--drain-cmd", default=os.environ.get("SPOT_WATCHER_DRAIN_CMD", "ray"),
                   help="the ray executable, as a shell-quoted string (tests substitute a recorder)")
    p.add_argument("--node-id", default=os.environ.get("SPOT_WATCHER_NODE_ID"),
                   help="hex id of the Ray node to drain (default: the node this runs on; set it when "
                        "several raylets share one host)")
    args = p.parse_args(argv)
    url = args.metadata_url or DEFAULT_URLS[args.cloud]
    deadline = args.deadline if args.deadline is not None else DEFAULT_DEADLINES[args.cloud]
    return watch(args.cloud, url, interval_s=args.interval, default_deadline_s=deadline,
                 max_polls=args.max_polls, drain_cmd=shlex.split(args.drain_cmd), node_id=args.node_id)


if __name__ == "__main__":
    sys.exit(main())
