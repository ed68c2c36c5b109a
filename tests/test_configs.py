"""Every shipped config file loads and validates through what reads it in use: the run configs
(rayjobs/configs, `core.config`), the sweeps (search_spaces), the DeepSpeed JSONs
(`core.deepspeed_config`), and cluster/'s runtime env, launcher YAML, KubeRay manifests and Serve
config (Ray's own RuntimeEnv, packager, autoscaler and Serve schemas, or their structure). What
these files do when run (DeepSpeed steps, Ray workers) is tests/cluster/test_cluster_configs.py's
job; nothing here starts Ray or touches a cloud."""

from __future__ import annotations

import copy
import json
import re
import zipfile
from pathlib import Path

import pytest
import yaml
from ray._private.runtime_env.packaging import create_package
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv
from ray.serve.schema import ServeDeploySchema

from core.config import ZERO_CONFIGS, RunConfig, load_run_config
from core.deepspeed_config import DEEPSPEED_DIR, available_deepspeed_configs, load_deepspeed_config
from rayjobs import serve as serve_job
from search_spaces import load_sweep, shipped_spaces

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CLUSTER_TESTS = ROOT / "tests" / "cluster" / "test_cluster_configs.py"  # the tests that run cluster/'s files
RUN_VALUES = dict(micro_batch_size=4, world_size=2, lr=2e-4, weight_decay=0.01, warmup_steps=5,
                  total_steps=50, grad_clip=0.5, precision="bfloat16", use_gpu=False)


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


# ---------------------------------------------------------------------------------------------
# Run configs and sweeps
# ---------------------------------------------------------------------------------------------

RUN_CONFIGS = sorted((ROOT / "rayjobs" / "configs").glob("*.yaml"))
SWEEPS = sorted((ROOT / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", RUN_CONFIGS or [None], ids=[p.name for p in RUN_CONFIGS] or ["none"])
def test_shipped_run_config_loads(path):
    if path is None:
        pytest.skip("no rayjobs/configs/*.yaml yet")
    cfg = load_run_config(path)
    assert cfg.train.name == path.stem
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("path", SWEEPS or [None], ids=[p.name for p in SWEEPS] or ["none"])
def test_shipped_search_space_is_yaml_with_metric_and_mode(path):
    if path is None:
        pytest.skip("no search_spaces/*.yaml yet")
    spec = yaml.safe_load(path.read_text())
    assert isinstance(spec, dict)
    assert isinstance(spec.get("metric"), str) and spec["metric"]
    assert spec.get("mode") in ("min", "max")


def test_expected_spaces_are_shipped():
    assert {p.stem for p in shipped_spaces()} >= {"smoke", "demo", "paper"}


@pytest.mark.parametrize("path", shipped_spaces(), ids=lambda p: p.stem)
def test_shipped_space_validates(path: Path):
    spec = load_sweep(path)
    assert spec.name == path.stem
    assert spec.searched, "a sweep searches something"
    # the header comment names the launch command
    assert f"python -m rayjobs.tune --space search_spaces/{path.name}" in path.read_text()
    # every corner of the space gives a valid run config
    base = spec.base_raw()
    for key, param in spec.searched.items():
        for value in param.probe_values():
            assert isinstance(spec.run_config({key: value}, base), RunConfig)
    assert set(spec.optuna_space()) == set(spec.searched)


# ---------------------------------------------------------------------------------------------
# DeepSpeed configs
# ---------------------------------------------------------------------------------------------

def test_shipped_deepspeed_configs_match_the_config_choices():
    assert available_deepspeed_configs() == sorted(ZERO_CONFIGS)
    assert DEEPSPEED_DIR == CLUSTER / "deepspeed"


@pytest.mark.parametrize("name", ZERO_CONFIGS)
def test_deepspeed_json_is_concrete(name):
    raw = json.loads((DEEPSPEED_DIR / f"{name}.json").read_text())
    assert "auto" not in set(_strings(raw)), "HF 'auto' values are not resolved by DeepSpeed alone"
    stage = raw["zero_optimization"]["stage"]
    assert stage == int(name[4])
    zero = raw["zero_optimization"]
    if name == "zero3_offload":
        for key in ("offload_param", "offload_optimizer"):
            assert zero[key] == {"device": "cpu", "pin_memory": True}
    else:
        assert "offload_param" not in zero and "offload_optimizer" not in zero
    assert raw["optimizer"]["type"] == "AdamW"
    assert raw["scheduler"]["type"] in ("WarmupDecayLR", "WarmupCosineLR")


@pytest.mark.parametrize("name", ZERO_CONFIGS)
def test_load_deepspeed_config_fills_run_values(name):
    cfg = load_deepspeed_config(name, **RUN_VALUES)
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 1
    assert cfg["train_batch_size"] == 8
    params = cfg["optimizer"]["params"]
    assert params["lr"] == 2e-4 and params["weight_decay"] == 0.01 and params["torch_adam"] is True
    sp = cfg["scheduler"]["params"]
    assert sp["total_num_steps"] == 50 and sp["warmup_num_steps"] == 5
    assert sp.get("warmup_max_lr", 2e-4) == 2e-4
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is True and "fp16" not in cfg
    # The file on disk is untouched (a copy is returned).
    assert json.loads((DEEPSPEED_DIR / f"{name}.json").read_text())["train_micro_batch_size_per_gpu"] == 16


# ---------------------------------------------------------------------------------------------
# Runtime env
# ---------------------------------------------------------------------------------------------

HEAVY = (".venv", ".git", "runs", "data", "weights", "__pycache__", ".pytest_cache")
NESTED_HEAVY = (".venv", ".git", "__pycache__", ".pytest_cache")  # excluded at any depth


def test_runtime_env_is_valid_and_excludes_heavy_folders():
    spec = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**spec)  # Ray's own validation of the fields
    excludes = {e.strip("/").lstrip("*/") for e in spec["excludes"]}
    for folder in HEAVY:
        assert folder in excludes, f"runtime_env excludes miss {folder}"
    assert spec["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert all(isinstance(v, str) for v in spec["env_vars"].values())


def test_packing_the_repo_with_the_excludes_is_small(tmp_path):
    spec = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    target = tmp_path / "pkg.zip"
    # include_gitignore=False: the excludes alone must keep the upload small.
    create_package(str(ROOT), target, include_gitignore=False, excludes=spec["excludes"], logger=None)
    names = zipfile.ZipFile(target).namelist()
    assert any(n.startswith("core/") for n in names) and any(n.startswith("cluster/") for n in names)
    for folder in HEAVY:
        assert not any(n.startswith(f"{folder}/") for n in names), folder
    for folder in NESTED_HEAVY:
        assert not any(f"/{folder}/" in n for n in names), folder
    # Root-anchored patterns: the source package core/data/ is not mistaken for the data folder.
    if (ROOT / "core" / "data" / "__init__.py").exists():
        assert "core/data/__init__.py" in names
    size_mib = target.stat().st_size / 2**20
    assert size_mib < 10, f"working-dir package is {size_mib:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher (AWS)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aws():
    return yaml.safe_load((CLUSTER / "aws-spot-gpu.yaml").read_text())


def test_aws_config_passes_rays_autoscaler_schema(aws):
    prepared = prepare_config(copy.deepcopy(aws))  # merges aws/defaults.yaml as `ray up` does
    validate_config(prepared)  # jsonschema ray/autoscaler/ray-schema.json + launcher checks
    assert prepared["available_node_types"][aws["head_node_type"]]["max_workers"] == 0


def test_aws_node_layout(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and "GPU" not in head["resources"]
    assert "InstanceMarketOptions" not in head["node_config"]

    drivers = [t for t in types.values() if "driver" in t["resources"]]
    assert len(drivers) == 1 and "InstanceMarketOptions" not in drivers[0]["node_config"]
    assert drivers[0]["resources"].get("GPU", 0) == 0

    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert {t["node_config"]["InstanceType"] for t in gpu.values()} >= {"g5.xlarge", "g5.12xlarge", "p4d.24xlarge"}
    for name, t in gpu.items():
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, name
    assert aws["idle_timeout_minutes"] > 0
    assert aws["provider"]["cache_stopped_nodes"] is False  # spot instances cannot be stopped


def test_aws_token_auth_dashboard_and_setup(aws):
    starts = aws["head_start_ray_commands"] + aws["worker_start_ray_commands"]
    ray_starts = [c for c in starts if re.search(r"\bray (start|stop)\b", c)]
    assert len(ray_starts) == 4
    for cmd in ray_starts:
        assert re.search(r"export RAY_AUTH_MODE=token;.*\bray (start|stop)\b", cmd), cmd
    head_start = next(c for c in aws["head_start_ray_commands"] if "ray start" in c)
    assert "--head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert aws["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # Heavy folders stay off the rsync; only root-anchored so core/data/ (source) still goes.
    assert {"/runs", "/data", "/weights", "**/.venv", "**/.git"} <= set(aws["rsync_exclude"])
    assert not any(p.endswith("/data") and not p.startswith("/") for p in aws["rsync_exclude"])

    setup = "\n".join(aws["setup_commands"])
    assert 'pip install -q "torch==2.13.0"' in setup and "pip install -q -e ~/notellm2-ray" in setup
    assert "/mnt/efs" in setup  # optional shared storage

    watcher = [c for c in aws["worker_start_ray_commands"] if "spot_watcher.py" in c]
    assert len(watcher) == 1 and "nvidia-smi" in watcher[0] and "--cloud aws" in watcher[0]
    assert "RAY_AUTH_MODE=token" in watcher[0]  # `ray drain-node` needs the token too
    assert (ROOT / "cluster" / "spot_watcher.py").is_file()


# ---------------------------------------------------------------------------------------------
# KubeRay manifests
# ---------------------------------------------------------------------------------------------

def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _containers(spec: dict):
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        for c in group["template"]["spec"]["containers"]:
            yield name, group, c


@pytest.fixture(scope="module", params=["raycluster.yaml", "rayjob-sweep.yaml"])
def kuberay(request):
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / request.param).read_text()))
    assert len(docs) == 1
    return docs[0]


def test_kuberay_manifest_structure(kuberay):
    assert kuberay["apiVersion"] == "ray.io/v1" and kuberay["kind"] in ("RayCluster", "RayJob")
    assert kuberay["metadata"]["name"]
    spec = _cluster_spec(kuberay)
    assert spec["rayVersion"] == "2.60.0"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head["rayStartParams"]["num-cpus"] == "0"
    images = {c["image"] for _, _, c in _containers(spec)}
    assert len(images) == 1 and not next(iter(images)).endswith(":latest")
    for name, group, c in _containers(spec):
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get("RAY_AUTH_MODE") == "token", f"{name}/{c['name']} lacks RAY_AUTH_MODE=token"
        limits = c["resources"]["limits"]
        assert "cpu" in limits and "memory" in limits
    autoscaler_env = {e["name"]: e.get("value") for e in spec["autoscalerOptions"]["env"]}
    assert autoscaler_env.get("RAY_AUTH_MODE") == "token"


def test_kuberay_worker_groups(kuberay):
    spec = _cluster_spec(kuberay)
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert "driver" in groups["drivers"]["rayStartParams"]["resources"]
    gpu_groups = [g for g in groups.values()
                  if any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in g["template"]["spec"]["containers"])]
    assert gpu_groups
    for g in gpu_groups:
        pod = g["template"]["spec"]
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1
        assert pod["nodeSelector"].get("karpenter.sh/capacity-type") == "spot"
        keys = {t["key"] for t in pod["tolerations"]}
        assert {"nvidia.com/gpu", "karpenter.sh/capacity-type"} <= keys
        for c in pod["containers"]:
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
            hook = " ".join(c["lifecycle"]["postStart"]["exec"]["command"])
            assert "cluster/spot_watcher.py" in hook
    # CPU-only groups never ask for GPUs.
    for name, g in groups.items():
        if g not in gpu_groups:
            for c in g["template"]["spec"]["containers"]:
                assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), name


def test_rayjob_sweep_specifics():
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob-sweep.yaml").read_text())
    spec = job["spec"]
    assert spec["entrypoint"].split()[:5] == ["python", "-m", "rayjobs.tune", "--space", "search_spaces/paper.yaml"]
    assert (ROOT / "search_spaces" / "paper.yaml").is_file() or pytest.skip("search_spaces/paper.yaml not written yet")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    # The submitter must reach a loopback-only dashboard: only SidecarMode runs inside the head pod.
    assert spec["submissionMode"] == "SidecarMode"
    assert spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert json.loads(spec["entrypointResources"]) == {"driver": 1}
    yaml.safe_load(spec["runtimeEnvYAML"])


# ---------------------------------------------------------------------------------------------
# Ray Serve config of the related-notes service
# ---------------------------------------------------------------------------------------------

def test_serve_config_passes_serves_schema_and_builds_the_app():
    raw = yaml.safe_load((CLUSTER / "serve.yaml").read_text())
    schema = ServeDeploySchema.parse_obj(raw)  # Serve's own validation of `serve run` / `serve deploy` files
    assert schema.http_options.host == "127.0.0.1"  # loopback unless a token is configured
    (app,) = schema.applications
    module, attr = app.import_path.split(":")
    assert module == "rayjobs.serve" and getattr(serve_job, attr) is serve_job.build_app
    assert app.args["token_env"] == serve_job.TOKEN_ENV
    built = serve_job.build_app(app.args)._bound_deployment
    assert built._deployment_config.autoscaling_config.max_replicas == app.args["max_replicas"]


def test_every_shipped_cluster_yaml_is_validated_here():
    """local_env.yaml is the one checked in CLUSTER_TESTS: its test shows the variables reaching the
    embedded Ray's workers, so it starts Ray."""
    tested = Path(__file__).read_text() + CLUSTER_TESTS.read_text()
    for path in sorted(CLUSTER.rglob("*.yaml")):
        assert f'"{path.name}"' in tested, \
            f"{path.relative_to(ROOT)} has no test in {Path(__file__).name} or {CLUSTER_TESTS.name}"
