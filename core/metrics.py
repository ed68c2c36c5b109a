"""Retrieval metrics: exact target ranks with ties, Recall@K, bootstrap intervals, a FAISS path.

The contract (REFERENCE §7): for each query, `above` counts the pool candidates scoring strictly
higher than the target and `tied` those scoring exactly the target's score (the target never
competes with itself). Recall@K under ties (`ties=`):

- `expected` (default): the exact expectation under uniformly random tie-breaking: a query
  contributes 0 if above >= K, 1 if above + tied < K, else (K - above) / (tied + 1). A model whose
  embeddings all coincide scores K / |pool|, never 1.
- `pessimistic`: every tie beats the target (hit iff above + tied < K).
- `optimistic`: no tie beats the target (hit iff above < K; the pre-0.2 rule).

Embeddings are *not* normalised here: the caller decides the geometry.

    above, tied = target_rank_counts(q, c, target_index)           # exact, no sort of the pool
    recall = recall_at_k(q, c, target_index, ks=[10, 100])          # {10: 0.41, 100: 0.87}
    hits = query_hits(above, tied, 10)                              # float64 [Q], mean = R@10
    lo, hi = recall_ci(hits)                                        # 95 % bootstrap over queries
    lo, hi = paired_recall_ci(hits_a, hits_b)                       # interval of mean(a - b)

Exact ranks never sort the pool: candidates are scored `chunk_size` rows at a time and each
query counts the candidates above (and tied with) its target, so memory is
O(query_chunk_size * chunk_size) whatever the pool size. Pools in the millions can use
`approximate_recall_at_k` (FAISS HNSW or IVF inner-product index), whose tie policy is FAISS's:
equal scores come back in an arbitrary order, so a tie may or may not beat the target.

Metric names have one home here: `metric_key("short_query", 10)` -> "short_query/R@10" (all
pairs: "R@10"), `parse_metric_key`, `flatten_recall` / `unflatten_recall` between the nested
{"all": {"R@10": ..}, ..} mapping and the flat keys that runs report, and `SPLIT_PREFIXES` for
the leaderboard's `val/` and `test/` columns. Recall of a Matryoshka prefix (the embedding
truncated to its first d coordinates, re-normalised) carries a dim component:
`metric_key("all", 10, dim=16)` -> "dim16/R@10", nested as {"dims": {16: {"all": ..}}}.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

NOT_APPLICABLE = "n/a"
TIES = ("expected", "pessimistic", "optimistic")
"""How Recall@K counts candidates tied with the target (`query_hits`)."""
SUBSETS = ("all", "short_query", "short_target")
"""Query subsets: all pairs, pairs with a short query note, pairs with a short target note."""
SPLIT_PREFIXES = {"val": "val/", "test": "test/"}
"""Column prefixes of the leaderboard: validation (what chooses) and test (read once, reported)."""
CI_SUFFIXES = (" lo", " hi")
"""Flat names of a recall's 95 % interval bounds: "R@10 lo", "R@10 hi"."""
RECALL_KEY = re.compile(r"^(?:(short_query|short_target)/)?R@(\d+)$")
"""A reported recall key: `R@<k>` (all pairs) or `<short subset>/R@<k>`."""
DIM_KEY = re.compile(r"^dim(\d+)/(.+)$")
"""A recall key of a Matryoshka prefix: `dim<d>/<recall key>`."""


def metric_key(subset: str, k: int, dim: int | None = None) -> str:
    """The flat name of Recall@k on `subset`: "R@10" for all pairs, "short_query/R@10" otherwise;
    with `dim`, of the embedding's first `dim` coordinates: "dim16/R@10"."""
    if subset not in SUBSETS:
        raise ValueError(f"subset {subset!r}: allowed {', '.join(SUBSETS)}")
    key = f"R@{int(k)}" if subset == "all" else f"{subset}/R@{int(k)}"
    return key if dim is None else f"dim{int(dim)}/{key}"


def parse_dim_metric_key(key: str) -> tuple[int | None, str, int] | None:
    """"dim16/short_query/R@10" -> (16, "short_query", 10); "R@10" -> (None, "all", 10); else None."""
    m = DIM_KEY.match(key)
    parsed = parse_metric_key(m.group(2) if m else key)
    return (int(m.group(1)) if m else None, *parsed) if parsed else None


def parse_metric_key(key: str) -> tuple[str, int] | None:
    """"short_query/R@10" -> ("short_query", 10); "R@10" or "all/R@10" -> ("all", 10); else None."""
    m = RECALL_KEY.match(key[len("all/"):] if key.startswith("all/") else key)
    return (m.group(1) or "all", int(m.group(2))) if m else None


def _per_dim(metrics: Mapping) -> list[tuple[int, Mapping]]:
    """The Matryoshka entries {"dims": {16: metrics, ..}} (JSON turns the keys into strings)."""
    return sorted((int(d), m) for d, m in (metrics.get("dims") or {}).items())


def flatten_recall(metrics: Mapping, dim: int | None = None) -> dict[str, float]:
    """{"all": {"R@10": v}, "short_query": {...}} -> {"R@10": v, "short_query/R@10": ...} (None dropped);
    a "dims" entry adds "dim16/R@10", ... for each Matryoshka prefix."""
    out = {}
    for subset in SUBSETS:
        for key, value in (metrics.get(subset) or {}).items():
            parsed = parse_metric_key(key)
            if value is not None and parsed is not None:
                out[metric_key(subset, parsed[1], dim)] = float(value)
    if dim is None:
        for d, sub in _per_dim(metrics):
            out.update(flatten_recall(sub, d))
    return out


def flatten_recall_ci(metrics: Mapping, dim: int | None = None) -> dict[str, float]:
    """{"ci95": {"all": {"R@10": [lo, hi]}}} -> {"R@10 lo": lo, "R@10 hi": hi} (None dropped), and
    "dim16/R@10 lo", ... for a "dims" entry."""
    out = {}
    for subset in SUBSETS:
        for key, ci in ((metrics.get("ci95") or {}).get(subset) or {}).items():
            parsed = parse_metric_key(key)
            if ci is not None and parsed is not None:
                name = metric_key(subset, parsed[1], dim)
                out[name + CI_SUFFIXES[0]], out[name + CI_SUFFIXES[1]] = float(ci[0]), float(ci[1])
    if dim is None:
        for d, sub in _per_dim(metrics):
            out.update(flatten_recall_ci(sub, d))
    return out


def unflatten_recall(flat: Mapping, prefix: str = "") -> dict[str, dict]:
    """The inverse of `flatten_recall`, reading only keys that start with `prefix` (e.g. "val/")."""
    out: dict[str, dict] = {}
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        parsed = parse_dim_metric_key(key[len(prefix):])
        if parsed is not None and value is not None:
            dim, subset, k = parsed
            into = out if dim is None else out.setdefault("dims", {}).setdefault(dim, {})
            into.setdefault(subset, {})[f"R@{k}"] = float(value)
    return out


def _check_inputs(query_emb: torch.Tensor, candidate_emb: torch.Tensor, target_index: torch.Tensor) -> None:
    if query_emb.dim() != 2 or candidate_emb.dim() != 2:
        raise ValueError(f"embeddings must be 2-D, got query {tuple(query_emb.shape)} and candidates {tuple(candidate_emb.shape)}")
    if query_emb.shape[1] != candidate_emb.shape[1]:
        raise ValueError(f"query dim {query_emb.shape[1]} != candidate dim {candidate_emb.shape[1]}")
    if target_index.dim() != 1 or target_index.shape[0] != query_emb.shape[0]:
        raise ValueError(f"target_index must be [Q]={query_emb.shape[0]}, got {tuple(target_index.shape)}")
    if target_index.numel() and (int(target_index.min()) < 0 or int(target_index.max()) >= candidate_emb.shape[0]):
        raise ValueError(f"target_index must lie in [0, {candidate_emb.shape[0]}); got range "
                         f"[{int(target_index.min())}, {int(target_index.max())}]")


# Unit roundoff of the float32 score products for each matmul precision setting: "highest" is
# true float32 (2^-24); "high" may run in TF32 (10-bit mantissa, 2^-11) and "medium" in bfloat16
# (2^-8), on GPUs and on CPUs with oneDNN bf16 kernels.
_MATMUL_UNIT_ROUNDOFF = {"highest": 2.0 ** -24, "high": 2.0 ** -11, "medium": 2.0 ** -8}
_F32 = torch.finfo(torch.float32)
_MAX_CHUNK_F32_COUNT = 2 ** 24  # 0/1 flags sum exactly in float32 up to 2^24 per row


def _float32_unit_roundoff(device: torch.device) -> float:
    """Unit roundoff of a float32 matmul on `device` under the current precision settings."""
    u = _MATMUL_UNIT_ROUNDOFF.get(torch.get_float32_matmul_precision(), 2.0 ** -8)
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        u = max(u, 2.0 ** -11)
    return u


def _outward_float32(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 bounds -> float32 bounds that still contain [lo, hi]."""
    lo32, hi32 = lo.float(), hi.float()
    lo32 = torch.where(lo32.double() > lo, torch.nextafter(lo32, torch.full_like(lo32, -math.inf)), lo32)
    hi32 = torch.where(hi32.double() < hi, torch.nextafter(hi32, torch.full_like(hi32, math.inf)), hi32)
    return lo32, hi32


@torch.no_grad()
def target_ranks(query_emb: torch.Tensor, candidate_emb: torch.Tensor, target_index: torch.Tensor,
                 chunk_size: int = 8192, query_chunk_size: int = 2048,
                 score_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The number of candidates scoring strictly above each target (`target_rank_counts`' first half)."""
    return target_rank_counts(query_emb, candidate_emb, target_index, chunk_size, query_chunk_size, score_dtype)[0]


@torch.no_grad()
def target_rank_counts(
    query_emb: torch.Tensor,
    candidate_emb: torch.Tensor,
    target_index: torch.Tensor,
    chunk_size: int = 8192,
    query_chunk_size: int = 2048,
    score_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact counts of the candidates above and tied with each query's target.

    above_i = #{ j != t_i : <q_i, c_j> > <q_i, c_{t_i}> } and tied_i = #{ j != t_i : equal }, the
    comparison made in float64 on the given inputs (exact ties, e.g. duplicated candidate rows,
    are ties).

    Fast path (`score_dtype=torch.float32`, the default): candidates are scored by a float32
    matmul, whose error is bounded, whatever the kernel's summation order or chunk shape, by
    |fl(q.c) - q.c| <= gamma_d * sum_k |q_k c_k| <= gamma_d |q| |c|, gamma_d = d u / (1 - d u),
    u the matmul's unit roundoff (2^-24 for true float32; larger when TF32/bf16 matmuls are
    allowed, see `torch.set_float32_matmul_precision`). With the margin
    m_i = 2 (d + 2) u |q_i| max_j |c_j| (+ an underflow floor), which also covers casting float64
    inputs to float32 and the norms' own rounding, a candidate whose float32 score is above
    s_t + m_i is certainly above the target's float64 score s_t, one below s_t - m_i certainly not.
    Only candidates inside [s_t - m_i, s_t + m_i] (the target itself, duplicates, true near-ties:
    a handful per query on real data) are rechecked in float64 as sum_k q_k (c_jk - c_tk), where
    the products of float32 inputs and the differences are exact, so an exact tie gives exactly 0
    whatever the summation order. Ranks are therefore identical to float64 scoring, at float32
    GEMM speed.

    `score_dtype=torch.float64` scores in float64 with the same margin scheme (u = 2^-53; several
    times slower on CPU); it is also the fallback where float32 cannot help (TF32/bf16 matmuls
    whose margin would cover every score, or scores that could overflow float32). Memory is
    bounded by query_chunk_size x chunk_size scores either way.

    Args:
        query_emb: float [Q, d].
        candidate_emb: float [C, d], on the same device as `query_emb`.
        target_index: long [Q], each query's target row in `candidate_emb`.
        chunk_size: candidate rows scored at a time.
        query_chunk_size: query rows scored at a time (memory is query_chunk_size x chunk_size
            scores: 64 MB in float32 at the defaults).
        score_dtype: torch.float32 (fast, exact via the float64 recheck) or torch.float64.

    Returns:
        (above, tied): long [Q] each, above + tied <= C - 1, on the device of the inputs.
    """
    _check_inputs(query_emb, candidate_emb, target_index)
    if chunk_size < 1 or query_chunk_size < 1:
        raise ValueError(f"chunk sizes must be >= 1, got {chunk_size}, {query_chunk_size}")
    if score_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"score_dtype={score_dtype}: allowed torch.float32, torch.float64")
    target_index = target_index.to(query_emb.device).long()
    if not query_emb.numel() or not candidate_emb.numel():
        zeros = torch.zeros(query_emb.shape[0], dtype=torch.long, device=query_emb.device)
        return zeros, zeros.clone()
    ranks = None
    if score_dtype == torch.float32:
        ranks = _margin_ranks(query_emb, candidate_emb, target_index, chunk_size, query_chunk_size, torch.float32)
    if ranks is None:  # float64 requested, or float32 cannot help
        ranks = _margin_ranks(query_emb, candidate_emb, target_index, chunk_size, query_chunk_size, torch.float64)
    return ranks


def _margin_ranks(query_emb, candidate_emb, target_index, chunk_size, query_chunk_size,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Scores in `dtype` + float64 recheck of the candidates within the error margin (see target_ranks).

    Returns None where float32 cannot help (the margin would cover everything, or scores could
    overflow); the caller then scores in float64.
    """
    n_query, n_cand = query_emb.shape[0], candidate_emb.shape[0]
    d = query_emb.shape[1]
    device = query_emb.device
    f32 = dtype == torch.float32
    u = _float32_unit_roundoff(device) if f32 else 2.0 ** -53
    # gamma_{d+4} = (d+4)u / (1 - (d+4)u) >= the matmul's gamma_d, plus casting float64 inputs to
    # float32 (2u) and the float64 target score's own error (far below a float32 u; for float64
    # scores it is a second gamma_d, hence the factor 2).
    factor = (d + 4) * u / max(1.0 - (d + 4) * u, 1e-3) * (1.0 if f32 else 2.0)
    if factor >= 0.1:
        return None
    # The score block is bounded by query_chunk_size x chunk_size; with fewer queries than
    # query_chunk_size more candidates fit in it (fewer, larger matmuls: same memory bound).
    budget = query_chunk_size * chunk_size
    block = max(chunk_size, budget // max(min(query_chunk_size, n_query), 1))
    if candidate_emb.dtype != dtype:  # each block is copied to `dtype`: bound that copy too
        block = max(chunk_size, min(block, budget // max(d, 1)))
    block = min(block, _MAX_CHUNK_F32_COUNT, n_cand)
    starts = list(range(0, n_cand, block))
    # Upper bounds on each block's largest candidate norm: float32 norms err by < (d + 2) 2^-24.
    norm_scale = 1.0 + 4.0 * (d + 2) * 2.0 ** -24
    block_norm = torch.stack([torch.linalg.vector_norm(candidate_emb[cs: cs + block].float(), dim=1).max()
                              for cs in starts]).double() * norm_scale  # [B]
    q_norm = torch.linalg.vector_norm(query_emb.float(), dim=1).double() * norm_scale  # [Q]
    bound = float(q_norm.max()) * float(block_norm.max())
    if f32 and (not math.isfinite(bound) or bound >= 1e36):  # float32 scores could overflow
        return None
    floor = (d + 2) * (_F32.tiny if f32 else torch.finfo(torch.float64).tiny)  # underflowed products
    recheck_rows = max(1, (1 << 20) // max(d, 1))  # float64 recheck in pieces of <= 1M elements (8 MB)
    ranks = torch.zeros(n_query, dtype=torch.long, device=device)
    ties = torch.zeros(n_query, dtype=torch.long, device=device)
    score_buf = torch.empty(min(query_chunk_size, n_query) * block, dtype=dtype, device=device)
    above_buf = torch.empty(score_buf.shape, dtype=torch.bool, device=device)
    amb_buf = torch.empty(score_buf.shape, dtype=torch.bool, device=device)
    for qs in range(0, n_query, query_chunk_size):
        q64 = query_emb[qs: qs + query_chunk_size].double()  # [q, d]
        q32 = query_emb[qs: qs + query_chunk_size].to(dtype).contiguous()
        nq = q64.shape[0]
        tgt = target_index[qs: qs + query_chunk_size]  # [q]
        tgt_score = (q64 * candidate_emb[tgt].double()).sum(dim=1, keepdim=True)  # [q, 1] float64
        margin = factor * q_norm[qs: qs + nq, None] * block_norm[None, :] + floor  # [q, B]
        if f32:
            lo32, hi32 = _outward_float32(tgt_score - margin, tgt_score + margin)  # [q, B] float32
        else:
            lo32, hi32 = tgt_score - margin, tgt_score + margin
        count = torch.zeros(nq, dtype=torch.long, device=device)
        tied = torch.zeros(nq, dtype=torch.long, device=device)
        for k, cs in enumerate(starts):
            c32 = candidate_emb[cs: cs + block].to(dtype)
            cc = c32.shape[0]
            scores = torch.mm(q32, c32.T, out=score_buf[: nq * cc].view(nq, cc))  # [q, c] float32
            above = torch.gt(scores, hi32[:, k: k + 1], out=above_buf[: nq * cc].view(nq, cc))  # certainly above
            amb = torch.ge(scores, lo32[:, k: k + 1], out=amb_buf[: nq * cc].view(nq, cc))  # not certainly below
            count += above.sum(dim=1)
            amb ^= above  # inside [lo, hi]: the target itself, duplicates, near-ties
            row, j = amb.nonzero(as_tuple=True)
            for ps in range(0, row.numel(), recheck_rows):
                r = row[ps: ps + recheck_rows]
                # sum_k q_k (c_jk - c_tk) in float64: products and differences of float32 data are
                # exact, so an exact tie (and the target itself) gives exactly 0, in any order.
                cand = j[ps: ps + recheck_rows] + cs
                diff = candidate_emb.index_select(0, cand).double()
                diff -= candidate_emb.index_select(0, tgt[r]).double()
                diff *= q64.index_select(0, r)
                delta = diff.sum(dim=1)
                count.index_add_(0, r, (delta > 0).long())
                tied.index_add_(0, r, ((delta == 0) & (cand != tgt[r])).long())  # the target is no tie
        ranks[qs: qs + nq] = count
        ties[qs: qs + nq] = tied
    return ranks, ties


def query_hits(above: torch.Tensor | np.ndarray, tied: torch.Tensor | np.ndarray | None, k: int,
               ties: str = "expected") -> np.ndarray:
    """Each query's contribution to Recall@k (float64 [Q]; the mean is the recall).

    Args:
        above: int [Q] candidates strictly above the target.
        tied: int [Q] candidates exactly tied with it (None: no tie information, treated as 0).
        k: the cut-off.
        ties: `expected`, `pessimistic` or `optimistic` (module docstring).
    """
    if ties not in TIES:
        raise ValueError(f"ties={ties!r}: allowed {', '.join(TIES)}")
    h = torch.as_tensor(above).cpu().numpy().astype(np.float64)
    e = np.zeros_like(h) if tied is None else torch.as_tensor(tied).cpu().numpy().astype(np.float64)
    k = float(k)
    if ties == "optimistic":
        return (h < k).astype(np.float64)
    if ties == "pessimistic":
        return (h + e < k).astype(np.float64)
    # expected: of the e + 1 tied places the target lands uniformly on one; k - h of them are hits
    return np.where(h >= k, 0.0, np.where(h + e < k, 1.0, (k - h) / (e + 1.0)))


def recall_from_ranks(ranks: torch.Tensor | np.ndarray, ks: Iterable[int], tied=None,
                      ties: str = "expected") -> dict[int, float]:
    """Recall@K for every K from the above-counts (and tie counts); NaN when there are no queries."""
    out = {}
    for k in ks:
        hits = query_hits(ranks, tied, int(k), ties)
        out[int(k)] = float(hits.mean()) if hits.size else math.nan
    return out


def recall_at_k(
    query_emb: torch.Tensor,
    candidate_emb: torch.Tensor,
    target_index: torch.Tensor,
    ks: Iterable[int],
    ties: str = "expected",
    chunk_size: int = 8192,
) -> dict[int, float]:
    """Exact Recall@K by dot product (the public contract; see the module docstring).

    Args:
        query_emb: float [Q, d].
        candidate_emb: float [C, d].
        target_index: long [Q] rows of `candidate_emb`.
        ks: cut-offs. A K beyond the pool gives its mathematical value (1.0); `recall_report`
            is the layer that marks it not applicable.
        ties: `expected` (default), `pessimistic` or `optimistic`.
        chunk_size: candidate rows scored at a time.

    Returns:
        {K: recall in [0, 1]}.
    """
    above, tied = target_rank_counts(query_emb, candidate_emb, target_index, chunk_size)
    return recall_from_ranks(above, ks, tied, ties)


def recall_report(ranks: torch.Tensor | np.ndarray, ks: Iterable[int], pool_size: int, tied=None,
                  ties: str = "expected") -> dict[str, float | None]:
    """Reporting view: {"R@K": recall} with None where K exceeds the pool (or there are no queries).

    A K larger than the candidate pool says nothing about the model (every target is trivially
    inside), so it is reported as not applicable rather than as a perfect 1.0.
    """
    values = recall_from_ranks(ranks, ks, tied, ties)
    return {f"R@{k}": (None if k > pool_size or math.isnan(v) else v) for k, v in values.items()}


def recall_ci(per_query_values, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `per_query_values` (resampling queries).

    Args:
        per_query_values: float [Q], e.g. `query_hits(...)`.
        level: coverage of the interval.
        n_boot: bootstrap resamples.
        seed: resampling seed (intervals are reproducible).

    Returns:
        (low, high); (nan, nan) without queries.
    """
    v = np.asarray(per_query_values, dtype=np.float64)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}: allowed (0, 1)")
    if v.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for s in range(0, n_boot, 256):  # bounded memory: 256 resamples of Q at a time
        idx = rng.integers(0, v.size, size=(min(256, n_boot - s), v.size))
        means[s: s + idx.shape[0]] = v[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def paired_recall_ci(values_a, values_b, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of mean(a - b) for two models' per-query values on the same queries."""
    a, b = np.asarray(values_a, dtype=np.float64), np.asarray(values_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values must align query by query: {a.shape} vs {b.shape}")
    return recall_ci(a - b, level, n_boot, seed)


def format_recall(value: float | None, percent: bool = True, digits: int = 2) -> str:
    """A recall cell for tables: "74.61" (percent) or "n/a" for a not-applicable value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NOT_APPLICABLE
    return f"{value * 100:.{digits}f}" if percent else f"{value:.{digits + 2}f}"


def format_recall_ci(value: float | None, ci: Sequence[float] | None, percent: bool = True, digits: int = 1) -> str:
    """A recall cell with its interval: "31.2 (27.1–35.4)"; just the value without an interval."""
    cell = format_recall(value, percent, digits)
    if cell == NOT_APPLICABLE or not ci or any(c is None or math.isnan(c) for c in ci):
        return cell
    lo, hi = (format_recall(float(c), percent, digits) for c in ci)
    return f"{cell} ({lo}–{hi})"


# ---------------------------------------------------------------------------------------------
# Approximate search (FAISS) for pools in the millions
# ---------------------------------------------------------------------------------------------


def _import_faiss():
    try:
        import faiss
    except ImportError as err:  # optional dependency: pip install 'notellm2-ray[faiss]'
        raise ImportError("approximate recall needs FAISS: pip install faiss-cpu (or the [faiss] extra)") from err
    return faiss


def build_faiss_index(candidates: np.ndarray, kind: str = "hnsw", *, hnsw_m: int = 32, ef_construction: int = 200,
                      nlist: int | None = None, seed: int = 0):
    """An inner-product FAISS index over `candidates` (float32 [C, d]).

    Args:
        candidates: float32 [C, d]; not normalised here (inner product, as in the exact path).
        kind: `hnsw` (graph, no training) or `ivf` (k-means cells + exact scan of probed cells).
        hnsw_m: HNSW graph degree M.
        ef_construction: HNSW build-time beam width.
        nlist: IVF cells; default ~4 sqrt(C), capped so every cell gets >= 39 training points.
        seed: k-means seed of the IVF training.
    """
    faiss = _import_faiss()
    x = np.ascontiguousarray(candidates, dtype=np.float32)
    n, d = x.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    elif kind == "ivf":
        if nlist is None:
            # FAISS warns below 39 training points per centroid; keep k-means well-posed.
            nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x)  # the faiss wrapper keeps `quantizer` referenced by the index
    else:
        raise ValueError(f"index kind {kind!r}: allowed hnsw, ivf")
    index.add(x)
    return index


def approximate_target_ranks(
    query_emb: torch.Tensor | np.ndarray,
    candidate_emb: torch.Tensor | np.ndarray,
    target_index: torch.Tensor | np.ndarray,
    max_k: int,
    kind: str = "hnsw",
    *,
    ef_search: int = 256,
    nprobe: int = 32,
    index=None,
    **index_kwargs,
) -> np.ndarray:
    """Target position in each query's approximate top-`max_k` list; `max_k` where it is absent.

    Args:
        query_emb: float [Q, d].
        candidate_emb: float [C, d] (ignored when `index` is given).
        target_index: long [Q] rows of the candidates (= FAISS ids, added in order).
        max_k: list length searched; ranks >= max_k mean "not retrieved".
        kind: `hnsw` or `ivf` (see `build_faiss_index`).
        ef_search: HNSW search beam; raised to max_k since HNSW cannot return more than ef hits.
        nprobe: IVF cells probed per query.
        index: a prebuilt index (e.g. to search several query sets).

    Returns:
        int64 [Q] approximate ranks (position among the returned neighbours).
    """
    q = np.ascontiguousarray(torch.as_tensor(query_emb).float().cpu().numpy())
    tgt = torch.as_tensor(target_index).long().cpu().numpy()
    if index is None:
        index = build_faiss_index(torch.as_tensor(candidate_emb).float().cpu().numpy(), kind, **index_kwargs)
    max_k = int(min(max_k, index.ntotal))
    if kind == "hnsw":
        index.hnsw.efSearch = max(ef_search, max_k)
    else:
        index.nprobe = min(nprobe, index.nlist)
    _, ids = index.search(q, max_k)  # [Q, max_k], -1 where fewer hits were found
    hit = ids == tgt[:, None]  # [Q, max_k]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), max_k).astype(np.int64)


def approximate_recall_at_k(
    query_emb: torch.Tensor,
    candidate_emb: torch.Tensor,
    target_index: torch.Tensor,
    ks: Iterable[int],
    kind: str = "hnsw",
    *,
    compare_exact: bool = False,
    chunk_size: int = 8192,
    **search_kwargs,
) -> dict:
    """Recall@K through a FAISS inner-product index, optionally with its loss against exact recall.

    Args:
        query_emb, candidate_emb, target_index, ks: as in `recall_at_k`.
        kind: `hnsw` or `ivf`.
        compare_exact: also compute exact recall on the same data (chunked) and the loss.
        chunk_size: candidate chunk of the exact comparison.
        **search_kwargs: `ef_search`, `nprobe`, `hnsw_m`, `nlist`, ... (see `approximate_target_ranks`).

    Returns:
        {"recall": {K: approx}} plus, with compare_exact, "exact": {K: exact} and
        "recall_loss": {K: exact - approx} (>= 0 up to ties: an index can only miss neighbours).
    """
    ks = [int(k) for k in ks]
    ranks = approximate_target_ranks(query_emb, candidate_emb, target_index, max(ks), kind, **search_kwargs)
    out = {"recall": recall_from_ranks(ranks, ks)}
    if compare_exact:
        exact = recall_at_k(torch.as_tensor(query_emb).float(), torch.as_tensor(candidate_emb).float(),
                            torch.as_tensor(target_index).long(), ks, chunk_size=chunk_size)
        out["exact"] = exact
        out["recall_loss"] = {k: exact[k] - out["recall"][k] for k in ks}
    return out
