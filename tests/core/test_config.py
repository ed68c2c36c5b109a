"""core.config: bad values fail at construction naming field and allowed values, unknown keys
get a did-you-mean, --set overrides parse and YAML round-trips. The shipped run configs load in
tests/test_configs.py."""

from __future__ import annotations

import re

import pytest
import yaml

from core.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    PrepareConfig,
    RunConfig,
    TrainConfig,
    dump_run_config,
    load_run_config,
    parse_set,
    with_values,
)

# (section class, field, bad value, substrings the message must contain)
BAD_VALUES = [
    (ModelConfig, "num_visual_tokens", 0, ["model.num_visual_tokens", "0", ">= 1"]),
    (ModelConfig, "num_visual_tokens", -4, ["model.num_visual_tokens", "-4"]),
    (ModelConfig, "num_visual_tokens", 2.5, ["model.num_visual_tokens", "integer"]),
    (ModelConfig, "num_visual_tokens", True, ["model.num_visual_tokens"]),
    (ModelConfig, "prompt_mode", "fancy", ["model.prompt_mode", "'fancy'", "text", "basic", "micl"]),
    (ModelConfig, "connector", "perceiver", ["model.connector", "'perceiver'", "qformer", "mlp"]),
    (ModelConfig, "language", "fr", ["model.language", "en", "zh"]),
    (ModelConfig, "output_dim", 0, ["model.output_dim", ">= 1", "null"]),
    (ModelConfig, "output_dim", -64, ["model.output_dim", "-64"]),
    (ModelConfig, "dtype", "float16", ["model.dtype", "float32", "bfloat16"]),
    (ModelConfig, "lora_rank", 0, ["model.lora_rank", "[1, inf]"]),
    (ModelConfig, "lora_dropout", 1.0, ["model.lora_dropout", "[0, 1)"]),
    (ModelConfig, "lora_targets", [], ["model.lora_targets", "non-empty list"]),
    (ModelConfig, "llm", "", ["model.llm"]),
    (ModelConfig, "image_size", 8, ["model.image_size", "[16, inf]"]),
    (LossConfig, "alpha", -1.0, ["loss.alpha", "-1.0", "[0, inf]"]),
    (LossConfig, "alpha", float("nan"), ["loss.alpha", "finite"]),
    (LossConfig, "gather", "all", ["loss.gather", "none", "no_grad", "with_grad"]),
    (LossConfig, "temperature_init", -0.5, ["loss.temperature_init", "-0.5"]),
    (LossConfig, "temperature_init", 9.0, ["loss.temperature_init", "9.0"]),  # above max_log_scale
    (TrainConfig, "lr", 0.0, ["train.lr", "(0, 1]"]),
    (TrainConfig, "lr", -1e-4, ["train.lr", "-0.0001"]),
    (TrainConfig, "lr", 5.0, ["train.lr", "(0, 1]"]),
    (TrainConfig, "lr", "fast", ["train.lr", "a number"]),
    (TrainConfig, "deepspeed", "zero4", ["train.deepspeed", "zero0", "zero3_offload"]),
    (TrainConfig, "precision", "fp16", ["train.precision", "float32", "bfloat16"]),
    (TrainConfig, "batch_size", 0, ["train.batch_size", "[1, inf]"]),
    (TrainConfig, "warmup_ratio", 1.5, ["train.warmup_ratio", "[0, 1]"]),
    (TrainConfig, "nan_policy", "ignore", ["train.nan_policy", "skip", "stop"]),
    (TrainConfig, "num_workers", -1, ["train.num_workers"]),
    (DataConfig, "corpus", "imagenet", ["data.corpus", "synthetic"]),
    (DataConfig, "num_notes", 2, ["data.num_notes", "[4, inf]"]),
    (EvalConfig, "ks", [0, 10], ["eval.ks", "integers >= 1"]),
    (EvalConfig, "metric", "recall", ["eval.metric", "R@"]),
    # wrong types that no range check catches: every field holds its annotated type
    (ModelConfig, "late_fusion", "maybe", ["model.late_fusion", "true or false"]),
    (ModelConfig, "llm_num_layers", 2.5, ["model.llm_num_layers", "an integer or null"]),
    (TrainConfig, "use_gpu", 2, ["train.use_gpu", "true or false"]),
    (TrainConfig, "seed", -5, ["train.seed", "[0, inf]"]),
    (TrainConfig, "name", "a/b", ["train.name", "a directory name"]),
    (TrainConfig, "name", "..", ["train.name", "a directory name"]),
    (DataConfig, "seed", 1.5, ["data.seed", "an integer"]),
    (EvalConfig, "every_epoch", "x", ["eval.every_epoch", "true or false"]),
    (LossConfig, "learnable_temperature", 1, ["loss.learnable_temperature", "true or false"]),
    (LossConfig, "matryoshka_dims", [16, 8], ["loss.matryoshka_dims", "[16, 8]", "strictly increasing"]),
    (LossConfig, "matryoshka_dims", [0, 8], ["loss.matryoshka_dims", "integers >= 1"]),
    (LossConfig, "matryoshka_dims", 8, ["loss.matryoshka_dims", "a strictly increasing list"]),
    (LossConfig, "matryoshka_weights", [1.0], ["loss.matryoshka_weights", "matryoshka_dims is empty"]),
    (LossConfig, "grad_cache_chunk_size", -1, ["loss.grad_cache_chunk_size", "[0, inf]"]),
]


@pytest.mark.parametrize("cls, name, value, parts", BAD_VALUES,
                         ids=[f"{c.__name__}.{n}={v!r}" for c, n, v, _ in BAD_VALUES])
def test_bad_value_fails_at_construction(cls, name, value, parts):
    with pytest.raises(ConfigError) as err:
        cls(**{name: value})
    msg = str(err.value)
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    assert "allowed" in msg


@pytest.mark.parametrize("override, field", [
    ("model.num_visual_tokens=0", "model.num_visual_tokens"),
    ("loss.alpha=-3", "loss.alpha"),
    ("model.prompt_mode=fancy", "model.prompt_mode"),
    ("model.output_dim=0", "model.output_dim"),
    ("model.connector=perceiver", "model.connector"),
    ("train.lr=0", "train.lr"),
    ("loss.matryoshka_dims=[8,32]", "loss.matryoshka_dims"),  # wider than model.output_dim (16 below)
    ("loss.matryoshka_weights=[1,2]", "loss.matryoshka_weights"),
    ("loss.grad_cache_chunk_size=1.5", "loss.grad_cache_chunk_size"),
])
def test_bad_value_through_loader_names_source_and_field(tmp_path, override, field):
    path = tmp_path / "run.yaml"
    path.write_text("model: {llm: tiny-llama, output_dim: 16}\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path, overrides=[override])
    assert str(path) in str(err.value) and field in str(err.value)
    assert "\n" not in str(err.value)  # one line


def test_defaults_are_valid_and_official_where_the_paper_says():
    cfg = RunConfig()
    assert cfg.loss.temperature_init == 3.0 and cfg.loss.alpha == 9.0
    assert cfg.model.num_visual_tokens == 16 and cfg.model.output_dim == 64
    assert cfg.train.weight_decay == 0.001 and cfg.train.warmup_ratio == 0.1
    assert load_run_config(None) == cfg


@pytest.mark.parametrize("raw, bad_key, suggestion", [
    ({"model": {"num_visual_token": 8}}, "model.num_visual_token", "num_visual_tokens"),
    ({"loss": {"alpah": 3}}, "loss.alpah", "alpha"),
    ({"train": {"learning_rate": 1e-4}}, "train.learning_rate", None),
    ({"modle": {}}, "modle", "model"),
])
def test_unknown_key_did_you_mean(raw, bad_key, suggestion):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(raw, source="x.yaml")
    msg = str(err.value)
    assert "x.yaml" in msg and f"unknown key '{bad_key}'" in msg
    if suggestion:
        assert f"did you mean '{suggestion}'" in msg
    else:
        assert "known:" in msg and "lr" in msg  # no close match: list what exists


def test_unknown_override_section_and_malformed_override():
    with pytest.raises(ConfigError, match="did you mean 'loss'"):
        with_values({}, parse_set(["los.alpha=3"]))
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_set(["alpha=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_set(["loss.alpha"])
    with pytest.raises(ConfigError, match="expected section.key"):
        with_values({}, {"loss.": 3})


def test_set_overrides_parse_as_yaml():
    cfg = load_run_config(None, overrides=[
        "loss.alpha=3",
        "model.lora_targets=[q_proj,k_proj]",
        "model.output_dim=null",
        "model.late_fusion=false",
        "train.lr=1e-4",
        "eval.ks=[10, 100]",
    ])
    assert cfg.loss.alpha == 3.0 and isinstance(cfg.loss.alpha, float)
    assert cfg.model.lora_targets == ["q_proj", "k_proj"]
    assert cfg.model.output_dim is None
    assert cfg.model.late_fusion is False
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.eval.ks == [10, 100]


def test_overrides_do_not_mutate_the_input():
    raw = {"loss": {"alpha": 9.0}}
    out = with_values(raw, parse_set(["loss.alpha=1"]))
    assert raw == {"loss": {"alpha": 9.0}} and out["loss"]["alpha"] == 1


def test_yaml_round_trip(tmp_path):
    cfg = load_run_config(None, overrides=["loss.alpha=3", "model.lora_targets=[q_proj,k_proj]",
                                           "model.output_dim=null", "train.name=rt"])
    path = tmp_path / "cfg.yaml"
    dump_run_config(cfg, path)
    back = load_run_config(path)
    assert back == cfg
    assert yaml.safe_load(path.read_text())["loss"]["alpha"] == 3.0


def test_run_name_defaults_to_file_stem(tmp_path):
    path = tmp_path / "my_run.yaml"
    path.write_text("loss: {alpha: 1}\n")
    assert load_run_config(path).train.name == "my_run"
    assert load_run_config(path, overrides=["train.name=other"]).train.name == "other"


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_run_config(wrong)


def test_yaml_ints_and_strings_coerce_to_floats_only_where_floats_are_meant():
    cfg = RunConfig.from_dict({"train": {"lr": "1e-4", "weight_decay": 0}, "loss": {"alpha": 9}})
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.weight_decay, float)
    assert isinstance(cfg.loss.alpha, float)
    with pytest.raises(ConfigError, match="model.num_visual_tokens"):
        RunConfig.from_dict({"model": {"num_visual_tokens": "16"}})


def test_readme_configuration_reference_is_generated_from_the_dataclasses():
    """README's reference is `rayjobs.configref`'s output: a field added or re-documented without
    `python -m rayjobs.configref --write README.md` fails here."""
    from pathlib import Path

    from rayjobs import configref

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split(configref.BEGIN, 1)[1].split(configref.END, 1)[0]
    assert block == "\n" + configref.render()


def test_bfloat16_parameters_need_bfloat16_precision(tmp_path):
    """bf16 parameters stepped by an fp32 optimizer without master weights round small updates to
    zero: refused at load time, naming both fields; the working combinations load."""
    path = tmp_path / "run.yaml"
    path.write_text("model: {llm: tiny-llama, dtype: bfloat16}\ntrain: {precision: float32}\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert str(path) in str(err.value) and "model.dtype" in str(err.value) and "train.precision=bfloat16" in str(err.value)
    assert load_run_config(path, overrides=["train.precision=bfloat16"]).model.dtype == "bfloat16"
    assert load_run_config(path, overrides=["model.dtype=float32"]).train.precision == "float32"


def test_matryoshka_config_round_trip_and_width_check():
    cfg = load_run_config(None, overrides=["model.output_dim=64", "loss.matryoshka_dims=[8, 16, 32, 64]",
                                           "loss.matryoshka_weights=[1, 1, 2, 4]", "loss.grad_cache_chunk_size=4"])
    assert cfg.loss.matryoshka_weights == [1.0, 1.0, 2.0, 4.0] and cfg.loss.grad_cache_chunk_size == 4
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"loss.matryoshka_dims=\[8, 128\] is invalid: allowed .*model.output_dim=64"):
        load_run_config(None, overrides=["model.output_dim=64", "loss.matryoshka_dims=[8, 128]"])
    # no head (output_dim null): the LLM width is only known when the model is built; the loss checks then
    assert load_run_config(None, overrides=["model.output_dim=null", "loss.matryoshka_dims=[8, 4096]"])


def test_prepare_config_types_ranges_and_adapter_options():
    cfg = PrepareConfig(num_notes=50, num_topics=3, input="/data/x")
    assert cfg.adapter_options() == {"num_notes": 50, "seed": 0, "short_fraction": 0.3, "input": "/data/x", "num_topics": 3}
    assert PrepareConfig().to_dict()["upper"] is None  # JSON-ready: no Infinity in data_report.json
    for bad, message in [(dict(top_t=0), "prepare.top_t=0"), (dict(lower=2.0, upper=1.0), "prepare.upper=1.0"),
                         (dict(test_fraction=1.0), "prepare.test_fraction=1.0"), (dict(seed=1.5), "prepare.seed=1.5"),
                         (dict(embed_images="no"), "prepare.embed_images='no'"), (dict(num_notes=0), "prepare.num_notes=0")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            PrepareConfig(**bad)
    with pytest.raises(TypeError, match="num_note"):
        PrepareConfig(num_note=5)  # a misspelt keyword is not silently ignored
