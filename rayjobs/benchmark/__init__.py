"""Performance suite: every figure is a ratio against a baseline measured in the same run.

Local (starts an embedded Ray when RAY_ADDRESS is unset):

    python -m rayjobs.benchmark --size toy --out runs/bench-toy                 # every suite, seconds-to-minutes (CI)
    python -m rayjobs.benchmark --size full --out runs/bench --write-md BENCHMARKS.md   # < 20 min on 2 cores
    python -m rayjobs.benchmark --suite recall --suite mining --out runs/bench  # a subset

On a cluster (the head node runs the driver; `train` and `embed` use the cluster's workers):

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env cluster/runtime_env.yaml -- \\
        python -m rayjobs.benchmark --size full --out /mnt/shared/bench

Suites (`--suite`, repeatable; default all):
    train    notes/s of Ray Train + Ray Data + DeepSpeed (1 worker) / a plain PyTorch loop over the
             same model, data and batch; 2 workers / 1 worker; start-up reported separately.
    input    Ray Data pipeline supply (images decoded + prompts tokenised /s) / trainer demand, and
             the fraction of steady step time the trainer waits inside the data iterator's next().
    embed    notes/s of the Ray Data actor-pool embedding / a plain loop at equal parallelism; 2 / 1 actors.
    recall   exact chunked Recall@K (core.metrics) / a full-argsort implementation: time and peak RSS.
    mining   events/s of core.data.pairs.mine_pairs / a straightforward pandas group-by implementation.
    gpu_mfu  model FLOPs utilisation of a bf16 ZeRO-2 step (SmolLM2 default, a 1B-class random Llama);
             skipped, with the reason recorded, when no CUDA GPU is visible.

Writes <out>/benchmarks.json and <out>/benchmarks.md; `--write-md PATH` also writes PATH.
Absolute figures carry min/median/max over repeats (or over equal blocks of steady-state steps).

Package layout: `harness` (sizes, targets, shared context, timing helpers), one module per suite
(`train`, `input_pipeline`, `embed`, `recall`, `mining`, `gpu_mfu`, each with `run(ctx) -> dict`),
`report` (the Markdown renderer; its prose lives in `report.md`), `cli` (the command line).
"""
