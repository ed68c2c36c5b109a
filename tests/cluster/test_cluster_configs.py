"""What cluster/'s files do when run: each DeepSpeed JSON through deepspeed.initialize and three
steps on CPU (and the DeepSpeedCPUAdam build), `core.deepspeed_config`'s edge cases, local_env.yaml's
variables reaching the embedded Ray's workers, and DeepSpeed's op cache. tests/test_configs.py
loads and validates the shipped files themselves. Nothing here touches a cloud."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from core.config import ZERO_CONFIGS, ConfigError
from core.deepspeed_config import load_deepspeed_config, use_this_interpreters_build_tools
from tests.test_configs import CLUSTER, ROOT, RUN_VALUES

# ---------------------------------------------------------------------------------------------
# DeepSpeed configs
# ---------------------------------------------------------------------------------------------

def test_load_deepspeed_config_precision_gpu_and_warmup_edge_cases():
    fp32 = load_deepspeed_config("zero2", **{**RUN_VALUES, "precision": "float32"})
    assert fp32["bf16"]["enabled"] is False
    # GPU + optimizer offload uses DeepSpeedCPUAdam; everything else stays on torch AdamW.
    assert load_deepspeed_config("zero3_offload", **{**RUN_VALUES, "use_gpu": True})["optimizer"]["params"]["torch_adam"] is False
    assert load_deepspeed_config("zero3", **{**RUN_VALUES, "use_gpu": True})["optimizer"]["params"]["torch_adam"] is True
    flat = load_deepspeed_config("zero1", **{**RUN_VALUES, "warmup_steps": 0})["scheduler"]["params"]
    assert flat["warmup_num_steps"] == 1 and flat["warmup_min_lr"] == flat["warmup_max_lr"] == 2e-4
    capped = load_deepspeed_config("zero1", **{**RUN_VALUES, "warmup_steps": 500})["scheduler"]["params"]
    assert capped["warmup_num_steps"] == 50 and capped["warmup_min_lr"] == 0.0


def test_unknown_deepspeed_name_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        load_deepspeed_config("zero4", **RUN_VALUES)
    msg = str(err.value)
    assert "zero4" in msg and all(n in msg for n in ZERO_CONFIGS)
    with pytest.raises(ConfigError, match="precision"):
        load_deepspeed_config("zero1", **{**RUN_VALUES, "precision": "float16"})
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_deepspeed_config("zero1", **{**RUN_VALUES, "micro_batch_size": 0})


def test_deepspeed_config_module_imports_neither_deepspeed_nor_ray():
    code = "import sys, core.deepspeed_config; print([m for m in ('deepspeed', 'ray') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# One gloo process per config: deepspeed.init_distributed leaves process-group state behind.
_DS_STEP = textwrap.dedent("""
    import json, os, socket, sys
    sock = socket.socket(); sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]; sock.close()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from core.deepspeed_config import load_deepspeed_config, use_this_interpreters_build_tools
    use_this_interpreters_build_tools()  # as the trainer does: the ops set-up built in the venv, not a rebuild
    import torch, deepspeed
    name, precision, use_gpu = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    cfg = load_deepspeed_config(name, micro_batch_size=4, world_size=1, lr=1e-2, weight_decay=0.0,
                                warmup_steps=0, total_steps=10, grad_clip=1.0, precision=precision, use_gpu=use_gpu)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    x = torch.randn(4, 8, dtype=torch.bfloat16 if precision == "bfloat16" else torch.float32)
    losses = []
    for _ in range(3):
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    print("RESULT " + json.dumps({"losses": losses, "optimizer": type(engine.optimizer).__name__,
                                  "basic": type(engine.basic_optimizer).__name__}))
""")


def _ds_step(name: str, precision: str = "float32", use_gpu: bool = False, timeout: int = 300) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _DS_STEP, name, precision, "1" if use_gpu else "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("name, wrapper", [
    ("zero0", "AdamW"),
    ("zero1", "DeepSpeedZeroOptimizer"),
    ("zero2", "DeepSpeedZeroOptimizer"),
    ("zero3", "DeepSpeedZeroOptimizer_Stage3"),
    ("zero3_offload", "DeepSpeedZeroOptimizer_Stage3"),
])
def test_deepspeed_initialize_and_step_on_cpu(name, wrapper):
    out = _ds_step(name)
    assert out["optimizer"] == wrapper
    assert out["basic"] == "AdamW"  # torch AdamW: no compiled op needed on CPU, offload included
    losses = out["losses"]
    assert losses[-1] < losses[0] - 1e-3, losses  # the step really updated the weights


def test_deepspeed_bf16_step_on_cpu():
    out = _ds_step("zero2", precision="bfloat16")
    assert out["losses"][-1] < out["losses"][0]


@pytest.mark.slow
def test_zero3_offload_with_deepspeed_cpu_adam_builds_and_steps():
    """use_gpu=True + offload selects DeepSpeedCPUAdam, a C++ op built with g++/ninja on first use
    (~75 s on 2 cores; cached in TORCH_EXTENSIONS_DIR afterwards). It works on a CPU-only machine."""
    out = _ds_step("zero3_offload", use_gpu=True, timeout=600)
    assert out["basic"] == "DeepSpeedCPUAdam"
    assert out["losses"][-1] < out["losses"][0]


# ---------------------------------------------------------------------------------------------
# Embedded local Ray and DeepSpeed's op cache
# ---------------------------------------------------------------------------------------------


def test_local_env_defaults_reach_the_embedded_rays_workers():
    """cluster/local_env.yaml's variables reach the embedded Ray's workers (where Ray Train and
    Ray Data read them); one already set in the shell wins."""
    local = yaml.safe_load((CLUSTER / "local_env.yaml").read_text())["env_vars"]
    assert local and all(isinstance(v, str) for v in local.values())
    keys = sorted(local)
    code = ("import json, os, ray\nfrom rayjobs.train import ensure_ray\nensure_ray(2)\n"
            f"print(json.dumps(ray.get(ray.remote(lambda: {{k: os.environ.get(k) for k in {keys!r}}}).remote())))")
    env = {k: v for k, v in os.environ.items() if k not in local and k != "RAY_ADDRESS"}
    env["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = "3"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {**local, "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "3"}
    assert "[ray] embedded local Ray: 2 logical CPUs" in proc.stdout


def test_deepspeed_ops_are_cached_per_virtualenv(monkeypatch, tmp_path):
    # setenv first, so that monkeypatch records the variable's state before the test: the
    # function under test sets it directly, and a value left behind would send every later
    # DeepSpeed op build of the session into tmp_path (a 25-30 s rebuild of the shm op)
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "python"))
    use_this_interpreters_build_tools()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "venv" / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    use_this_interpreters_build_tools()  # the user's choice wins
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)  # no virtualenv: torch's own default
    use_this_interpreters_build_tools()
    assert "TORCH_EXTENSIONS_DIR" not in os.environ
