"""The sweep schema: the shipped sweeps hold what their briefs ask for, parameters become
`--set` overrides, and bad sweeps are rejected with messages naming the field. Every shipped
sweep is loaded and validated in tests/test_configs.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.config import ConfigError
from search_spaces import SweepError, load_sweep, sweep_from_dict
from search_spaces.schema import decode_params

REPO = Path(__file__).resolve().parent.parent
SMOKE_BASE = str(REPO / "rayjobs/configs/smoke.yaml")


def _sweep(**over) -> dict:
    raw = {
        "base_config": SMOKE_BASE, "metric": "R@10", "mode": "max", "num_samples": 3,
        "parameters": {"loss.alpha": {"type": "choice", "values": [1.0, 9.0]}},
        "scheduler": {"type": "asha", "max_t": 2, "grace_period": 1, "reduction_factor": 2},
    }
    raw.update(over)
    return raw


def test_smoke_space_matches_the_brief():
    spec = load_sweep(REPO / "search_spaces/smoke.yaml")
    assert spec.num_samples == 3 and spec.metric == "R@5" and spec.mode == "max"
    assert set(spec.searched) == {"model.num_visual_tokens", "loss.alpha", "loss.temperature_init"}
    assert spec.parameters["loss.temperature_init"].type == "loguniform"
    cfg = spec.run_config({"model.num_visual_tokens": 2, "loss.alpha": 1.0, "loss.temperature_init": 1.7})
    assert (cfg.model.num_visual_tokens, cfg.loss.alpha, cfg.loss.temperature_init) == (2, 1.0, 1.7)


def test_paper_space_covers_the_ablation_grid():
    spec = load_sweep(REPO / "search_spaces/paper.yaml")
    p = spec.parameters
    assert p["model.num_visual_tokens"].values == [8, 16, 32, 48]
    assert p["loss.alpha"].values == [1.0, 3.0, 9.0, 19.0]
    assert p["loss.temperature_init"].type == "loguniform" and p["train.lr"].type == "loguniform"
    assert {"model.lora_rank", "model.prompt_mode", "model.late_fusion"} <= set(spec.searched)
    assert spec.metric == "R@100"
    cfg = spec.run_config({})
    assert cfg.model.lora is True  # fixed: lora_rank is only meaningful with LoRA


def test_sampled_values_reach_the_config_typed_and_revalidated():
    """No text round trip: a sampled value is the config's value; a "list:" choice decodes once."""
    params = {"loss.alpha": 3.0, "model.prompt_mode": "micl", "model.late_fusion": False, "train.lr": 1e-5,
              "loss.matryoshka_dims": "list:[8, 16]", "train.name": "null"}
    assert decode_params(params) == {**params, "loss.matryoshka_dims": [8, 16]}  # "null" stays a string
    spec = sweep_from_dict(_sweep(), "t.yaml")
    cfg = spec.run_config({"model.prompt_mode": "basic", "train.lr": 1e-5, "model.late_fusion": False})
    assert (cfg.model.prompt_mode, cfg.train.lr, cfg.model.late_fusion) == ("basic", 1e-5, False)
    with pytest.raises(ConfigError, match="alpha"):
        spec.run_config({"loss.alpha": -1.0})  # the typed value is validated like a file's
    with pytest.raises(ConfigError, match="did you mean 'loss'"):
        spec.run_config({"los.alpha": 3.0})


@pytest.mark.parametrize("over, message", [
    ({"metrc": "R@10"}, "did you mean 'metric'"),
    ({"parameters": {"loss.alpah": {"type": "choice", "values": [1.0]}}}, "did you mean 'alpha'"),
    ({"parameters": {"los.alpha": {"type": "choice", "values": [1.0]}}}, "did you mean 'loss'"),
    ({"parameters": {"alpha": {"type": "choice", "values": [1.0]}}}, "section.key"),
    ({"parameters": {"loss.alpha": {"type": "choise", "values": [1.0]}}}, "choice"),
    ({"parameters": {"loss.alpha": {"type": "choice", "valeus": [1.0]}}}, "did you mean 'values'"),
    ({"parameters": {"loss.alpha": {"type": "uniform", "low": 2.0, "high": 1.0}}}, "must be below"),
    ({"parameters": {"loss.alpha": {"type": "loguniform", "low": 0.0, "high": 1.0}}}, "log scale"),
    ({"parameters": {"loss.alpha": {"type": "choice", "values": [1.0, -1.0]}}}, "loss.alpha"),
    ({"parameters": {"model.prompt_mode": {"type": "choice", "values": ["micl", "fancy"]}}}, "prompt_mode"),
    ({"parameters": {"loss.alpha": {"type": "fixed", "value": 3.0}}}, "at least one parameter"),
    ({"metric": "all/R@10"}, "reported without a prefix: 'R@10'"),
    ({"metric": "R@7"}, "never reported"),
    ({"mode": "maximum"}, "mode"),
    ({"num_samples": 0}, "num_samples"),
    ({"scheduler": {"type": "hyperband"}}, "scheduler.type"),
    ({"scheduler": {"max_tt": 3}}, "did you mean 'max_t'"),
    ({"scheduler": {"max_t": 2, "grace_period": 3}}, "grace_period"),
    ({"base_config": "nope/missing.yaml"}, "not found"),
    ({"parameters": {"loss.matryoshka_dims": {"type": "choice", "values": [[], [4, 32]]}}}, "loss.matryoshka_dims"),
    ({"parameters": {"loss.grad_cache_chunk_size": {"type": "int", "low": -1, "high": 4}}}, "grad_cache_chunk_size"),
])
def test_bad_sweeps_are_rejected(over: dict, message: str):
    with pytest.raises(SweepError, match=None) as err:
        sweep_from_dict(_sweep(**over), "bad.yaml")
    assert message in str(err.value) and "bad.yaml" in str(err.value)


def test_bare_value_pins_a_key(tmp_path: Path):
    raw = _sweep(parameters={"loss.alpha": {"type": "choice", "values": [1.0, 3.0]}, "train.max_steps": 4})
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_sweep(path)
    assert spec.name == "mine" and spec.fixed == {"train.max_steps": 4}
    assert spec.run_config({"loss.alpha": 3.0}).train.max_steps == 4


def test_matryoshka_grad_cache_and_hard_negative_keys_can_be_swept():
    """List-valued choices (Matryoshka widths) reach Optuna as strings and come back as lists."""
    spec = sweep_from_dict(_sweep(parameters={
        "loss.matryoshka_dims": {"type": "choice", "values": [[], [4, 8, 16]]},
        "loss.matryoshka_weights": {"type": "fixed", "value": None},
        "loss.grad_cache_chunk_size": {"type": "choice", "values": [0, 2]},
        "data.hard_negatives": {"type": "int", "low": 0, "high": 4}}), "mrl.yaml")
    dist = spec.optuna_space()["loss.matryoshka_dims"]
    assert list(dist.choices) == ["list:[]", "list:[4, 8, 16]"]
    cfg = spec.run_config({"loss.matryoshka_dims": dist.choices[1], "loss.grad_cache_chunk_size": 2,
                           "data.hard_negatives": 3})
    assert cfg.loss.matryoshka_dims == [4, 8, 16] and cfg.loss.grad_cache_chunk_size == 2 and cfg.data.hard_negatives == 3
    with pytest.raises(SweepError, match="hard_negatives"):
        sweep_from_dict(_sweep(parameters={"data.hard_negatives": {"type": "int", "low": -1, "high": 2}}), "hn.yaml")
    assert spec.run_config({"loss.matryoshka_dims": dist.choices[0]}).loss.matryoshka_dims == []
