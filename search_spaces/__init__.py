"""Hyperparameter sweeps: one validated YAML per sweep (see `schema.py` for the format).

    python -m rayjobs.tune --space search_spaces/smoke.yaml
"""

from pathlib import Path

from search_spaces.schema import ParameterSpec, SchedulerSpec, SweepError, SweepSpec, load_sweep, sweep_from_dict

SPACES_DIR = Path(__file__).resolve().parent


def shipped_spaces() -> list[Path]:
    """Every sweep YAML shipped in this package."""
    return sorted(SPACES_DIR.glob("*.yaml"))


__all__ = ["ParameterSpec", "SchedulerSpec", "SweepError", "SweepSpec", "load_sweep", "shipped_spaces",
           "sweep_from_dict", "SPACES_DIR"]
