"""Typed, validated sweep specifications: one YAML file per sweep under `search_spaces/`.

A sweep names a base run config (`rayjobs/configs/*.yaml`), the metric that ranks trials (a key
that `rayjobs.train_worker` reports at validation: `R@<k>` for all pairs, `short_query/R@<k>`,
`short_target/R@<k>`, or `loss`), the parameters to search as `section.key` overrides of the
base config, the number of trials, the ASHA scheduler and the sampler seed.

Everything is checked at load time, like `core.config`: unknown keys fail with a did-you-mean,
every parameter's bounds / choices / fixed value are applied to the base config and validated by
`RunConfig`, so a sweep never launches a trial that would fail on a bad value.

    spec = load_sweep("search_spaces/smoke.yaml")
    cfg = spec.run_config({"model.num_visual_tokens": 2, "loss.alpha": 1.0})
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from core.config import ConfigError, RunConfig, load_run_config, with_values
from core.metrics import RECALL_KEY

PARAM_TYPES = ("choice", "uniform", "loguniform", "int", "fixed")
MODES = ("max", "min")
SCHEDULERS = ("asha", "fifo")
NON_RECALL_METRICS = ("loss",)
SECTIONS = get_type_hints(RunConfig)  # section name -> its dataclass


class SweepError(ConfigError):
    """A sweep file is invalid; the message names the file, the field and what is allowed."""


def _unknown(source: str, where: str, key: str, names: list[str]) -> SweepError:
    near = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(names)})"
    return SweepError(f"{source}: unknown key '{where}{key}'{hint}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


LIST_CHOICE = "list:"
"""Prefix of a list-valued choice as Optuna samples it: categoricals hold scalars only, so the
choice `[8, 16, 32]` (e.g. of `loss.matryoshka_dims`) is the string "list:[8, 16, 32]"."""


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def encode_choice(value: Any) -> Any:
    """A choice value as an Optuna categorical: lists become "list:<JSON>", scalars stay."""
    return LIST_CHOICE + json.dumps(value) if isinstance(value, list) else value


def decode_params(params: dict[str, Any]) -> dict[str, Any]:
    """Sampled (or fixed) `section.key` values as the config takes them: a "list:[8, 16]"
    categorical is the list it encodes, every other value passes through as it is."""
    def decode(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(LIST_CHOICE):
            return json.loads(value[len(LIST_CHOICE):])
        return value

    return {key: decode(value) for key, value in params.items()}


@dataclass
class ParameterSpec:
    """One searched (or pinned) `section.key` of the run config."""

    key: str
    """`section.key` of `core.config.RunConfig`, e.g. `model.num_visual_tokens`."""
    type: str
    """`choice` (categorical), `uniform`, `loguniform`, `int` (inclusive range) or `fixed`."""
    values: list | None = None
    """The categories of a `choice` parameter: scalars, or lists (e.g. `loss.matryoshka_dims: [[], [8, 16]]`)."""
    low: float | None = None
    """Lower bound (inclusive) of `uniform`, `loguniform`, `int`."""
    high: float | None = None
    """Upper bound (inclusive) of `uniform`, `loguniform`, `int`."""
    log: bool = False
    """`int` only: sample on a log scale."""
    value: Any = None
    """The value of a `fixed` parameter."""

    def __post_init__(self) -> None:
        k = f"parameters.{self.key}"
        if self.type not in PARAM_TYPES:
            raise SweepError(f"{k}.type={self.type!r} is invalid: allowed one of {', '.join(PARAM_TYPES)}")
        if self.type == "choice":
            if not isinstance(self.values, list) or not self.values:
                raise SweepError(f"{k}.values={self.values!r} is invalid: allowed a non-empty list")
            if not all(_scalar(v) or (isinstance(v, list) and all(_scalar(x) for x in v)) for v in self.values):
                raise SweepError(f"{k}.values={self.values!r} is invalid: allowed scalars or lists of scalars")
            if len(set(map(repr, self.values))) != len(self.values):
                raise SweepError(f"{k}.values={self.values!r} is invalid: allowed distinct values")
        elif self.type in ("uniform", "loguniform", "int"):
            for name in ("low", "high"):
                if not _is_number(getattr(self, name)):
                    raise SweepError(f"{k}.{name}={getattr(self, name)!r} is invalid: allowed a finite number")
            if self.type == "int" and not all(isinstance(v, int) for v in (self.low, self.high)):
                raise SweepError(f"{k}: int bounds must be integers, got low={self.low!r} high={self.high!r}")
            if not self.low < self.high:
                raise SweepError(f"{k}: low={self.low!r} must be below high={self.high!r}")
            if (self.type == "loguniform" or self.log) and self.low <= 0:
                raise SweepError(f"{k}.low={self.low!r} is invalid: a log scale needs low > 0")
        if self.type != "choice" and self.values is not None:
            raise SweepError(f"{k}: 'values' only applies to type choice")
        if self.type != "int" and self.log:
            raise SweepError(f"{k}: 'log' only applies to type int (use type loguniform for floats)")
        if self.type != "fixed" and self.value is not None:
            raise SweepError(f"{k}: 'value' only applies to type fixed")
        if self.type in ("choice", "fixed") and (self.low is not None or self.high is not None):
            raise SweepError(f"{k}: 'low'/'high' do not apply to type {self.type}")

    @property
    def searched(self) -> bool:
        return self.type != "fixed"

    def probe_values(self) -> list:
        """Values that must all give a valid RunConfig: every choice, both bounds, the fixed value."""
        if self.type == "choice":
            return list(self.values)
        if self.type == "fixed":
            return [self.value]
        return [self.low, self.high]

    def optuna_distribution(self):
        """The Optuna distribution this parameter samples from (`fixed` has none)."""
        import optuna.distributions as od

        if self.type == "choice":
            return od.CategoricalDistribution([encode_choice(v) for v in self.values])
        if self.type == "uniform":
            return od.FloatDistribution(float(self.low), float(self.high))
        if self.type == "loguniform":
            return od.FloatDistribution(float(self.low), float(self.high), log=True)
        if self.type == "int":
            return od.IntDistribution(int(self.low), int(self.high), log=self.log)
        raise ValueError(f"{self.key}: a fixed parameter has no distribution")


@dataclass
class SchedulerSpec:
    """Early stopping of trials on the sweep metric."""

    type: str = "asha"
    """`asha` (ray.tune.schedulers.ASHAScheduler) or `fifo` (run every trial to the end)."""
    max_t: int = 2
    """ASHA: the most epoch-end validation rounds a trial reports (usually `train.epochs`)."""
    grace_period: int = 1
    """ASHA: epoch-end validation rounds every trial gets before it can be stopped."""
    reduction_factor: float = 2.0
    """ASHA: keep the top 1/reduction_factor of trials at each rung."""

    def __post_init__(self) -> None:
        if self.type not in SCHEDULERS:
            raise SweepError(f"scheduler.type={self.type!r} is invalid: allowed one of {', '.join(SCHEDULERS)}")
        for name in ("max_t", "grace_period"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SweepError(f"scheduler.{name}={v!r} is invalid: allowed an integer >= 1")
        if self.grace_period > self.max_t:
            raise SweepError(f"scheduler.grace_period={self.grace_period} must not exceed max_t={self.max_t}")
        if not _is_number(self.reduction_factor) or self.reduction_factor <= 1:
            raise SweepError(f"scheduler.reduction_factor={self.reduction_factor!r} is invalid: allowed a number > 1")


@dataclass
class SweepSpec:
    """One hyperparameter sweep: base run config, metric, parameters, trial budget, scheduler."""

    base_config: str
    """Run config YAML the trials start from (relative paths resolve against the working directory)."""
    metric: str
    """Reported metric that ranks trials: `R@<k>`, `short_query/R@<k>`, `short_target/R@<k>` or `loss`."""
    mode: str = "max"
    """`max` for recall, `min` for loss."""
    parameters: dict[str, ParameterSpec] = field(default_factory=dict)
    """`section.key` -> parameter spec; at least one must be searched."""
    num_samples: int = 8
    """Trials Optuna proposes (override with `--num-samples`)."""
    seed: int = 0
    """Seed of Optuna's TPE sampler: the same sweep proposes the same trials."""
    name: str = ""
    """Sweep name (Tune experiment, Optuna study); empty uses the file name."""
    storage: str = "runs/tune"
    """Directory (or URI) the sweep directory `<storage>/<name>/` goes under."""
    driver_cpus: float = 1.0
    """CPUs reserved for each trial's driver (the function that runs the TorchTrainer)."""
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    """Early stopping (ASHA) settings."""
    description: str = ""
    """One line on what the sweep is for."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SweepError(f"mode={self.mode!r} is invalid: allowed one of {', '.join(MODES)}")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise SweepError(f"num_samples={self.num_samples!r} is invalid: allowed an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SweepError(f"seed={self.seed!r} is invalid: allowed an integer")
        if not _is_number(self.driver_cpus) or self.driver_cpus < 0:
            raise SweepError(f"driver_cpus={self.driver_cpus!r} is invalid: allowed a number >= 0")
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]*", self.name):
            raise SweepError(f"name={self.name!r} is invalid: allowed letters, digits, '_', '.', '-'")
        if not any(p.searched for p in self.parameters.values()):
            raise SweepError("parameters: at least one parameter must be searched (type other than fixed)")
        if not RECALL_KEY.match(self.metric) and self.metric not in NON_RECALL_METRICS:
            hint = ""
            if self.metric.startswith("all/"):
                hint = f" (all-pairs recall is reported without a prefix: '{self.metric[4:]}')"
            raise SweepError(f"metric={self.metric!r} is invalid: allowed 'R@<k>', 'short_query/R@<k>', "
                             f"'short_target/R@<k>' or 'loss'{hint}")

    @property
    def searched(self) -> dict[str, ParameterSpec]:
        return {k: p for k, p in self.parameters.items() if p.searched}

    @property
    def fixed(self) -> dict[str, Any]:
        return {k: p.value for k, p in self.parameters.items() if not p.searched}

    def base_raw(self) -> dict:
        """The base config as a plain dict, with the fixed parameters applied."""
        return with_values(load_run_config(self.base_config).to_dict(), decode_params(self.fixed))

    def run_config(self, params: dict[str, Any], base: dict | None = None) -> RunConfig:
        """The RunConfig of one trial: base config + fixed parameters + the trial's sampled values."""
        raw = base if base is not None else self.base_raw()
        return RunConfig.from_dict(with_values(raw, decode_params(params)), f"sweep {self.name}")

    def optuna_space(self) -> dict:
        """`section.key` -> Optuna distribution for every searched parameter."""
        return {k: p.optuna_distribution() for k, p in self.searched.items()}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse_parameters(raw: Any, source: str) -> dict[str, ParameterSpec]:
    if not isinstance(raw, dict) or not raw:
        raise SweepError(f"{source}: 'parameters' must be a non-empty mapping of section.key -> spec")
    names = [f.name for f in dataclasses.fields(ParameterSpec) if f.name != "key"]
    out = {}
    for key, spec in raw.items():
        section, dot, name = str(key).partition(".")
        if not dot:
            raise SweepError(f"{source}: parameter '{key}' must be written section.key, e.g. loss.alpha")
        if section not in SECTIONS:
            raise _unknown(source, "parameters.", section, list(SECTIONS))
        fields_ = [f.name for f in dataclasses.fields(SECTIONS[section])]
        if name not in fields_:
            raise _unknown(source, f"parameters.{section}.", name, fields_)
        if not isinstance(spec, dict):  # a bare value pins the key: `train.max_steps: 8`
            spec = {"type": "fixed", "value": spec}
        for k in spec:
            if k not in names:
                raise _unknown(source, f"parameters.{key}.", k, names)
        try:
            out[key] = ParameterSpec(key=key, **spec)
        except SweepError as err:
            raise SweepError(f"{source}: {err}") from None
    return out


def sweep_from_dict(raw: Any, source: str = "sweep", base_dir: str | os.PathLike | None = None) -> SweepSpec:
    """Build and fully validate a SweepSpec (including every parameter value against RunConfig)."""
    if not isinstance(raw, dict):
        raise SweepError(f"{source}: a sweep file must be a mapping")
    names = [f.name for f in dataclasses.fields(SweepSpec)]
    for key in raw:
        if key not in names:
            raise _unknown(source, "", key, names)
    for required in ("base_config", "metric", "parameters"):
        if required not in raw:
            raise SweepError(f"{source}: missing required key '{required}'")
    kwargs = dict(raw)
    kwargs["parameters"] = _parse_parameters(raw["parameters"], source)
    sched = raw.get("scheduler") or {}
    if not isinstance(sched, dict):
        raise SweepError(f"{source}: 'scheduler' must be a mapping")
    sched_names = [f.name for f in dataclasses.fields(SchedulerSpec)]
    for key in sched:
        if key not in sched_names:
            raise _unknown(source, "scheduler.", key, sched_names)
    try:
        kwargs["scheduler"] = SchedulerSpec(**sched)
        if isinstance(kwargs.get("driver_cpus"), int):
            kwargs["driver_cpus"] = float(kwargs["driver_cpus"])
        spec = SweepSpec(**kwargs)
    except SweepError as err:
        raise SweepError(f"{source}: {err}") from None
    except TypeError as err:
        raise SweepError(f"{source}: {err}") from None
    if not spec.name:
        spec.name = Path(source).stem if source != "sweep" else "sweep"
    base = Path(spec.base_config)
    if not base.is_absolute() and not base.exists() and base_dir is not None:
        # a sweep shipped in the repo names its base relative to the repo root
        candidate = Path(base_dir) / base
        if candidate.exists():
            spec.base_config = str(candidate)
    _check_against_base(spec, source)
    return spec


def _check_against_base(spec: SweepSpec, source: str) -> None:
    """Every probe value of every parameter must give a valid RunConfig; the metric must be reported."""
    try:
        base = spec.base_raw()
    except ConfigError as err:
        raise SweepError(f"{source}: base_config: {err}") from None
    for key, param in spec.searched.items():
        for value in param.probe_values():
            try:
                spec.run_config({key: value}, base)
            except ConfigError as err:
                raise SweepError(f"{source}: parameters.{key} value {value!r} gives an invalid run config: {err}") from None
    m = RECALL_KEY.match(spec.metric)
    if m:
        ks = RunConfig.from_dict(base).eval.ks
        swept_ks = spec.parameters.get("eval.ks")
        if swept_ks is None and int(m.group(2)) not in ks:
            raise SweepError(f"{source}: metric={spec.metric!r} is never reported: the base config's "
                             f"eval.ks is {ks} (add {m.group(2)} or pick one of those)")
    if spec.scheduler.type == "asha":
        # ASHA decides on epoch-end validations only (the final report is never a stopping point)
        run = RunConfig.from_dict(base)
        if not run.eval.every_epoch:
            raise SweepError(f"{source}: scheduler.type=asha needs eval.every_epoch=true in the base config "
                             "(it stops trials on epoch-end validation); use scheduler.type=fifo otherwise")
        if spec.scheduler.grace_period > run.train.epochs:
            raise SweepError(f"{source}: scheduler.grace_period={spec.scheduler.grace_period} exceeds the "
                             f"epoch-end validation rounds a trial reports (train.epochs = {run.train.epochs})")


def load_sweep(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep YAML; relative `base_config` resolves against the working directory,
    then against the repository root (the parent of `search_spaces/`)."""
    p = Path(path)
    if not p.exists():
        raise SweepError(f"sweep file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{p}: not valid YAML: {str(err).splitlines()[0]}") from None
    return sweep_from_dict(raw, str(p), base_dir=Path(__file__).resolve().parent.parent)
