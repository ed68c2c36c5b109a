"""`train_fn_per_worker`: the code each Ray Train worker runs (the only place calling ray.train.*
and deepspeed.initialize). The driver is `rayjobs.train`; see its docstring for commands.

Per step: pair batch from the Ray Data shard -> `core.step.start_pair_step` (forward, loss;
GradCache chunks with `loss.grad_cache_chunk_size`) -> DeepSpeed backward/step. Every `train.checkpoint_every` steps, at each epoch end and at the end, all ranks
write a DeepSpeed checkpoint (frozen weights excluded) plus `state.json`, reported with
`ray.train.report`; rank 0 adds an inference export at the end.

A step whose loss or gradients are not finite (inf/NaN on any rank) is skipped on every rank,
counted in `skipped_nonfinite` and handled by `train.nan_policy`; a checkpoint is refused if the
trainable weights are not finite (checked by their sum; not under ZeRO-3, where ranks hold shards).

`state.json` holds step, epoch, in-epoch batch position, world size, the loss history, the
count of skipped non-finite steps and `resumes` (one `{step, checkpoint}` entry per resume).

Resume guarantees: the optimizer step count, optimizer/scheduler state and RNG seeds are
restored exactly. The data position is restored by skipping the batches already consumed in
the interrupted epoch; Ray Data reshuffles nothing between runs (no random shuffle in the
pipeline), so with the same worker count the same batches follow. With a different worker
count ZeRO checkpoints do not load (DeepSpeed partitions by world size) and the run fails
with a clear message.

A checkpoint cut off mid-write (no `state.json`, an unreadable one, or a truncated shard file)
is never resumed from: `rayjobs.resume` falls back to the newest complete `checkpoint_*`
directory next to it in the run's storage and logs which one is used (local disk, NFS or object
storage alike). A complete checkpoint that Ray's own state never recorded (the driver was killed between a worker
writing it and the controller saving its state) is found in the run directory and resumed from.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.config import RunConfig
from core.metrics import flatten_recall, flatten_recall_ci
from core.paths import is_remote, storage_fs
from rayjobs.resume import CKPT_TAG, STATE_FILE, checkpoint_problem, ckpt_order, pick_resume_dir
from rayjobs.step_guard import all_ranks_true as _all_true
from rayjobs.step_guard import discard_step, grads_finite

log = logging.getLogger("notellm2.train")

EXPORT_DIR = "export"


def _device(use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _init_process_group_if_local(use_gpu: bool) -> None:
    """Ray Train local mode (num_workers=0) starts no process group; DeepSpeed needs one."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if use_gpu else "gloo", rank=0, world_size=1)
    # A previous local run in this process ended with Ray's plain torch destroy_process_group,
    # which leaves DeepSpeed's cached groups pointing at the dead group; drop those references
    # so a second run in the same process (notebooks, test suites) builds fresh ones.
    from deepspeed.utils import groups

    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:
        release(None)


def _steps_per_epoch(cfg: RunConfig, world: int) -> int:
    import pyarrow.parquet as pq

    from core.data.pipeline import PAIRS_FILES, data_path

    n_pairs = pq.read_metadata(data_path(cfg.data.path, PAIRS_FILES["train"])).num_rows
    # drop_last per worker: each worker sees ~n/world rows and yields floor(that / B) batches
    return max(1, (n_pairs // max(world, 1)) // cfg.train.batch_size)


def _trainable_checksum(engine) -> float | None:
    """Sum of the trainable weights (float64); None under ZeRO-3, where each rank holds a shard."""
    if engine.zero_optimization_stage() == 3:
        return None
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in engine.module.parameters() if p.requires_grad))


# The only non-tensor classes DeepSpeed (ZeRO 0-3, fp32/bf16) pickles into its checkpoints.
CHECKPOINT_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _trained_config(cfg: RunConfig) -> dict:
    """What a checkpoint's weights depend on: the model and loss sections of the run config."""
    d = cfg.to_dict()
    return {"model": d["model"], "loss": d["loss"]}


def _config_change(saved: dict | None, current: dict) -> str | None:
    """`section.key=<saved> (this run: <current>)` for the first difference, None when equal or
    when the checkpoint predates `trained_config`."""
    if not saved:
        return None
    for section, fields in current.items():
        for key, value in fields.items():
            old = (saved.get(section) or {}).get(key)
            if old != value:
                return f"{section}.{key}={old!r} (this run: {value!r})"
    return None


def _load_weights_only(engine) -> None:
    """Make the engine read checkpoints with `torch.load(weights_only=True)`.

    DeepSpeed's own loader unpickles with `weights_only=False`, so a tampered checkpoint on
    shared storage could run code in every worker. With this, a checkpoint holding anything but
    tensors, containers and the classes in CHECKPOINT_SAFE_GLOBALS is refused with its path.
    """
    import importlib
    import pickle

    allowed = []
    for dotted in CHECKPOINT_SAFE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass  # another DeepSpeed version: that class is not pickled there either

    def load(path, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeError(f"checkpoint file {path} holds objects that are not weights; refusing to unpickle "
                               f"it ({first})") from None

    engine.checkpoint_engine.load = load


def _save_checkpoint(engine, state: dict, cfg: RunConfig, rank: int, export: bool, tokenizer) -> str:
    """All ranks write their DeepSpeed shard into a fresh local dir; Ray merges the dirs."""
    tmp = tempfile.mkdtemp(prefix=f"ckpt-r{rank}-")
    engine.save_checkpoint(tmp, tag=CKPT_TAG, exclude_frozen_parameters=True)
    if export:
        _write_export(engine, cfg, rank, tokenizer, Path(tmp) / EXPORT_DIR)
    if rank == 0:
        # Written last: a checkpoint without state.json is incomplete and never resumed from.
        (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
    return tmp


def _keep_local_checkpoint(tmp: str, cfg: RunConfig, name: str) -> str:
    """Local mode (`train.num_workers=0`) with local storage: move the finished checkpoint into
    `<storage>/<name>/<checkpoint dir>` (Ray would leave it in /tmp) and keep the newest
    `train.keep_checkpoints` of them. Remote storage: leave it where it is."""
    if is_remote(cfg.train.storage_path):
        return tmp
    run_dir = Path(cfg.train.storage_path) / cfg.train.name
    run_dir.mkdir(parents=True, exist_ok=True)
    dest, partial = run_dir / name, run_dir / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.move(tmp, partial)  # a copy when /tmp is another filesystem; the rename below is atomic
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    if cfg.train.keep_checkpoints:
        for old in sorted(run_dir.glob("checkpoint_*"), key=ckpt_order)[:-cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    return str(dest)


def _write_export(engine, cfg: RunConfig, rank: int, tokenizer, out_dir: Path) -> None:
    """Inference artefact (core.checkpoint format); under ZeRO-3 every rank helps gather."""
    from core.checkpoint import save_export

    params = list(engine.module.parameters())
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank == 0:
                save_export(engine.module, tokenizer, cfg, out_dir)
    elif rank == 0:
        save_export(engine.module, tokenizer, cfg, out_dir)


def _validate(engine, cfg: RunConfig, device, features=None, rank: int = 0, world: int = 1) -> dict:
    """Recall@K on the validation pairs (never test); each rank embeds its share of the notes."""
    from core.evaluation import validation_recall

    engine.module.eval()
    try:
        with torch.no_grad():
            report = validation_recall(engine.module, cfg.data.path, cfg, device, split="val", features=features,
                                       rank=rank, world=world)
    finally:
        engine.module.train()
    # final_metrics.json contract: core.metrics.metric_key names, interval bounds beside them
    return {**flatten_recall(report), **flatten_recall_ci(report)}


def _guarded_backward(engine, loss, backward, device, before_backward, step: int, rank: int) -> str | None:
    """Backward pass unless the step must be skipped; all ranks agree on the verdict.

    `backward` is `core.step.start_pair_step`'s: one `engine.backward`, or one per GradCache
    chunk with a single gradient reduction after the last.

    Returns:
        None when `engine.step()` may follow; otherwise what was non-finite. A non-finite loss
        gets no backward; non-finite gradients behind a finite loss are discarded here
        (`rayjobs.step_guard`), so neither reaches the weights.
    """
    if not _all_true(bool(torch.isfinite(loss).item()), device):
        return f"non-finite loss {loss.item()}"
    if before_backward is not None:
        before_backward(engine.module, step, rank)
    backward(engine.backward, engine.set_gradient_accumulation_boundary)
    if grads_finite(engine, device):
        return None
    discard_step(engine)
    return f"non-finite gradient behind a finite loss {loss.item():.4f}"


@dataclass
class TrainState:
    """The training loop's position and record: what a checkpoint's `state.json` holds besides
    the weights (`to_json`), read back on resume (`resume_state`) and by the leaderboard."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Epochs finished."""
    batches_in_epoch: int = 0
    """Batches of the current epoch consumed (skipped ones included)."""
    history: list = field(default_factory=list)
    """Per-step {step, loss}."""
    skipped_nonfinite: int = 0
    """Steps skipped for a non-finite loss or gradient (this attempt)."""
    resumes: list = field(default_factory=list)
    """{step, checkpoint} of every resume so far."""

    def to_json(self, engine, cfg: RunConfig, world: int) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "world_size": world,
                "history": self.history[-2000:], "skipped_nonfinite": self.skipped_nonfinite, "resumes": self.resumes,
                "trainable_checksum": _trainable_checksum(engine), "trained_config": _trained_config(cfg)}


def resume_state(engine, cfg: RunConfig, rank: int, world: int, device) -> tuple[TrainState, str]:
    """The run's state after loading the newest complete checkpoint (a fresh one if none), and the
    suffix for later checkpoint names (`pick_resume_dir`)."""
    import ray.train

    t = cfg.train
    checkpoint = ray.train.get_checkpoint()
    fs, storage_root = storage_fs(t.storage_path)
    chosen, ckpt_suffix = pick_resume_dir(checkpoint.path if checkpoint is not None else None,
                                          f"{storage_root.rstrip('/')}/{t.name}", rank,
                                          lambda flag: _all_true(flag, device), fs)
    if chosen is not None:
        checkpoint = ray.train.Checkpoint(path=str(chosen), filesystem=fs)
    if checkpoint is None:
        return TrainState(), ckpt_suffix
    name = Path(str(checkpoint.path)).name
    with checkpoint.as_directory() as ckpt_dir:
        problem = checkpoint_problem(ckpt_dir)
        if problem:
            raise RuntimeError(f"checkpoint {ckpt_dir} is incomplete: {problem}")
        state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
        changed = _config_change(state.get("trained_config"), _trained_config(cfg))
        if changed:
            raise RuntimeError(
                f"checkpoint {name} was trained with {changed}: resuming continues "
                f"the same model only; use a new train.name or delete {Path(t.storage_path) / t.name}")
        if state.get("world_size") != world:
            raise RuntimeError(
                f"checkpoint was written by {state.get('world_size')} workers but this run has {world}; "
                "ZeRO checkpoints only load at the same world size (set train.num_workers to match)")
        _load_weights_only(engine)
        engine.load_checkpoint(ckpt_dir, tag=CKPT_TAG, load_module_strict=False)
    expected, restored = state.get("trainable_checksum"), _trainable_checksum(engine)
    if expected is not None and restored is not None and not math.isclose(expected, restored, rel_tol=1e-9, abs_tol=1e-6):
        raise RuntimeError(f"checkpoint restore mismatch: trainable weights sum {restored} != saved {expected}")
    resumed = TrainState(step=state["step"], epoch=state["epoch"], batches_in_epoch=state["batches_in_epoch"],
                         history=state.get("history", []),
                         resumes=[*state.get("resumes", []), {"step": state["step"], "checkpoint": name}])
    if rank == 0:
        print(f"[train] resumed from step {resumed.step} (epoch {resumed.epoch}, batch {resumed.batches_in_epoch}) "
              f"of {name}", flush=True)
    return resumed, ckpt_suffix


def _report(engine, state: TrainState, metrics: dict, cfg: RunConfig, world: int, rank: int, tokenizer,
            ckpt_suffix: str, save: bool, final: bool = False) -> None:
    """`ray.train.report` of rank 0's metrics, with a checkpoint of the weights and `state` when `save`."""
    import ray.train

    t = cfg.train
    if not save:
        ray.train.report(metrics)
        return
    saved = state.to_json(engine, cfg, world)
    if saved["trainable_checksum"] is not None and not math.isfinite(saved["trainable_checksum"]):
        raise FloatingPointError(f"step {state.step}: the trainable weights are not finite; no checkpoint written")
    name = f"checkpoint_{state.step:08d}{ckpt_suffix}"
    tmp = _save_checkpoint(engine, saved, cfg, rank, final, tokenizer)
    if t.num_workers == 0:  # local mode: Ray keeps the dir where it is, so put it in the run dir
        tmp = _keep_local_checkpoint(tmp, cfg, name)
    try:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    finally:
        if t.num_workers > 0:  # local mode keeps the checkpoint where it was written
            shutil.rmtree(tmp, ignore_errors=True)


class _PreemptionWatch:
    """True once per run when Ray reports an imminent preemption (a collective: all ranks call it)."""

    def __init__(self, local_mode: bool):
        self.saved, self.local_mode = False, local_mode

    def pending(self) -> bool:
        import ray.train

        if self.saved or self.local_mode:
            return False
        self.saved = ray.train.get_preemption_info() is not None
        return self.saved


class _EagerBatches:
    """An epoch of the shard's batches whose streaming starts now, in a background thread, so
    that Ray Data's start (the read task, the preprocessing actor's process and first batch)
    overlaps whatever the worker does before its first step (the model build, DeepSpeed's init).
    Iterating it waits for that first batch, then continues the same iterator in this thread."""

    def __init__(self, batches: Iterable):
        import threading

        self._it = iter(batches)
        self._first: list = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch, name="first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first.append(next(self._it))
        except StopIteration:
            pass
        except BaseException as err:  # re-raised where the batches are consumed
            self._error = err

    def __iter__(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        self._first.clear()
        yield from self._it


def _log_scalars(writer, prefix: str, values: dict, step: int) -> None:
    if writer is not None:
        for k, v in values.items():
            if k not in ("step", "epoch") and isinstance(v, float) and math.isfinite(v):
                writer.add_scalar(f"{prefix}/{k}", v, step)


def _build_engine(cfg: RunConfig, rank: int, world: int, device):
    """Model, DeepSpeed engine and frozen-feature cache of one worker: (engine, tokenizer, features, total_steps)."""
    import deepspeed

    from core.data.features import feature_cache_for
    from core.deepspeed_config import load_deepspeed_config, use_this_interpreters_build_tools
    from core.model.builders import build_model, count_parameters

    t = cfg.train
    torch.manual_seed(t.seed)  # identical init on every rank; DeepSpeed also broadcasts rank 0's
    model, tokenizer = build_model(cfg.model, cfg.loss, seed=t.seed)
    model.to(device)
    # Before deepspeed.initialize: under ZeRO-3 the encoder's weights are whole only until then.
    # The driver left pixels out of the pipeline exactly when this returns a cache.
    features = feature_cache_for(model.vision, cfg)
    steps_per_epoch = _steps_per_epoch(cfg, world)
    total_steps = steps_per_epoch * t.epochs
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    ds_config = load_deepspeed_config(
        t.deepspeed, micro_batch_size=t.batch_size, world_size=world, lr=t.lr, weight_decay=t.weight_decay,
        warmup_steps=int(t.warmup_ratio * total_steps), total_steps=total_steps, grad_clip=t.grad_clip,
        precision=t.precision, use_gpu=t.use_gpu,
    )
    use_this_interpreters_build_tools()  # before DeepSpeed builds its shm op
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
    )
    if rank == 0:
        counts = count_parameters(model)
        print(f"[train] {cfg.train.name}: {world} worker(s), {t.deepspeed}, trainable {counts['trainable']:,} / "
              f"{counts['total']:,} params, {steps_per_epoch} steps/epoch, {total_steps} steps", flush=True)
    return engine, tokenizer, features, total_steps


def _step_row(engine, metrics: dict, state: TrainState, world: int, t0: float) -> tuple[dict, int]:
    """One taken step's logged metrics (loss, lr, grad norm, throughput) and its note count."""
    notes = int(metrics.pop("notes").item()) * world
    row = {k: float(v) for k, v in metrics.items()}
    grad_norm = engine.get_global_grad_norm()
    row.update(step=state.step, epoch=state.epoch, lr=float(engine.get_lr()[0]),
               grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
               notes_per_s=notes / max(time.time() - t0, 1e-9))
    return row, notes


def train_fn_per_worker(config: dict, *, wrap_batches: Callable[[Iterable], Iterable] | None = None) -> None:
    """Train one NoteLLM-2 run.

    `config["run"]` is a `RunConfig` dict. `config["before_backward"]` (optional) is called as
    `before_backward(module, step, rank)` before each backward pass, `step` being the step about
    to be taken; fault-injection tests register gradient hooks with it. It must be importable on
    the workers (Ray pickles a module-level function by reference).

    `wrap_batches`, when given, wraps each epoch's batch iterator of the Ray Data shard (the
    benchmark times batch arrivals with it); it must yield the same batches.
    """
    import ray.train

    from core.step import start_pair_step

    cfg = RunConfig.from_dict(config["run"], "train_loop_config")
    before_backward = config.get("before_backward")
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device(t.use_gpu)
    _init_process_group_if_local(t.use_gpu)
    shard = ray.train.get_dataset_shard("train")

    def epoch_batches() -> Iterable:
        return shard.iter_torch_batches(batch_size=t.batch_size, drop_last=True)

    first_epoch = _EagerBatches(epoch_batches())  # streams while the model builds
    engine, tokenizer, features, total_steps = _build_engine(cfg, rank, world, device)
    state, ckpt_suffix = resume_state(engine, cfg, rank, world, device)
    start_epoch, skip_batches, first_step = state.epoch, state.batches_in_epoch, state.step

    def report(metrics: dict, save: bool, final: bool = False) -> None:
        _report(engine, state, metrics, cfg, world, rank, tokenizer, ckpt_suffix, save, final)

    writer = None
    if rank == 0 and not is_remote(t.storage_path):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(Path(t.storage_path) / t.name / "tensorboard"))
    preemption = _PreemptionWatch(local_mode=t.num_workers == 0)
    t_start, notes_seen, last_metrics = time.time(), 0, {}
    while state.epoch < t.epochs and state.step < total_steps:
        state.batches_in_epoch = 0
        batches, first_epoch = first_epoch or epoch_batches(), None
        for batch in (wrap_batches or iter)(batches):
            state.batches_in_epoch += 1
            if state.epoch == start_epoch and state.batches_in_epoch <= skip_batches:
                continue  # consumed before the interruption
            t0 = time.time()
            loss, metrics, backward = start_pair_step(engine, batch, cfg.loss, device, features)
            nonfinite = _guarded_backward(engine, loss, backward, device, before_backward, state.step + 1, rank)
            if nonfinite:
                state.skipped_nonfinite += 1
                msg = f"[train] step {state.step + 1}: {nonfinite} ({state.skipped_nonfinite} skipped)"
                if t.nan_policy == "stop":
                    raise FloatingPointError(msg + "; nan_policy=stop")
                if rank == 0:
                    print(msg + "; step skipped (nan_policy=skip)", flush=True)
                continue  # nothing reached the weights, so nothing reaches a checkpoint
            engine.step()
            state.step += 1
            row, notes = _step_row(engine, metrics, state, world, t0)
            notes_seen += notes
            state.history.append({"step": state.step, "loss": row["loss"]})
            last_metrics = row
            _log_scalars(writer, "train", row, state.step)
            if rank == 0 and (state.step % t.log_every == 0 or state.step == total_steps):
                elapsed = time.time() - t_start
                eta = (total_steps - state.step) * elapsed / max(state.step - first_step, 1)
                print(f"[train] step {state.step}/{total_steps} loss {row['loss']:.4f} temp {row['temperature']:.4f} "
                      f"lr {row['lr']:.2e} {notes_seen / max(elapsed, 1e-9):.1f} notes/s ETA {eta:.0f}s", flush=True)
            if state.step >= total_steps:
                break
            if t.checkpoint_every and state.step % t.checkpoint_every == 0:
                report(row, save=True)
            elif preemption.pending():
                # A node of this run is draining (spot reclaim): save now, keep training until it goes.
                if rank == 0:
                    print(f"[train] node preemption notice at step {state.step}: just-in-time checkpoint", flush=True)
                report(row, save=True)
        if state.step >= total_steps:
            break  # the final validation and checkpoint follow
        state.epoch += 1
        state.batches_in_epoch = 0
        if cfg.eval.every_epoch:
            val = _validate(engine, cfg, device, features, rank, world)
            _log_scalars(writer, "val", val, state.step)
            report({**last_metrics, **val, "step": state.step, "epoch": state.epoch}, save=True)
    val = _validate(engine, cfg, device, features, rank, world)
    _log_scalars(writer, "val", val, state.step)
    if writer is not None:
        writer.close()
    final = {**last_metrics, **val, "step": state.step, "steps": state.step, "skipped_nonfinite": state.skipped_nonfinite,
             "train_seconds": time.time() - t_start, "done": 1}
    report(final, save=True, final=True)
