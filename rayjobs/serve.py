"""Serve related notes over HTTP with Ray Serve, from an index directory written by rayjobs.embed.

Each replica loads the export (through rayjobs.evaluate's `NoteEmbedder`, the batch job's own
embedding code) and the index once. Routes (JSON):

    GET  /related/{note_id}?k=10  -> {"note_id": 7, "related": [{"note_id": 12, "score": 0.93}, ...]}  (7 excluded)
    POST /embed    {"title", "topics", "content", "image": base64 | "image_uri"} -> {"embedding": [...]}
    POST /related?k=10  the same note body -> {"related": [...]}   ("note_id" in the body excludes that note)
    GET  /healthz  -> {"status": "ok", "count", "dim", "index", "export_hash", "pid"}

Embedding requests are batched per replica (`@serve.batch`). A bad request answers 4xx with a one-line
`detail` (unknown note id 404, bad/missing field 400, undecodable image 400, image over the size limit
413, k out of range 400, missing or wrong token 401) and never takes the replica down. The service
binds 127.0.0.1 unless told otherwise; bound elsewhere it requires `--token` (or $NOTELLM2_SERVE_TOKEN),
sent as `Authorization: Bearer <token>` on every route but /healthz.

Local (starts a local Ray when RAY_ADDRESS is unset):

    python -m rayjobs.serve --index runs/index/smoke --port 8000 --replicas 1
    curl 'http://127.0.0.1:8000/related/3?k=5'

As a Serve application (config: cluster/serve.yaml, import path `rayjobs.serve:build_app`):

    serve run cluster/serve.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m rayjobs.serve \
        --index /mnt/shared/index/base --host 0.0.0.0 --token "$TOKEN" --replicas 2 --max-replicas 8
"""

# No `from __future__ import annotations` here: FastAPI resolves route parameters from real
# annotations, and string ones make it treat `request: Request` as a required query field (422).
import argparse
import asyncio
import base64
import binascii
import hmac
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from ray import serve

from core.related_index import MANIFEST_FILE, IndexDirError, Manifest, export_hash, finalize_embeddings, load_index_dir, search

DEFAULT_MAX_K = 100
DEFAULT_MAX_IMAGE_BYTES = 4 << 20
DEFAULT_MAX_BATCH_SIZE = 16
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_ENV = "NOTELLM2_SERVE_TOKEN"
APP_NAME = "notellm2-related"
TEXT_FIELDS = ("title", "content")

api = FastAPI(title="NoteLLM-2 related notes")


def _bad(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=" ".join(str(detail).split()))  # one line


def parse_k(text: str | None, max_k: int) -> int:
    """`k` query parameter -> int in 1..max_k, else a 400 naming the allowed range."""
    try:
        k = int(text) if text is not None else 10
    except ValueError:
        raise _bad(400, f"k {text!r}: not an integer (allowed 1..{max_k})") from None
    if not 1 <= k <= max_k:
        raise _bad(400, f"k {k}: out of range (allowed 1..{max_k})")
    return k


def parse_note(body: bytes, *, max_image_bytes: int, uri_prefixes: tuple[str, ...]) -> dict:
    """A JSON note body -> {"title", "topics", "content", "image" bytes | None}, or a 4xx HTTPException.

    `image` is base64 of the encoded file; `image_uri` is read only under one of `uri_prefixes`
    (none by default: a public service must not read arbitrary server files).
    """
    from core.data.images import decode_image, read_uri

    try:
        note = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _bad(400, "body: not a JSON object") from None
    if not isinstance(note, dict):
        raise _bad(400, "body: not a JSON object")
    missing = [f for f in TEXT_FIELDS if f not in note]
    if missing:
        raise _bad(400, f"missing field(s) {', '.join(missing)} (a note needs title, content; topics and image optional)")
    for f in TEXT_FIELDS:
        if not isinstance(note[f], str):
            raise _bad(400, f"field {f}: expected a string, got {type(note[f]).__name__}")
    topics = note.get("topics") or []
    if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
        raise _bad(400, "field topics: expected a list of strings")
    data = None
    if note.get("image") is not None:
        if not isinstance(note["image"], str):
            raise _bad(400, "field image: expected a base64 string")
        if len(note["image"]) > (max_image_bytes * 4) // 3 + 4:
            raise _bad(413, f"field image: over the size limit of {max_image_bytes} bytes")
        try:
            data = base64.b64decode(note["image"], validate=True)
        except (binascii.Error, ValueError):
            raise _bad(400, "field image: not valid base64") from None
    elif note.get("image_uri") is not None:
        uri = note["image_uri"]
        if not isinstance(uri, str) or not any(uri.startswith(p) for p in uri_prefixes):
            raise _bad(400, f"field image_uri: {str(uri)[:200]!r} is not under an allowed prefix "
                            f"({', '.join(uri_prefixes) or 'none configured: send the image as base64'})")
        try:
            data = read_uri(uri)
        except OSError as err:
            raise _bad(400, f"field image_uri: cannot read {uri[:200]!r} ({type(err).__name__})") from None
    if data is not None:
        if len(data) > max_image_bytes:
            raise _bad(413, f"image: {len(data)} bytes, over the size limit of {max_image_bytes} bytes")
        img, reason, _ = decode_image(data)
        if img is None:
            raise _bad(400, f"image: does not decode ({reason})")
    return {"title": note["title"], "topics": topics, "content": note["content"], "image": data,
            "note_id": note.get("note_id")}


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64, health_check_period_s=10)
@serve.ingress(api)
class RelatedNotes:
    """One replica: the export and the index, loaded once; HTTP routes in the module docstring."""

    def __init__(self, index: str, checkpoint: str | None = None, token: str | None = None, max_k: int = DEFAULT_MAX_K,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, image_uri_prefixes: tuple[str, ...] = (),
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, threads: int = 1):
        from core.data.pipeline import NotePreprocessor
        from rayjobs.evaluate import NoteEmbedder, run_config_of

        self.catalog = load_index_dir(index)
        manifest = self.catalog.manifest
        checkpoint = checkpoint or manifest.export
        if export_hash(checkpoint) != manifest.export_hash:
            raise RuntimeError(f"{checkpoint} is not the export {index} was built from (hash differs); "
                               f"rebuild the index with python -m rayjobs.embed")
        self.embedder = NoteEmbedder(checkpoint=checkpoint, threads=threads)
        self.preprocessor = NotePreprocessor(run_config_of(checkpoint, None).model)
        self.token = token or None
        self.max_k = max(1, min(int(max_k), len(self.catalog.ids) - 1))
        self.max_image_bytes = int(max_image_bytes)
        self.uri_prefixes = tuple(image_uri_prefixes or ())
        self._embed_one.set_max_batch_size(int(max_batch_size))

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise _bad(401, "missing or wrong token: send Authorization: Bearer <token>")

    @api.get("/healthz")
    def healthz(self) -> dict:
        m = self.catalog.manifest
        return {"status": "ok", "count": m.count, "dim": m.dim, "index": m.index, "export_hash": m.export_hash,
                "pid": os.getpid()}

    @api.get("/related/{note_id}")
    def related_by_id(self, note_id: str, request: Request) -> dict:
        self._authorize(request)
        k = parse_k(request.query_params.get("k"), self.max_k)
        try:
            nid = int(note_id)
        except ValueError:
            raise _bad(400, f"note_id {note_id[:100]!r}: not an integer") from None
        if self.catalog.rows_of([nid])[0] < 0:
            raise _bad(404, f"note {nid} is not in the index ({self.catalog.manifest.count} notes)")
        related = self.catalog.related([nid], k)[0]
        return {"note_id": nid, "related": [{"note_id": i, "score": s} for i, s in related]}

    @api.post("/embed")
    async def embed(self, request: Request) -> dict:
        self._authorize(request)
        note = await self._read_note(request)
        emb = await self._embed_one(note)
        return {"embedding": emb.tolist()}

    @api.post("/related")
    async def related_by_note(self, request: Request) -> dict:
        self._authorize(request)
        k = parse_k(request.query_params.get("k"), self.max_k)
        note = await self._read_note(request)
        emb = await self._embed_one(note)
        exclude = None
        if isinstance(note["note_id"], int):
            exclude = np.asarray([note["note_id"]], dtype=np.int64)
        related = search(self.catalog.index, self.catalog.ids, emb[None, :], k, exclude=exclude)[0]
        return {"related": [{"note_id": i, "score": s} for i, s in related]}

    async def _read_note(self, request: Request) -> dict:
        body = await request.body()
        if len(body) > 2 * self.max_image_bytes + (1 << 20):
            raise _bad(413, f"body: {len(body)} bytes, over the size limit")
        return parse_note(body, max_image_bytes=self.max_image_bytes, uri_prefixes=self.uri_prefixes)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=0.01)
    async def _embed_one(self, notes: list[dict]) -> list[np.ndarray]:
        # The forward is CPU/GPU-bound: run it off the event loop so /healthz stays responsive.
        return await asyncio.get_running_loop().run_in_executor(None, self._embed_notes, notes)

    def _embed_notes(self, notes: list[dict]) -> list[np.ndarray]:
        """Validated notes -> finalised embeddings float32 [dim] each, through the batch job's code."""
        import pyarrow as pa

        table = pa.table({
            "note_id": pa.array(np.arange(len(notes)), pa.int64()),
            "title": pa.array([n["title"] for n in notes], pa.string()),
            "topics": pa.array([n["topics"] for n in notes], pa.list_(pa.string())),
            "content": pa.array([n["content"] for n in notes], pa.string()),
            "image": pa.array([n["image"] for n in notes], pa.binary()),
            "image_uri": pa.array([None] * len(notes), pa.string()),
        })
        raw = self.embedder(self.preprocessor(table))["embedding"]  # [b, d]
        return list(finalize_embeddings(raw, self.catalog.manifest.dim))


def build_app(args: dict):
    """Application builder for `serve run` (cluster/serve.yaml): args are the CLI's options.

    Keys: index (required), checkpoint, token (or token_env: the name of an environment variable
    holding it), replicas, max_replicas (autoscaling from replicas to max_replicas), max_k,
    max_image_bytes, image_uri_prefixes, max_batch_size, num_cpus (per replica).
    """
    if not args.get("index"):
        raise ValueError("rayjobs.serve: the application needs args.index (a directory written by rayjobs.embed)")
    token = args.get("token") or (os.environ.get(args["token_env"]) if args.get("token_env") else None)
    replicas = int(args.get("replicas", 1))
    max_replicas = int(args.get("max_replicas") or replicas)
    num_cpus = float(args.get("num_cpus", 1))
    options: dict = {"ray_actor_options": {"num_cpus": num_cpus}}
    if max_replicas > replicas:
        options["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": max_replicas,
                                         "target_ongoing_requests": 8}
    else:
        options["num_replicas"] = replicas
    return RelatedNotes.options(**options).bind(
        index=str(args["index"]), checkpoint=args.get("checkpoint"), token=token,
        max_k=int(args.get("max_k", DEFAULT_MAX_K)), max_image_bytes=int(args.get("max_image_bytes", DEFAULT_MAX_IMAGE_BYTES)),
        image_uri_prefixes=tuple(args.get("image_uri_prefixes") or ()),
        max_batch_size=int(args.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)),
        threads=max(1, int(num_cpus)))


def start(args: dict, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME):
    """Start Serve's HTTP proxy on host:port and deploy the app (Ray must be initialised); returns its handle."""
    serve.start(http_options={"host": host, "port": int(port)})
    return serve.run(build_app(args), name=name, route_prefix="/", blocking=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayjobs.serve", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="index directory written by python -m rayjobs.embed")
    p.add_argument("--checkpoint", default=None, help="model export (default: the one named in OUT/manifest.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs --token")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"bearer token required on every route but "
                                                                      f"/healthz (default: ${TOKEN_ENV})")
    p.add_argument("--replicas", type=int, default=1, help="replicas (each loads the model and the index)")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscale between --replicas and this many")
    p.add_argument("--max-k", type=int, default=DEFAULT_MAX_K, help="largest k a request may ask for")
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES, help="largest accepted image file")
    p.add_argument("--image-uri-prefix", action="append", default=[], dest="image_uri_prefixes",
                   help="allow image_uri under this prefix (repeatable; none by default)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray (ignored with RAY_ADDRESS)")
    return p


def check_args(args) -> str | None:
    """The first problem with the arguments, as one line, or None."""
    manifest = Path(args.index) / MANIFEST_FILE
    if not manifest.exists():
        return f"--index {args.index}: no {MANIFEST_FILE}; build the index with python -m rayjobs.embed --out {args.index}"
    if args.host not in LOOPBACK_HOSTS and not args.token:
        return (f"--host {args.host}: binding beyond loopback needs --token (or ${TOKEN_ENV}); "
                "or keep 127.0.0.1 behind an authenticating reverse proxy")
    if args.replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.replicas):
        return "--replicas must be >= 1 and --max-replicas >= --replicas"
    if not 1 <= args.port <= 65535:
        return f"--port {args.port}: allowed 1..65535"
    if args.max_k < 1 or args.max_image_bytes < 1:
        return "--max-k and --max-image-bytes must be >= 1"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"rayjobs.serve: error: {problem}", file=sys.stderr)
        return 2
    from rayjobs.evaluate import init_ray

    manifest = Manifest.read(Path(args.index) / MANIFEST_FILE)
    init_ray(args.num_cpus or max(os.cpu_count() or 1, args.max_replicas or args.replicas) + 2)
    try:
        start({"index": args.index, "checkpoint": args.checkpoint, "token": args.token, "replicas": args.replicas,
               "max_replicas": args.max_replicas, "max_k": args.max_k, "max_image_bytes": args.max_image_bytes,
               "image_uri_prefixes": args.image_uri_prefixes}, host=args.host, port=args.port)
    except IndexDirError as err:
        print(f"rayjobs.serve: error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    print(f"serving {manifest.count} notes ({manifest.index} index, dim {manifest.dim}) on http://{args.host}:{args.port}: "
          "GET /related/{note_id}?k=10, POST /embed, POST /related, GET /healthz (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
