"""Typed run configuration: dataclasses validated on construction, YAML as their serialised form.

Every field carries a one-line docstring (the string literal after it); `rayjobs.configref`
turns those into the README's configuration reference, so they are the documentation.

A bad value fails at construction with a `ConfigError` naming the field, the value and what is
allowed; an unknown key fails with a did-you-mean. Plain dicts only appear at the Ray boundary
(`RunConfig.to_dict` / `RunConfig.from_dict`).

    cfg = load_run_config("rayjobs/configs/smoke.yaml", overrides=["loss.alpha=3"])
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from core.data.corpora import CORPORA
from core.metrics import TIES, parse_metric_key

PROMPT_MODES = ("text", "basic", "micl")
CONNECTORS = ("qformer", "mlp")
LANGUAGES = ("en", "zh")
GATHER_MODES = ("none", "no_grad", "with_grad")
DTYPES = ("float32", "bfloat16")
ZERO_CONFIGS = ("zero0", "zero1", "zero2", "zero3", "zero3_offload")
NAN_POLICIES = ("skip", "stop")
MODALITIES = ("both", "image", "text")
FEATURE_CACHE_MODES = ("auto", "off")
EVAL_POOLS = ("catalog", "official", "targets")
"""Candidate pools of the evaluation protocol (`core.evaluation.build_protocol`)."""
TIE_POLICIES = TIES
RUN_NAME = re.compile(r"[A-Za-z0-9._-]*")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the field and what is allowed."""


def _fail(section: str, name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{section}.{name}={value!r} is invalid: allowed {allowed}")


def _check_choice(section: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(section, name, value, "one of " + ", ".join(map(str, choices)))


def _check_range(section: str, name: str, value: Any, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(section, name, value, "a number")
    if value != value:  # NaN
        _fail(section, name, value, "a finite number")
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        _fail(section, name, value, f"a value in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}")


def _matches(value: Any, hint: Any) -> bool:
    if get_origin(hint) in (Union, types.UnionType):
        return any(_matches(value, a) for a in get_args(hint))
    if get_origin(hint) is list:
        return isinstance(value, list) and all(_matches(v, get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _describe(hint: Any) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if get_origin(hint) is list:
        return f"a list of ({_describe(get_args(hint)[0])})"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _check_types(config: Any, section: str) -> None:
    """Every field holds a value of its annotated type (`true` for a bool, not `maybe`; an int
    seed, not `1.5`). Runs after the field-specific checks, whose messages are more precise."""
    for name, hint in get_type_hints(type(config)).items():
        value = getattr(config, name)
        if not _matches(value, hint):
            _fail(section, name, value, _describe(hint))


@dataclass
class ModelConfig:
    """The multimodal representation model (REFERENCE §3-§5)."""

    llm: str = "smollm2-135m"
    """LLM: a registry name (`smollm2-135m`, `tiny-llama`) or a Hugging Face causal-LM directory/id."""
    llm_num_layers: int | None = None
    """Keep only the first k decoder layers of the LLM (CPU demos); null keeps all."""
    vision: str = "mobilenet_v2"
    """Frozen vision encoder: `mobilenet_v2`, `tiny-cnn`, `tiny-vit`, or a Hugging Face vision model directory/id."""
    image_size: int = 224
    """Square side images are resized to before the vision encoder."""
    connector: str = "qformer"
    """Connector turning vision features into L visual tokens: `qformer` (paper) or `mlp` (pool + MLP)."""
    num_visual_tokens: int = 16
    """L, the number of visual tokens spliced in place of `<IMG>`."""
    qformer_layers: int = 6
    """Q-Former depth (paper: 6)."""
    qformer_heads: int = 8
    """Q-Former attention heads."""
    qformer_dim: int = 0
    """Q-Former width; 0 uses the vision feature width."""
    prompt_mode: str = "micl"
    """`text` (no image tokens), `basic` (one compression slot), `micl` (visual + multimodal slots)."""
    language: str = "en"
    """Prompt template language: `en` (English rendering) or `zh` (official Chinese)."""
    late_fusion: bool = True
    """Mix the vision CLS feature back into the note embedding with a gate (REFERENCE §5)."""
    gate_bias: bool = True
    """Gate has a bias term (paper); false follows the official code."""
    output_dim: int | None = 64
    """Bias-free output head h_t -> d_out; null keeps the LLM width."""
    lora: bool = True
    """Train LoRA adapters on the LLM (peft); false fine-tunes the whole LLM."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: int = 16
    """LoRA scaling alpha."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """LLM module-name suffixes that get LoRA adapters."""
    gradient_checkpointing: bool = False
    """Recompute LLM activations in the backward pass to save memory."""
    max_text_tokens: int = 140
    """Token budget of the note text; the compression suffix is appended after truncation."""
    title_max_chars: int = 20
    """Title truncation (official: 20 characters)."""
    content_max_chars: int = 80
    """Content truncation (official: 80 characters)."""
    max_topics: int = 10
    """At most this many topics per note."""
    dtype: str = "float32"
    """Parameter dtype of the LLM and connector: `float32` or `bfloat16`."""

    def __post_init__(self) -> None:
        s = "model"
        if not isinstance(self.llm, str) or not self.llm:
            _fail(s, "llm", self.llm, "a registry name or a model path")
        if self.llm_num_layers is not None:
            _check_range(s, "llm_num_layers", self.llm_num_layers, lo=1)
        if not isinstance(self.vision, str) or not self.vision:
            _fail(s, "vision", self.vision, "a registry name or a model path")
        _check_range(s, "image_size", self.image_size, lo=16)
        _check_choice(s, "connector", self.connector, CONNECTORS)
        if isinstance(self.num_visual_tokens, bool) or not isinstance(self.num_visual_tokens, int) or self.num_visual_tokens <= 0:
            _fail(s, "num_visual_tokens", self.num_visual_tokens, "an integer >= 1")
        _check_range(s, "qformer_layers", self.qformer_layers, lo=1)
        _check_range(s, "qformer_heads", self.qformer_heads, lo=1)
        _check_range(s, "qformer_dim", self.qformer_dim, lo=0)
        _check_choice(s, "prompt_mode", self.prompt_mode, PROMPT_MODES)
        _check_choice(s, "language", self.language, LANGUAGES)
        if self.output_dim is not None and (isinstance(self.output_dim, bool) or not isinstance(self.output_dim, int) or self.output_dim <= 0):
            _fail(s, "output_dim", self.output_dim, "an integer >= 1, or null for no head")
        _check_range(s, "lora_rank", self.lora_rank, lo=1)
        _check_range(s, "lora_alpha", self.lora_alpha, lo=0, lo_open=True)
        _check_range(s, "lora_dropout", self.lora_dropout, lo=0, hi=1, hi_open=True)
        if not isinstance(self.lora_targets, list) or not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            _fail(s, "lora_targets", self.lora_targets, "a non-empty list of module-name suffixes")
        _check_range(s, "max_text_tokens", self.max_text_tokens, lo=8)
        _check_range(s, "title_max_chars", self.title_max_chars, lo=1)
        _check_range(s, "content_max_chars", self.content_max_chars, lo=0)
        _check_range(s, "max_topics", self.max_topics, lo=0)
        _check_choice(s, "dtype", self.dtype, DTYPES)
        _check_types(self, s)


@dataclass
class LossConfig:
    """The contrastive loss (REFERENCE §4, §6)."""

    temperature_init: float = 3.0
    """tau: initial log-scale of the logits (scale = e^tau; 3.0 -> 20.1, i.e. temperature 0.05)."""
    learnable_temperature: bool = True
    """Learn tau (official) or keep it fixed at its initial value."""
    max_log_scale: float = 4.6052
    """tau is clamped to [0, max_log_scale] in the loss (4.6052 = ln 100) so logits stay finite."""
    alpha: float = 9.0
    """mICL loss ratio: L = (L_v + alpha * L_m) / (1 + alpha)."""
    gather: str = "no_grad"
    """Cross-worker negatives: `none`, `no_grad` (official: gathered copies, local rows keep grads) or `with_grad`."""
    mask_duplicates: bool = True
    """Drop negatives that are the same note as the anchor or its positive."""
    matryoshka_dims: list[int] = field(default_factory=list)
    """Matryoshka training: the loss sums the contrastive loss of each leading prefix of the embedding, e.g. [8, 16, 32, 64] (increasing, at most the embedding width; each prefix normalised on its own); empty trains the full embedding only."""
    matryoshka_weights: list[float] | None = None
    """Weight of each Matryoshka dimension's loss (one per entry of matryoshka_dims); null weighs them all 1."""
    grad_cache_chunk_size: int = 0
    """GradCache: embed the batch in chunks of this many pairs (graph-free first pass, full-batch loss, then per-chunk replay with graph), so a large contrastive batch fits in memory; same step as unchunked; 0 is off."""

    def __post_init__(self) -> None:
        s = "loss"
        _check_range(s, "temperature_init", self.temperature_init, lo=0, hi=self.max_log_scale if isinstance(self.max_log_scale, (int, float)) else None)
        _check_range(s, "max_log_scale", self.max_log_scale, lo=0, hi=20, lo_open=True)
        _check_range(s, "alpha", self.alpha, lo=0)
        _check_choice(s, "gather", self.gather, GATHER_MODES)
        dims = self.matryoshka_dims
        if not isinstance(dims, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims) \
                or any(b <= a for a, b in zip(dims, dims[1:])):
            _fail(s, "matryoshka_dims", dims, "a strictly increasing list of integers >= 1, e.g. [8, 16, 32, 64], or []")
        weights = self.matryoshka_weights
        if weights is not None:
            if not dims:
                _fail(s, "matryoshka_weights", weights, "null while matryoshka_dims is empty")
            if not isinstance(weights, list) or len(weights) != len(dims):
                _fail(s, "matryoshka_weights", weights, f"null or a list of {len(dims)} numbers, one per matryoshka_dims entry")
            for w in weights:
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                    _fail(s, "matryoshka_weights", weights, "numbers >= 0")
            self.matryoshka_weights = [float(w) for w in weights]
        _check_range(s, "grad_cache_chunk_size", self.grad_cache_chunk_size, lo=0)
        _check_types(self, s)


@dataclass
class DataConfig:
    """Where the prepared corpus lives and how it streams into training."""

    corpus: str = "synthetic"
    """Corpus adapter (`core.data.corpora.CORPORA`) a run prepares into `path` when it has no prepared data: `synthetic`, `tuxpaint`, `movielens`, `openclipart`; `qilin` and `parquet` read your files, so prepare them first (`python -m rayjobs.prepare_data --corpus parquet --input DIR --out PATH`)."""
    path: str = "runs/data/synthetic"
    """Prepared data directory (notes.parquet, pairs_train/val/test.parquet); local, NFS, s3:// or gs://."""
    num_notes: int | None = 400
    """Corpus size: the synthetic corpus's size, or a seeded subset of a real corpus; null keeps the whole real corpus."""
    short_text_chars: int = 20
    """A note whose title+content is shorter than this is 'short' (the short-query / short-target subsets)."""
    preprocess_actors: int = 1
    """Ray Data actors that decode images and tokenise prompts."""
    pair_join: str = "auto"
    """How pairs meet their notes: `broadcast` (each preprocessing actor loads notes.parquet once and looks notes up by id: starts in seconds, holds the notes table per actor), `shuffle` (Ray Data hash join: for notes tables that do not fit an actor), `auto` (broadcast when notes.parquet is at most 1 GiB)."""
    seed: int = 0
    """Seed of the corpus generator and the train/test split."""
    hard_negatives: int = 0
    """Mined hard negatives per training pair (0 = in-batch negatives only): each pair's first K `negative_ids` (written by `python -m rayjobs.mine_negatives`, nearest first) join the loss as extra candidates for every row; empty slots are masked, and with loss.mask_duplicates (the default) so is a negative that is the row's own note or positive; needs the broadcast pair join."""
    feature_cache: str = "auto"
    """Frozen vision features: `auto` computes the encoder's outputs (patch tokens + pooled feature) once per corpus into `<path>/feature_cache/` and trains, validates and evaluates on them instead of decoding and encoding images (a changed encoder, image size, preprocessing or image recomputes them; a corrupt cache is rebuilt); `off` encodes images every step. Remote `path`s (s3://, gs://) always encode."""

    def __post_init__(self) -> None:
        s = "data"
        _check_choice(s, "corpus", self.corpus, CORPORA)
        if self.num_notes is not None:
            _check_range(s, "num_notes", self.num_notes, lo=4)
        _check_range(s, "short_text_chars", self.short_text_chars, lo=0)
        _check_range(s, "preprocess_actors", self.preprocess_actors, lo=1)
        _check_choice(s, "pair_join", self.pair_join, ("auto", "broadcast", "shuffle"))
        if self.feature_cache is False:  # YAML 1.1 reads a bare `off` as false
            self.feature_cache = "off"
        _check_choice(s, "feature_cache", self.feature_cache, FEATURE_CACHE_MODES)
        _check_range(s, "seed", self.seed, lo=0)
        _check_range(s, "hard_negatives", self.hard_negatives, lo=0)
        if self.hard_negatives and self.pair_join == "shuffle":
            _fail(s, "pair_join", self.pair_join, "auto or broadcast with data.hard_negatives (negatives are looked up by id)")
        _check_types(self, s)



@dataclass
class PrepareConfig:
    """How `core.data.prepare` turns a corpus into a prepared data directory (the flags of
    `python -m rayjobs.prepare_data`). None for an adapter option means the adapter's default."""

    num_notes: int | None = None
    """Corpus size (synthetic) or a seeded subset (real corpora); None: the adapter's default / all."""
    seed: int = 0
    """Seed of generation, subsets and the train/val/test split."""
    short_fraction: float = 0.3
    """synthetic, tuxpaint, openclipart: fraction of notes stripped to an uninformative title."""
    lower: float = 0.0
    """Smallest co-occurrence score kept (inclusive)."""
    upper: float = float("inf")
    """Largest co-occurrence score kept (inclusive)."""
    top_t: int = 10
    """Targets kept per query note."""
    test_fraction: float = 0.2
    """Fraction of query notes held out for test."""
    val_fraction: float = 0.1
    """Fraction of query notes held out for validation (disjoint from test; what runs are chosen by)."""
    short_text_chars: int = 20
    """A note with fewer title+content characters is 'short'."""
    embed_images: bool = True
    """Store image bytes in notes.parquet; false keeps `image_uri` references."""
    input: str | None = None
    """Source directory (qilin, parquet: required; tuxpaint, movielens, openclipart: overrides the installed asset)."""
    image_root: str | None = None
    """qilin, openclipart: directory or URI the image paths are relative to."""
    num_users: int | None = None
    """Generated corpora: simulated users."""
    events_per_user: int | None = None
    """Generated corpora: clicks per simulated user."""
    category_depth: int | None = None
    """tuxpaint, openclipart: folder levels that make a note's category."""
    num_topics: int | None = None
    """synthetic: topics."""
    num_variants: int | None = None
    """synthetic: near-duplicate variants per item."""
    image_px: int | None = None
    """synthetic: side of the generated images."""
    split: str | None = None
    """qilin: which session split is the click log."""

    def __post_init__(self) -> None:
        s = "prepare"
        _check_range(s, "short_fraction", self.short_fraction, lo=0, hi=1)
        for name in ("test_fraction", "val_fraction"):
            _check_range(s, name, getattr(self, name), lo=0, hi=1, hi_open=True)
        if self.test_fraction + self.val_fraction >= 1:
            _fail(s, "val_fraction", self.val_fraction, f"test_fraction + val_fraction < 1 (test_fraction={self.test_fraction})")
        for name in ("num_notes", "num_users", "events_per_user", "category_depth", "num_topics", "num_variants", "image_px"):
            if getattr(self, name) is not None:
                _check_range(s, name, getattr(self, name), lo=1)
        _check_range(s, "top_t", self.top_t, lo=1)
        _check_range(s, "lower", self.lower, lo=0)
        _check_range(s, "upper", self.upper, lo=self.lower)
        _check_range(s, "short_text_chars", self.short_text_chars, lo=0)
        _check_range(s, "seed", self.seed, lo=0)
        _check_types(self, s)

    ADAPTER_ONLY = ("input", "image_root", "num_users", "events_per_user", "category_depth", "num_topics",
                    "num_variants", "image_px", "split")

    def adapter_options(self) -> dict:
        """What a corpus adapter is given: the set options an adapter takes (`build_corpus`
        passes each adapter the ones its signature names)."""
        shared = ("num_notes", "seed", "short_fraction")
        return {k: getattr(self, k) for k in (*shared, *self.ADAPTER_ONLY) if getattr(self, k) is not None}

    def to_dict(self) -> dict:
        """JSON-ready (the report's `info.options`): an unbounded `upper` is null."""
        return {k: (None if v == float("inf") else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class TrainConfig:
    """Optimisation, distribution and checkpointing."""

    num_workers: int = 2
    """Ray Train workers (one per GPU on GPU clusters); 0 runs Ray Train local mode in-process."""
    use_gpu: bool = False
    """Place workers on GPUs (NCCL, bf16) instead of CPUs (gloo)."""
    cpus_per_worker: float = 1.0
    """Logical CPUs per worker; fractional values leave CPU for the Ray Data pipeline."""
    deepspeed: str = "zero2"
    """DeepSpeed config picked by name from cluster/deepspeed/: zero0, zero1, zero2, zero3, zero3_offload."""
    batch_size: int = 8
    """Related pairs per worker per step (2x notes)."""
    epochs: int = 1
    """Passes over the training pairs."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 means run all epochs."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.001
    """AdamW weight decay (official 0.001)."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear warm-up (official 10%)."""
    grad_clip: float = 1.0
    """Gradient-norm clip; 0 disables."""
    precision: str = "float32"
    """Training precision: `float32` or `bfloat16`."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (and always at the end); 0 only at the end."""
    keep_checkpoints: int = 2
    """Checkpoints kept by Ray Train."""
    log_every: int = 1
    """Print a progress line every N steps."""
    max_failures: int = 0
    """Ray Train FailureConfig retries after a worker dies."""
    nan_policy: str = "skip"
    """A non-finite loss or gradient (any rank) `skip`s the step on every rank (logged, counted) or `stop`s the run."""
    seed: int = 0
    """Seed of model init, data order and dropout."""
    name: str = ""
    """Run name; reruns with the same name and storage resume. Empty derives one from the config file name."""
    storage_path: str = "runs"
    """Where runs, checkpoints and metrics go; local, NFS, s3:// or gs://."""

    def __post_init__(self) -> None:
        s = "train"
        _check_range(s, "num_workers", self.num_workers, lo=0)
        _check_range(s, "cpus_per_worker", self.cpus_per_worker, lo=0, lo_open=True)
        _check_choice(s, "deepspeed", self.deepspeed, ZERO_CONFIGS)
        _check_range(s, "batch_size", self.batch_size, lo=1)
        _check_range(s, "epochs", self.epochs, lo=1)
        _check_range(s, "max_steps", self.max_steps, lo=0)
        _check_range(s, "lr", self.lr, lo=0, lo_open=True, hi=1)
        _check_range(s, "weight_decay", self.weight_decay, lo=0)
        _check_range(s, "warmup_ratio", self.warmup_ratio, lo=0, hi=1)
        _check_range(s, "grad_clip", self.grad_clip, lo=0)
        _check_choice(s, "precision", self.precision, DTYPES)
        _check_range(s, "checkpoint_every", self.checkpoint_every, lo=0)
        _check_range(s, "keep_checkpoints", self.keep_checkpoints, lo=1)
        _check_range(s, "log_every", self.log_every, lo=1)
        _check_range(s, "max_failures", self.max_failures, lo=-1)
        _check_choice(s, "nan_policy", self.nan_policy, NAN_POLICIES)
        _check_range(s, "seed", self.seed, lo=0)
        if not isinstance(self.name, str) or not RUN_NAME.fullmatch(self.name) or self.name in (".", ".."):
            _fail(s, "name", self.name, "letters, digits, '.', '_' and '-' (a directory name), or empty")
        if not isinstance(self.storage_path, str) or not self.storage_path:
            _fail(s, "storage_path", self.storage_path, "a local path, NFS path, s3:// or gs:// URI")
        _check_types(self, s)


@dataclass
class EvalConfig:
    """Validation and evaluation protocol (REFERENCE §7)."""

    ks: list[int] = field(default_factory=lambda: [10, 100, 1000, 10000])
    """Recall@K cut-offs; a K larger than the candidate pool is reported as not applicable."""
    metric: str = "R@100"
    """Metric that ranks runs and trials: `R@<k>` (all pairs) or `short_query/R@<k>`, `short_target/R@<k>`."""
    batch_size: int = 32
    """Notes per embedding batch."""
    chunk_size: int = 8192
    """Candidates scored per chunk in exact recall (bounds memory)."""
    every_epoch: bool = True
    """Run validation recall at the end of every epoch (always at the end of training)."""
    pool: str = "catalog"
    """Candidate pool: `catalog` (every note minus the queries), `official` (the held-out split's notes minus the queries) or `targets` (reduced: the pairs' targets)."""
    ties: str = "expected"
    """Tied scores in Recall@K: `expected` (uniform random tie-breaking, exact), `pessimistic` or `optimistic`."""

    def __post_init__(self) -> None:
        s = "eval"
        if not isinstance(self.ks, list) or not self.ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.ks):
            _fail(s, "ks", self.ks, "a non-empty list of integers >= 1")
        if parse_metric_key(self.metric) is None:
            _fail(s, "metric", self.metric, "'R@<k>', 'short_query/R@<k>' or 'short_target/R@<k>'")
        _check_range(s, "batch_size", self.batch_size, lo=1)
        _check_range(s, "chunk_size", self.chunk_size, lo=1)
        _check_choice(s, "pool", self.pool, EVAL_POOLS)
        _check_choice(s, "ties", self.ties, TIE_POLICIES)
        _check_types(self, s)


@dataclass
class RunConfig:
    """One training run: model, loss, data, training and evaluation settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.model.dtype == "bfloat16" and self.train.precision == "float32":
            # bf16 parameters stepped without fp32 master weights: small updates round to zero
            _fail("model", "dtype", self.model.dtype, "float32 when train.precision=float32 (bfloat16 parameters "
                  "need train.precision=bfloat16, whose optimizer keeps fp32 master weights)")
        # Cross-section checks: the Matryoshka prefixes must fit the embedding the model emits.
        dims, width = self.loss.matryoshka_dims, self.model.output_dim
        if dims and width is not None and dims[-1] > width:
            _fail("loss", "matryoshka_dims", dims, f"dimensions at most the embedding width model.output_dim={width}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "RunConfig":
        return from_dict(cls, raw, source)


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _coerce(section: str, name: str, value: Any, hint: Any) -> Any:
    """YAML gives ints where floats are meant (`lr: 1`); accept those, nothing looser."""
    if hint in (float, "float") and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (float, "float") and isinstance(value, str):
        try:
            return float(value)  # yaml reads "1e-4" as a string
        except ValueError:
            _fail(section, name, value, "a number")
    return value


def from_dict(cls: type, raw: Any, source: str = "config", section: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys with a did-you-mean."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {section or 'top level'} must be a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            where = f"{section}.{key}" if section else str(key)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(names)})"
            raise ConfigError(f"{source}: unknown key '{where}'{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, source, key)
        else:
            kwargs[key] = _coerce(section, key, value, hint)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`--set section.key=value` strings -> `{"section.key": value}`, each value parsed as YAML
    once, here (`3` an int, `1e-4` a float, `[a, b]` a list, `null` None, `false` a bool)."""
    values: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. loss.alpha=3")
        values[key.strip()] = yaml.safe_load(text) if text.strip() else None
    return values


def with_values(raw: dict, values: Mapping[str, Any]) -> dict:
    """A copy of the nested config dict `raw` with typed `section.key` values set: the one way
    `--set`, a sweep's fixed parameters and a trial's sampled values reach a config. Sections are
    checked here; keys and values when the result goes through `RunConfig.from_dict`."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for key, value in values.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS:
            near = difflib.get_close_matches(section, list(SECTIONS), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (sections: {', '.join(SECTIONS)})"
            raise ConfigError(f"{key!r}: unknown section '{section}'{hint}")
        if not name:
            raise ConfigError(f"{key!r}: expected section.key, e.g. loss.alpha")
        out.setdefault(section, {})
        out[section][name] = value
    return out


def load_run_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run YAML (or the defaults when `path` is None), apply overrides, validate."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {str(err).splitlines()[0]}") from None
        source = str(p)
        if raw.get("train") is None:
            raw["train"] = {}
        if isinstance(raw["train"], dict) and not raw["train"].get("name"):
            raw["train"]["name"] = p.stem  # reruns of one config file resume one run
    raw = with_values(raw, parse_set(overrides))
    return RunConfig.from_dict(raw, source)


def dump_run_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
