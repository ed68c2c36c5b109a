"""Frozen-feature cache: the vision encoder's outputs for every note, computed once per corpus.

    cache = feature_cache_for(model.vision, run_cfg)    # None when off; builds, verifies or rebuilds
    notes = cache.attach(notes)                          # + vision_patches, vision_cls, has_image by note_id
    model(**core.step.model_inputs(notes, device))      # image_features= instead of pixel_values=

The vision encoder is frozen for good (`core.model.vision`), so its outputs for a note's image
never change during a run, a sweep, or any later run on the same corpus. With the cache they are
computed once by a plain batched pass (decode -> resize -> encoder, `build_feature_cache`) and
stored beside the prepared data:

    <data.path>/feature_cache/<key>/
        note_ids.npy      int64 [N]            sorted note ids of notes.parquet
        patches.npy       float32 [N, L_p, h_v] patch tokens at model.image_size
        cls.npy           float32 [N, h_v]     the pooled (CLS) feature
        has_image.npy     bool [N]             False: no usable image (blank + has_image False)
        blank_patches.npy float32 [L_p, h_v]   the blank (all-zero) image: image-less notes and
        blank_cls.npy     float32 [h_v]        the text ablation (`core.embedding.apply_modality`)
        manifest.json     key, its parts, shapes and every file's size + BLAKE2b digest (written last)

`<key>` hashes the encoder (class, every weight, normalisation, image size), the image
preprocessing (`PREPROCESSING`: decoding rules, resize and pad) and every note's image bytes; a
change in any of them is a new key and a new computation, and the message names what changed. A
cache whose manifest is missing or unreadable, whose file sizes or digests disagree with it, or
whose arrays have the wrong shapes is corrupt: it is deleted and rebuilt with a message on stdout,
never used. Building runs under a file lock, so Train ranks and evaluation actors that start
together compute it once. Older keys' directories stay (a sweep may train several image sizes
at once); delete `<data.path>/feature_cache/` to reclaim the space.

Image bytes come from notes.parquet (`image`, or the file behind `image_uri`), read through the
same `core.data.images.load_pixels` the streaming pipeline uses, so cached and live features are
the same numbers (the equality test: tests/core/data/test_features.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from core.data.schema import NOTES_FILE, data_path

CACHE_DIR = "feature_cache"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
ARRAYS = ("note_ids", "patches", "cls", "has_image", "blank_patches", "blank_cls")
PREPROCESSING = "load_pixels v1: RGB (alpha on white), fit longer side (bilinear), pad white, uint8 [3,S,S]"
"""What `core.data.images.load_pixels` does to an image; change it whenever that function changes."""
BUILD_BATCH = 64

# Verified caches of this process: (directory, stat signature) -> FeatureCache. A signature change
# (a file rewritten, truncated or removed) verifies the digests again.
_VERIFIED: dict = {}
# Off-reasons already printed by this process (a sweep would repeat them every trial).
_REPORTED: set = set()
# Image digests of notes.parquet files of this process: (path, size, mtime_ns) -> hex digest.
_IMAGE_DIGESTS: dict = {}


def feature_cache_off_reason(run_cfg, data_dir: str | None = None) -> str | None:
    """Why the feature cache is not used for this run (data in `data_dir`, default `data.path`), or None.

    The vision encoder is always frozen (`core.model.builders`) and the pipeline applies no random
    image augmentation (images are resized and padded deterministically); an option for either
    must return a reason here, since a cached feature would then no longer be what the encoder sees.
    """
    from core.data.pipeline import needs_image

    if run_cfg.data.feature_cache == "off":
        return "data.feature_cache=off"
    if not needs_image(run_cfg.model):
        return "the model reads no images"
    path = str(data_dir or run_cfg.data.path)
    if "://" in path:
        return f"data.path={path} is remote (the cache lives beside local or NFS prepared data)"
    return None


class FeatureCache:
    """A verified cache directory, memory-mapped; `attach` looks notes up by id."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory = Path(directory)
        self.manifest = manifest
        arrays = {name: np.load(self.directory / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        self.note_ids = np.asarray(arrays["note_ids"])
        self.patches, self.cls = arrays["patches"], arrays["cls"]
        self.has_image = np.asarray(arrays["has_image"])
        self.blank = (torch.from_numpy(np.array(arrays["blank_patches"])), torch.from_numpy(np.array(arrays["blank_cls"])))

    def lookup(self, note_ids) -> dict:
        """int64 note ids [N] -> {vision_patches [N, L_p, h_v], vision_cls [N, h_v], has_image [N]} tensors."""
        ids = np.asarray(torch.as_tensor(note_ids).cpu().numpy() if isinstance(note_ids, torch.Tensor) else note_ids,
                         dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.note_ids, ids), max(len(self.note_ids) - 1, 0))
        found = self.note_ids[pos] == ids if len(self.note_ids) else np.zeros(len(ids), dtype=bool)
        if not found.all():
            raise KeyError(f"{self.directory}: note ids {ids[~found][:5].tolist()} are not in the feature cache "
                           f"(built for another notes.parquet?)")
        return {
            "vision_patches": torch.from_numpy(np.ascontiguousarray(self.patches[pos])),  # [N, L_p, h_v]
            "vision_cls": torch.from_numpy(np.ascontiguousarray(self.cls[pos])),  # [N, h_v]
            "has_image": torch.from_numpy(self.has_image[pos].copy()),  # [N]
        }

    def attach(self, notes: dict) -> dict:
        """A note batch (`note_id` column) with its cached features and has_image added; pixels dropped."""
        out = {k: v for k, v in notes.items() if k != "pixel_values"}
        out.update(self.lookup(notes["note_id"]))
        return out


def encoder_digest(vision) -> str:
    """BLAKE2b of what the encoder computes: its class, image size, normalisation and every weight."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(vision).__module__}.{type(vision).__qualname__}:{vision.image_size}".encode())
    for name, t in sorted({**dict(vision.named_buffers()), **vision.state_dict()}.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def images_digest(data_dir: str) -> str:
    """BLAKE2b over (note_id, image bytes or the bytes behind image_uri) of every note, in id order."""
    from core.data.images import read_uri
    from core.data.schema import read_table

    path = data_path(data_dir, NOTES_FILE)
    st = os.stat(path)
    memo = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if memo in _IMAGE_DIGESTS:
        return _IMAGE_DIGESTS[memo]
    table = read_table(path, columns=["note_id", "image", "image_uri"])
    ids = table["note_id"].to_numpy()
    images, uris = table["image"].to_pylist(), table["image_uri"].to_pylist()
    h = hashlib.blake2b(digest_size=16)
    for i in np.argsort(ids, kind="stable"):
        data = images[i]
        if data is None and uris[i]:
            try:
                data = read_uri(uris[i])
            except OSError:
                data = b"unreadable:" + uris[i].encode()
        h.update(int(ids[i]).to_bytes(8, "little", signed=True))
        h.update(len(data).to_bytes(8, "little") if data is not None else b"none")
        h.update(data or b"")
    _IMAGE_DIGESTS[memo] = h.hexdigest()
    return _IMAGE_DIGESTS[memo]


def cache_key_parts(vision, data_dir: str) -> dict:
    """The three things a cached feature depends on, each as a digest or a description."""
    from core.data.images import MAX_IMAGE_PIXELS

    return {"encoder": encoder_digest(vision), "image_size": int(vision.image_size),
            "preprocessing": f"{PREPROCESSING}; max_pixels={MAX_IMAGE_PIXELS}", "images": images_digest(data_dir)}


def cache_key(parts: dict) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=10).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _signature(directory: Path) -> tuple:
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir()))


def cache_problem(directory: Path, key: str, num_patches: int, feature_dim: int) -> str | None:
    """Why `directory` is not a complete, intact cache for `key`, or None when it is."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST} (an interrupted build)"
    except (OSError, ValueError) as err:
        return f"{MANIFEST} unreadable ({type(err).__name__})"
    if not isinstance(manifest, dict) or manifest.get("key") != key or manifest.get("version") != FORMAT_VERSION:
        return f"{MANIFEST} is for another key or format"
    files = manifest.get("files") or {}
    for name in ARRAYS:
        f, want = directory / f"{name}.npy", files.get(f"{name}.npy") or {}
        if not f.exists():
            return f"{f.name} is missing"
        if f.stat().st_size != want.get("bytes"):
            return f"{f.name} has {f.stat().st_size} bytes, the manifest says {want.get('bytes')} (truncated or rewritten)"
        if _file_digest(f) != want.get("blake2b"):
            return f"{f.name} does not match its checksum (corrupt)"
    n = int(manifest.get("num_notes", -1))
    shapes = {"note_ids": (n,), "patches": (n, num_patches, feature_dim), "cls": (n, feature_dim), "has_image": (n,),
              "blank_patches": (num_patches, feature_dim), "blank_cls": (feature_dim,)}
    for name, shape in shapes.items():
        try:
            got = np.load(directory / f"{name}.npy", mmap_mode="r").shape
        except (OSError, ValueError) as err:
            return f"{name}.npy unreadable ({type(err).__name__})"
        if got != shape:
            return f"{name}.npy has shape {got}, expected {shape}"
    return None


def _what_changed(root: Path, parts: dict) -> str:
    """Which key part differs from the newest other cache under `root` (for the rebuild message)."""
    others = sorted(root.glob(f"*/{MANIFEST}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for manifest in others:
        try:
            old = json.loads(manifest.read_text()).get("parts") or {}
        except (OSError, ValueError):
            continue
        changed = [k for k in parts if old.get(k) != parts[k]]
        if changed:
            detail = {"image_size": f"image_size {old.get('image_size')} -> {parts['image_size']}"}
            return "; changed since " + manifest.parent.name + ": " + ", ".join(detail.get(k, k) for k in changed)
    return ""


@torch.no_grad()
def build_feature_cache(vision, data_dir: str, directory: Path, key: str, parts: dict, batch_size: int = BUILD_BATCH) -> None:
    """Encode every note's image once (plain batched pass) and write the cache atomically to `directory`."""
    from core.data.images import load_pixels
    from core.data.schema import read_table

    table = read_table(data_path(data_dir, NOTES_FILE), columns=["note_id", "image", "image_uri"])
    order = np.argsort(table["note_id"].to_numpy(), kind="stable")
    table = table.take(order)
    ids = table["note_id"].to_numpy().astype(np.int64)
    images, uris = table["image"].to_pylist(), table["image_uri"].to_pylist()
    size, n = int(vision.image_size), len(ids)
    device = next(vision.parameters()).device
    blank_p, blank_c = vision(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device))  # [1, L_p, h_v], [1, h_v]
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    patches = np.lib.format.open_memmap(partial / "patches.npy", mode="w+", dtype=np.float32,
                                        shape=(n, *blank_p.shape[1:]))
    cls = np.lib.format.open_memmap(partial / "cls.npy", mode="w+", dtype=np.float32, shape=(n, blank_c.shape[1]))
    has = np.zeros(n, dtype=bool)
    for start in range(0, n, batch_size):
        rows = range(start, min(start + batch_size, n))
        pixels = np.zeros((len(rows), 3, size, size), dtype=np.uint8)
        for j, i in enumerate(rows):
            pixels[j], has[i], _ = load_pixels(images[i], uris[i], size)
        sel = np.flatnonzero(has[start:start + len(rows)])
        patches[start:start + len(rows)] = blank_p.float().cpu().numpy()  # image-less notes: the blank image's features
        cls[start:start + len(rows)] = blank_c.float().cpu().numpy()
        if len(sel):
            p, c = vision(torch.from_numpy(pixels[sel]).to(device))  # [n_img, L_p, h_v], [n_img, h_v]
            patches[start + sel] = p.float().cpu().numpy()
            cls[start + sel] = c.float().cpu().numpy()
    patches.flush()
    cls.flush()
    del patches, cls
    np.save(partial / "note_ids.npy", ids)
    np.save(partial / "has_image.npy", has)
    np.save(partial / "blank_patches.npy", blank_p[0].float().cpu().numpy())
    np.save(partial / "blank_cls.npy", blank_c[0].float().cpu().numpy())
    files = {f"{name}.npy": {"bytes": (partial / f"{name}.npy").stat().st_size,
                             "blake2b": _file_digest(partial / f"{name}.npy")} for name in ARRAYS}
    manifest = {"version": FORMAT_VERSION, "key": key, "parts": parts, "num_notes": n, "with_image": int(has.sum()),
                "files": files}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: no manifest means incomplete
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)


def ensure_feature_cache(vision, data_dir: str) -> FeatureCache:
    """The verified cache of `vision`'s features for the notes of `data_dir`; built or rebuilt as needed.

    Args:
        vision: the frozen `core.model.vision` encoder the model uses (its weights are part of the key).
        data_dir: local prepared data directory.

    Raises:
        ValueError: when the encoder has trainable parameters (its features are not fixed).
        RuntimeError: when the cache directory cannot be written (one line naming it and the fix).
    """
    if any(p.requires_grad for p in vision.parameters()):
        raise ValueError("the feature cache needs a frozen vision encoder; set data.feature_cache=off")
    parts = cache_key_parts(vision, data_dir)
    key = cache_key(parts)
    root = Path(data_dir) / CACHE_DIR
    directory = root / key
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".lock", "w")
    except OSError as err:
        raise RuntimeError(f"{root}: cannot write the feature cache ({err.strerror or err}); "
                           "set data.feature_cache=off or make the data directory writable") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait, then verify its result
        if directory.is_dir():
            memo = (str(directory), _signature(directory))
            if memo in _VERIFIED:
                return _VERIFIED[memo]
            problem = cache_problem(directory, key, vision.num_patches, vision.feature_dim)
            if problem is None:
                cache = FeatureCache(directory, json.loads((directory / MANIFEST).read_text()))
                _VERIFIED[(str(directory), _signature(directory))] = cache
                return cache
            print(f"[features] cache {directory} is unusable ({problem}); rebuilding it", flush=True)
        else:
            print(f"[features] no feature cache for this encoder, preprocessing and images (key {key}"
                f"{_what_changed(root, parts)}); computing it in {directory}", flush=True)
        t0 = time.monotonic()
        build_feature_cache(vision, data_dir, directory, key, parts)
        manifest = json.loads((directory / MANIFEST).read_text())
        print(f"[features] cached {manifest['num_notes']} notes ({manifest['with_image']} with an image) in "
            f"{time.monotonic() - t0:.1f} s", flush=True)
        cache = FeatureCache(directory, manifest)
        _VERIFIED[(str(directory), _signature(directory))] = cache
        return cache


def feature_cache_for(vision, run_cfg, data_dir: str | None = None) -> FeatureCache | None:
    """`ensure_feature_cache` for a run (notes of `data_dir`, default `data.path`), or None when it
    is off (the reason printed once per process)."""
    reason = feature_cache_off_reason(run_cfg, data_dir)
    if reason is not None:
        if reason not in _REPORTED and reason != "the model reads no images":
            _REPORTED.add(reason)
            print(f"[features] frozen-feature cache off: {reason}; images are decoded and encoded every step", flush=True)
        return None
    if vision is None:
        return None
    return ensure_feature_cache(vision, str(data_dir or run_cfg.data.path))
