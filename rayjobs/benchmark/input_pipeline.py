"""Suite `input`: Ray Data pipeline supply (images decoded + prompts tokenised /s) against trainer
demand, and the fraction of steady step time the trainer waits inside the data iterator's next()."""

from __future__ import annotations

import time

import numpy as np

from core.data.pipeline import NotePreprocessor, pair_dataset
from core.evaluation import read_notes
from rayjobs.benchmark.harness import TARGETS, Context, figure, log, spread
from rayjobs.benchmark.train import run_ray_training
from rayjobs.train import ensure_ray


def run(ctx: Context) -> dict:
    ensure_ray()
    cfg = ctx.run_cfg(1, "bench-input")
    # In-process capacity of the preprocessing transform (one core): the reference unit.
    prep = NotePreprocessor(cfg.model)
    notes = read_notes(cfg.data.path)
    local_rates = []
    for _ in range(3):
        t0 = time.time()
        for i in range(0, notes.num_rows, 64):
            prep(notes.slice(i, 64))
        local_rates.append(notes.num_rows / (time.time() - t0))
    # The Ray Data pipeline alone (pair join + actor-pool preprocessing), steady state after the first batch.
    pipe_rates, first_batch = [], []
    for rep in range(ctx.p["pipeline_repeats"]):
        log(f"input: Ray Data pair pipeline pass {rep + 1}/{ctx.p['pipeline_repeats']}")
        start = time.time()
        rows = 0
        for batch in pair_dataset(cfg.data.path, "train", cfg).iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy"):
            if not rows:
                first_batch.append(time.time() - start)
            rows += len(batch["q_note_id"])
        # Whole pass, join and actor start included (a lower bound on the streaming rate): the join
        # is a barrier, so on a small corpus most rows are ready by the time the first one arrives.
        pipe_rates.append(2 * rows / (time.time() - start))  # 2 notes (image + prompt) per pair row
    one = run_ray_training(ctx, 1)["rank0"]
    demand = one["notes_per_s"]["median"]
    waits = {"ray_1w": one["wait_fraction"]}
    if 2 in ctx.runs:
        waits["ray_2w"] = ctx.runs[2]["rank0"]["wait_fraction"]
    return {
        "figures": {
            "data_wait_fraction_1w": figure(one["wait_fraction"], TARGETS["data_wait_fraction"], False,
                                            "time in the shard iterator's next() / steady step time (Ray 1 worker)"),
            "pipeline_supply_over_trainer_demand": figure(float(np.median(pipe_rates)) / demand, 1.0, True,
                                                          "notes/s of a whole Ray Data pipeline pass (join, actor start included) / notes/s the 1-worker trainer consumes"),
            "pipeline_over_one_core": figure(float(np.median(pipe_rates)) / float(np.median(local_rates)), None, True,
                                             "Ray Data pipeline notes/s / NotePreprocessor in-process on one core"),
        },
        "absolute": {
            "preprocess_in_process_notes_per_s": spread(local_rates, "notes/s"),
            "pipeline_notes_per_s": spread(pipe_rates, "notes/s"),
            "pipeline_first_batch_s": spread(first_batch, "s"),
            "trainer_demand_notes_per_s": one["notes_per_s"],
            "wait_fraction_per_step_1w": one["wait_fraction_per_step"],
        },
        "config": {"wait_fraction_by_run": waits, "preprocess_actors": cfg.data.preprocess_actors,
                   "note": "one note = one image decoded and resized + one prompt tokenised"},
    }
