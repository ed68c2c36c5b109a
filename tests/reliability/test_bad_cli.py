"""Bad configs and command lines: every entrypoint answers with one clear line on stderr and
exit status 2 (no traceback), before Ray starts.

Each CLI is run as a real subprocess for representative cases; the exhaustive list of
out-of-range config fields goes through `rayjobs.train.main` in-process (the same code path,
without paying a Python start per field)."""

from __future__ import annotations

import subprocess

import pytest

from tests.reliability.conftest import PY, REPO, SMOKE, subprocess_env

SPACE = REPO / "search_spaces" / "smoke.yaml"


def cli(module: str, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", module, *map(str, args)], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def error_line(proc) -> str:
    """The single error line; argparse's own errors come after its usage block."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-800:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if lines and lines[0].startswith("usage:"):
        lines = [line for line in lines if "error:" in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("args, needles", [
    (["--set", "train.lrr=0.1"], ["unknown key 'train.lrr'", "did you mean 'lr'"]),
    (["--set", "trian.lr=0.1"], ["unknown section 'trian'", "did you mean 'train'"]),
    (["--set", "model.conector=mlp"], ["unknown key 'model.conector'", "did you mean 'connector'"]),
    (["--set", "train.lr=5"], ["train.lr=5.0 is invalid", "(0, 1]"]),
    (["--set", "train.batch_size=0"], ["train.batch_size=0 is invalid"]),
    (["--set", "train.nan_policy=ignore"], ["train.nan_policy='ignore' is invalid", "skip, stop"]),
    (["--set", "data.corpus=imagenet"], ["data.corpus='imagenet' is invalid", "synthetic"]),
    (["--set", "lr=0.1"], ["expected section.key=value"]),
    (["--set", "train.deepspeed=zero4"], ["train.deepspeed='zero4' is invalid", "zero3_offload"]),
])
def test_train_cli_bad_overrides(args, needles):
    line = error_line(cli("rayjobs.train", "--config", SMOKE, *args))
    for needle in needles:
        assert needle in line, (needle, line)


def test_train_cli_bad_config_files(tmp_path):
    assert "config file not found" in error_line(cli("rayjobs.train", "--config", tmp_path / "nope.yaml"))
    typo = tmp_path / "typo.yaml"
    typo.write_text(SMOKE.read_text().replace("num_visual_tokens:", "num_visual_token:"))
    line = error_line(cli("rayjobs.train", "--config", typo))
    assert "unknown key 'model.num_visual_token'" in line and "did you mean 'num_visual_tokens'" in line
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    assert "not valid YAML" in error_line(cli("rayjobs.train", "--config", broken))
    wrong_shape = tmp_path / "list.yaml"
    wrong_shape.write_text("model: 3\n")
    assert "model must be a mapping" in error_line(cli("rayjobs.train", "--config", wrong_shape))


OUT_OF_RANGE = [
    "model.llm_num_layers=0", "model.image_size=8", "model.connector=linear", "model.num_visual_tokens=0",
    "model.num_visual_tokens=2.5", "model.qformer_layers=0", "model.qformer_heads=0", "model.qformer_dim=-1",
    "model.prompt_mode=video", "model.language=fr", "model.output_dim=0", "model.lora_rank=0", "model.lora_alpha=0",
    "model.lora_dropout=1", "model.lora_targets=[]", "model.max_text_tokens=4", "model.title_max_chars=0",
    "model.content_max_chars=-1", "model.max_topics=-1", "model.dtype=float16", "model.llm=''", "model.vision=''",
    "loss.temperature_init=-1", "loss.temperature_init=10", "loss.max_log_scale=0", "loss.max_log_scale=21",
    "loss.alpha=-1", "loss.gather=all", "loss.temperature_init=abc",
    "data.corpus=nope", "data.num_notes=3", "data.short_text_chars=-1", "data.preprocess_actors=0",
    "train.num_workers=-1", "train.cpus_per_worker=0", "train.deepspeed=zero4", "train.batch_size=0", "train.epochs=0",
    "train.max_steps=-1", "train.lr=0", "train.lr=2", "train.weight_decay=-0.1", "train.warmup_ratio=1.5",
    "train.grad_clip=-1", "train.precision=float16", "train.checkpoint_every=-1", "train.keep_checkpoints=0",
    "train.log_every=0", "train.max_failures=-2", "train.nan_policy=ignore", "train.batch_size=true",
    "eval.ks=[]", "eval.ks=[0]", "eval.metric=MRR", "eval.metric=long/R@10", "eval.batch_size=0", "eval.chunk_size=0",
]


@pytest.mark.parametrize("override", OUT_OF_RANGE)
def test_every_out_of_range_field_is_refused_naming_it(override, capsys):
    from rayjobs.train import main

    assert main(["--config", str(SMOKE), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    key = override.split("=")[0]
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    # the message names the field (temperature_init vs max_log_scale: either side of the bound)
    assert key in err or (key.startswith("loss.") and "loss.temperature_init" in err), err
    assert "is invalid: allowed" in err, err


def test_prepare_data_cli_errors(tmp_path):
    line = error_line(cli("rayjobs.prepare_data", "--corpus", "imagenet", "--out", tmp_path / "o"))
    assert "invalid choice: 'imagenet'" in line
    line = error_line(cli("rayjobs.prepare_data", "--corpus", "parquet", "--out", tmp_path / "o"))
    assert "--input DIR is required" in line
    line = error_line(cli("rayjobs.prepare_data", "--corpus", "parquet", "--input", tmp_path / "missing", "--out", tmp_path / "o"))
    assert "missing/notes.parquet: not found" in line
    line = error_line(cli("rayjobs.prepare_data", "--corpus", "qilin", "--input", tmp_path / "missing", "--out", tmp_path / "o"))
    assert "cannot read Parquet" in line and "missing/notes" in line
    line = error_line(cli("rayjobs.prepare_data", "--corpus", "synthetic", "--num-notes", "many", "--out", tmp_path / "o"))
    assert "--num-notes: invalid int value" in line
    # option ranges are PrepareConfig's (each range: tests/core/test_config.py): one line naming the
    # option, before any corpus is read
    line = error_line(cli("rayjobs.prepare_data", "--corpus", "synthetic", "--test-fraction", "0.7", "--val-fraction", "0.4",
                          "--out", tmp_path / "o"))
    assert "prepare.val_fraction=0.4 is invalid" in line and "test_fraction + val_fraction < 1" in line
    assert not (tmp_path / "o").exists()


def test_evaluate_cli_errors(tmp_path, rel_data):
    line = error_line(cli("rayjobs.evaluate", "--checkpoint", tmp_path / "nope", "--data", rel_data, "--out", tmp_path / "m.json"))
    assert "--checkpoint" in line and "no such file or directory" in line
    line = error_line(cli("rayjobs.evaluate", "--untrained", SMOKE, "--data", tmp_path / "nodata", "--out", tmp_path / "m.json"))
    assert "--data" in line and "notes.parquet not found" in line
    typo = tmp_path / "typo.yaml"
    typo.write_text(SMOKE.read_text().replace("alpha: 9.0", "alhpa: 9.0"))
    line = error_line(cli("rayjobs.evaluate", "--untrained", typo, "--data", rel_data, "--out", tmp_path / "m.json"))
    assert "unknown key 'loss.alhpa'" in line and "did you mean 'alpha'" in line
    line = error_line(cli("rayjobs.evaluate", "--untrained", SMOKE, "--data", rel_data, "--out", tmp_path / "m.txt"))
    assert "expected a .json path" in line
    line = error_line(cli("rayjobs.evaluate", "--untrained", SMOKE, "--data", rel_data, "--out", tmp_path / "m.json", "--ks", "ten"))
    assert "--ks 'ten'" in line


def test_tune_cli_errors(tmp_path):
    assert "sweep file not found" in error_line(cli("rayjobs.tune", "--space", tmp_path / "nope.yaml"))
    assert "sweep file not found" in error_line(cli("rayjobs.tune", "--space", "smoke"))  # a name, not a file
    assert "--num-samples must be >= 1" in error_line(cli("rayjobs.tune", "--space", SPACE, "--num-samples", "0"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPACE.read_text() + "\nnum_smaples: 3\n")
    line = error_line(cli("rayjobs.tune", "--space", bad))
    assert "num_smaples" in line


def test_leaderboard_cli_errors(tmp_path):
    assert "is not a directory" in error_line(cli("rayjobs.leaderboard", "--storage", tmp_path / "nope"))
    assert "invalid choice: 'best'" in error_line(cli("rayjobs.leaderboard", "--storage", tmp_path, "--mode", "best"))
