"""Bounded load test of the related-notes service on loopback, and batch embedding throughput.

For each replica count of `--replicas` it deploys rayjobs.serve on 127.0.0.1, then sends
`--requests` requests per route from `--concurrency` client threads, stopping after that many or
after `--duration` seconds, whichever comes first; it reports requests/s and p50/p99 latency of
`GET /related/{id}` and `POST /embed` (notes of `--data`, images inline). Then it times the batch
embedding of the whole catalogue two ways, end to end (pipeline start-up included): the resumable
job (`rayjobs.embed.run_embed`, into a temporary directory) and the evaluation's embedding path
(`rayjobs.evaluate.embed_with_ray`), in notes/s. It stops by itself; nothing is left running.

    python -m rayjobs.loadtest --index runs/index/smoke --data runs/data/synthetic-smoke \
        --requests 200 --duration 30 --concurrency 8 --replicas 1,2 --out runs/index/smoke/loadtest.json
    ray job submit --working-dir . -- python -m rayjobs.loadtest --index /mnt/shared/index/base \
        --data /mnt/shared/data/qilin --replicas 1,2,4
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def run_phase(make_request, requests: int, duration: float, concurrency: int) -> dict:
    """Call `make_request(session, i)` (-> HTTP status) from `concurrency` threads until `requests`
    calls are done or `duration` seconds passed; returns {"requests", "errors", "seconds", "rps", "p50_ms", "p99_ms"}."""
    import requests as http

    lock, counter, latencies, errors = threading.Lock(), [0], [], [0]
    deadline = time.monotonic() + duration

    def worker():
        session = http.Session()
        while time.monotonic() < deadline:
            with lock:
                if counter[0] >= requests:
                    return
                i = counter[0]
                counter[0] += 1
            start = time.perf_counter()
            try:
                ok = make_request(session, i) == 200
            except http.RequestException:
                ok = False
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                errors[0] += not ok

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    lat = np.asarray(latencies) * 1000.0
    return {"requests": len(lat), "errors": errors[0], "seconds": round(seconds, 3),
            "rps": round(len(lat) / seconds, 2) if seconds > 0 else None,
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None}


def _note_bodies(data_dir: str, ids: np.ndarray, n: int) -> list[dict]:
    from core.evaluation import read_notes

    table = read_notes(data_dir, note_ids=ids[:n], columns=["note_id", "title", "topics", "content", "image"])
    return [{"title": r["title"] or "", "topics": r["topics"] or [], "content": r["content"] or "",
             "image": base64.b64encode(r["image"]).decode() if r["image"] else None} for r in table.to_pylist()]


def load_test_service(index_dir: str, data_dir: str, replicas: list[int], *, requests: int, duration: float,
                      concurrency: int) -> list[dict]:
    """Rows {"replicas", "route", ...run_phase} for each replica count and route."""
    from ray import serve

    from core.related_index import read_embeddings
    from rayjobs import serve as serve_job

    ids, _ = read_embeddings(Path(index_dir) / "embeddings.parquet")
    bodies = _note_bodies(data_dir, ids, 64)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    rows = []
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for count in replicas:
            serve.run(serve_job.build_app({"index": index_dir, "replicas": count}), name=serve_job.APP_NAME,
                      route_prefix="/", blocking=False)
            _wait_ready(url, count)
            routes = {
                "GET /related": lambda s, i: s.get(f"{url}/related/{ids[i % len(ids)]}", params={"k": 10},
                                                   timeout=60).status_code,
                "POST /embed": lambda s, i: s.post(f"{url}/embed", json=bodies[i % len(bodies)], timeout=60).status_code,
            }
            for route, call in routes.items():
                run_phase(call, min(requests, 2 * concurrency), duration, concurrency)  # warm-up, not reported
                rows.append({"replicas": count, "route": route, **run_phase(call, requests, duration, concurrency)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        serve.shutdown()
    return rows


def _wait_ready(url: str, replicas: int, timeout: float = 300.0) -> None:
    """Until /healthz answers from `replicas` distinct replica processes (or timeout)."""
    import requests as http

    pids, deadline = set(), time.monotonic() + timeout
    while time.monotonic() < deadline and len(pids) < replicas:
        try:
            pids.add(http.get(f"{url}/healthz", timeout=10).json()["pid"])
        except (http.RequestException, ValueError, KeyError):
            time.sleep(0.5)
    if len(pids) < replicas:
        raise RuntimeError(f"{url}: only {len(pids)} of {replicas} replicas answered /healthz within {timeout:.0f} s")


def batch_embedding_rates(index_dir: str, data_dir: str, *, actors: int, batch_size: int) -> list[dict]:
    """notes/s of the resumable embed job and of the evaluation's embedding path, end to end."""
    from core.related_index import Manifest, read_embeddings
    from rayjobs.embed import run_embed
    from rayjobs.evaluate import embed_with_ray, run_config_of

    manifest = Manifest.read(Path(index_dir) / "manifest.json")
    ids, _ = read_embeddings(Path(index_dir) / "embeddings.parquet")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_embed(manifest.export, data_dir, Path(tmp) / "index", index_kind=manifest.index, actors=actors,
                  batch_size=batch_size)
        seconds = time.perf_counter() - start
        rows.append({"path": "rayjobs.embed (shards + index)", "notes": len(ids), "seconds": round(seconds, 2),
                     "notes_per_s": round(len(ids) / seconds, 1)})
    start = time.perf_counter()
    embed_with_ray(data_dir, run_config_of(manifest.export, None), ids, checkpoint=manifest.export, actors=actors,
                   batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - start
    rows.append({"path": "rayjobs.evaluate.embed_with_ray", "notes": len(ids), "seconds": round(seconds, 2),
                 "notes_per_s": round(len(ids) / seconds, 1)})
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def markdown(service_rows: list[dict], batch_rows: list[dict]) -> str:
    lines = ["| replicas | route | requests | errors | seconds | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['replicas']} | `{r['route']}` | {r['requests']} | {r['errors']} | {r['seconds']} | {r['rps']} | "
              f"{r['p50_ms']} | {r['p99_ms']} |" for r in service_rows]
    lines += ["", "| batch embedding (end to end) | notes | seconds | notes/s |", "|---|---|---|---|"]
    lines += [f"| `{r['path']}` | {r['notes']} | {r['seconds']} | {r['notes_per_s']} |" for r in batch_rows]
    return "\n".join(lines) + "\n"


def _replica_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--replicas {text!r}: expected comma-separated integers, e.g. 1,2") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--replicas {text!r}: expected integers >= 1")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayjobs.loadtest", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="index directory written by python -m rayjobs.embed")
    p.add_argument("--data", required=True, help="prepared data directory of the indexed notes")
    p.add_argument("--requests", type=int, default=200, help="requests per route and replica count")
    p.add_argument("--duration", type=float, default=30.0, help="seconds at most per route and replica count")
    p.add_argument("--concurrency", type=int, default=8, help="client threads")
    p.add_argument("--replicas", type=_replica_list, default=[1, 2], help="replica counts to test, e.g. 1,2")
    p.add_argument("--actors", type=int, default=1, help="actors of the batch-embedding comparison")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the batch-embedding comparison")
    p.add_argument("--skip-batch", action="store_true", help="only the service")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray (ignored with RAY_ADDRESS)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (Path(args.index) / "manifest.json").exists():
        print(f"rayjobs.loadtest: error: --index {args.index}: no manifest.json; build it with python -m rayjobs.embed",
              file=sys.stderr)
        return 2
    if args.requests < 1 or args.duration <= 0 or args.concurrency < 1:
        print("rayjobs.loadtest: error: --requests, --duration and --concurrency must be positive", file=sys.stderr)
        return 2
    from rayjobs.evaluate import init_ray

    init_ray(args.num_cpus or max(os.cpu_count() or 1, max(args.replicas) + args.actors + 3))
    before = _loadavg()
    service = load_test_service(args.index, args.data, args.replicas, requests=args.requests, duration=args.duration,
                                concurrency=args.concurrency)
    batch = [] if args.skip_batch else batch_embedding_rates(args.index, args.data, actors=args.actors,
                                                             batch_size=args.batch_size)
    after = _loadavg()
    print(markdown(service, batch), end="")
    print(f"/proc/loadavg before: {before}; after: {after}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"service": service, "batch": batch, "loadavg_before": before,
                                              "loadavg_after": after, "cpus": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
