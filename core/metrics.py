"""Retrieval metrics: exact target ranks and Recall@K in bounded memory, plus a FAISS path.

The contract (REFERENCE §7): a query's *target rank* is the number of pool candidates scoring
strictly higher than the target under a plain dot product; Recall@K is the fraction of queries
with rank < K. Ties therefore count in the query's favour, and the target is never compared with
itself. Embeddings are *not* normalised here: the caller decides the geometry.

    ranks = target_ranks(q, c, target_index, chunk_size=8192)     # exact, no sort of the pool
    recall = recall_at_k(q, c, target_index, ks=[10, 100])         # {10: 0.41, 100: 0.87}
    report = recall_report(ranks, ks=[10, 100, 10_000], pool_size=len(c))  # K > pool -> None

Exact ranks never sort the pool: candidates are scored `chunk_size` rows at a time and each
query counts the candidates above its target, so memory is O(query_chunk_size * chunk_size)
whatever the pool size. Pools in the millions can use `approximate_recall_at_k` (FAISS HNSW or
IVF inner-product index), optionally with its recall loss against the exact count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

NOT_APPLICABLE = "n/a"


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
def target_ranks(
    query_emb: torch.Tensor,
    candidate_emb: torch.Tensor,
    target_index: torch.Tensor,
    chunk_size: int = 8192,
    query_chunk_size: int = 2048,
    score_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Exact 0-based rank of each query's target among the candidates.

    rank_i = #{ j != t_i : <q_i, c_j> > <q_i, c_{t_i}> }, the comparison made in float64 on the
    given inputs (exact ties, e.g. duplicated candidate rows, are ties).

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

    `score_dtype=torch.float64` scores everything in float64 (the reference; several times slower
    on CPU). Memory is query_chunk_size x chunk_size scores either way.

    Args:
        query_emb: float [Q, d].
        candidate_emb: float [C, d], on the same device as `query_emb`.
        target_index: long [Q], each query's target row in `candidate_emb`.
        chunk_size: candidate rows scored at a time.
        query_chunk_size: query rows scored at a time (memory is query_chunk_size x chunk_size
            scores: 64 MB in float32 at the defaults).
        score_dtype: torch.float32 (fast, exact via the float64 recheck) or torch.float64.

    Returns:
        long [Q] ranks in [0, C - 1] on the device of the inputs.
    """
    _check_inputs(query_emb, candidate_emb, target_index)
    if chunk_size < 1 or query_chunk_size < 1:
        raise ValueError(f"chunk sizes must be >= 1, got {chunk_size}, {query_chunk_size}")
    if score_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"score_dtype={score_dtype}: allowed torch.float32, torch.float64")
    target_index = target_index.to(query_emb.device).long()
    if score_dtype == torch.float32 and query_emb.numel() and candidate_emb.numel():
        d = query_emb.shape[1]
        factor = 2.0 * (d + 2) * _float32_unit_roundoff(query_emb.device)
        chunk_size = min(chunk_size, _MAX_CHUNK_F32_COUNT)
        # Upper bounds on each chunk's largest candidate norm: float32 norms err by < (d + 2) 2^-24.
        norm_scale = 1.0 + 4.0 * (d + 2) * 2.0 ** -24
        chunk_norm = [float(torch.linalg.vector_norm(candidate_emb[cs: cs + chunk_size].float(), dim=1).max()) * norm_scale
                      for cs in range(0, candidate_emb.shape[0], chunk_size)]
        q_norm = float(torch.linalg.vector_norm(query_emb.float(), dim=1).max()) * norm_scale
        c_norm = max(chunk_norm)
        # Float32 scores could overflow, or the margin would cover every score: score in float64.
        if factor < 0.25 and math.isfinite(q_norm) and math.isfinite(c_norm) and q_norm * c_norm < 1e36:
            return _target_ranks_f32(query_emb, candidate_emb, target_index, chunk_size, query_chunk_size, factor,
                                     chunk_norm)
    return _target_ranks_f64(query_emb, candidate_emb, target_index, chunk_size, query_chunk_size)


def _target_ranks_f64(query_emb, candidate_emb, target_index, chunk_size, query_chunk_size) -> torch.Tensor:
    n_query, n_cand = query_emb.shape[0], candidate_emb.shape[0]
    ranks = torch.zeros(n_query, dtype=torch.long, device=query_emb.device)
    for qs in range(0, n_query, query_chunk_size):
        q = query_emb[qs: qs + query_chunk_size].double()  # [q, d]
        tgt = target_index[qs: qs + query_chunk_size]  # [q]
        tgt_score = (q * candidate_emb[tgt].double()).sum(dim=1, keepdim=True)  # [q, 1]
        count = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        for cs in range(0, n_cand, chunk_size):
            scores = q @ candidate_emb[cs: cs + chunk_size].double().T  # [q, c]
            above = scores > tgt_score  # [q, c]
            local = tgt - cs  # target column inside this chunk, if it is here
            inside = (local >= 0) & (local < scores.shape[1])
            if inside.any():
                rows = inside.nonzero(as_tuple=True)[0]
                above[rows, local[rows]] = False
            count += above.sum(dim=1)
        ranks[qs: qs + q.shape[0]] = count
    return ranks


def _target_ranks_f32(query_emb, candidate_emb, target_index, chunk_size, query_chunk_size, factor,
                     chunk_norm) -> torch.Tensor:
    """float32 scores + float64 recheck of the candidates within the error margin (see target_ranks)."""
    n_query, n_cand = query_emb.shape[0], candidate_emb.shape[0]
    device = query_emb.device
    floor = (query_emb.shape[1] + 2) * _F32.tiny  # products that underflow err by < 2^-149 each
    ranks = torch.zeros(n_query, dtype=torch.long, device=device)
    for qs in range(0, n_query, query_chunk_size):
        q64 = query_emb[qs: qs + query_chunk_size].double()  # [q, d]
        q32 = query_emb[qs: qs + query_chunk_size].float()
        tgt = target_index[qs: qs + query_chunk_size]  # [q]
        tgt_score = (q64 * candidate_emb[tgt].double()).sum(dim=1, keepdim=True)  # [q, 1] float64
        q_margin = factor * torch.linalg.vector_norm(q64, dim=1, keepdim=True)  # [q, 1], times |c|
        count = torch.zeros(q64.shape[0], dtype=torch.float64, device=device)
        for k, cs in enumerate(range(0, n_cand, chunk_size)):
            c32 = candidate_emb[cs: cs + chunk_size].float()
            margin = q_margin * chunk_norm[k] + floor
            lo32, hi32 = _outward_float32(tgt_score - margin, tgt_score + margin)
            scores = q32 @ c32.T  # [q, c] float32
            n_above = torch.gt(scores, hi32).sum(dim=1, dtype=torch.int32)  # certainly above
            n_not_below = torch.ge(scores, lo32).sum(dim=1, dtype=torch.int32)
            count += n_above
            rows = (n_not_below > n_above).nonzero(as_tuple=True)[0]  # rows with an ambiguous candidate
            if rows.numel():
                sub = scores[rows]
                amb = torch.ge(sub, lo32[rows]) & ~torch.gt(sub, hi32[rows])
                r, j = amb.nonzero(as_tuple=True)
                row, cand = rows[r], j + cs
                t = tgt[row]
                keep = cand != t  # the target is never compared with itself
                row, cand, t = row[keep], cand[keep], t[keep]
                # sum_k q_k (c_jk - c_tk): exact products/differences of float32 data, 0 for exact ties.
                diff = candidate_emb[cand].double() - candidate_emb[t].double()
                above = (q64[row] * diff).sum(dim=1) > 0
                count.index_add_(0, row, above.double())
        ranks[qs: qs + q64.shape[0]] = count.long()
    return ranks


def recall_from_ranks(ranks: torch.Tensor | np.ndarray, ks: Iterable[int]) -> dict[int, float]:
    """Recall@K = fraction of queries with rank < K, for every K (NaN when there are no queries)."""
    r = torch.as_tensor(ranks)
    out = {}
    for k in ks:
        out[int(k)] = float((r < int(k)).float().mean().item()) if r.numel() else math.nan
    return out


def recall_at_k(
    query_emb: torch.Tensor,
    candidate_emb: torch.Tensor,
    target_index: torch.Tensor,
    ks: Iterable[int],
    chunk_size: int = 8192,
) -> dict[int, float]:
    """Exact Recall@K by dot product (the public contract; see the module docstring).

    Args:
        query_emb: float [Q, d].
        candidate_emb: float [C, d].
        target_index: long [Q] rows of `candidate_emb`.
        ks: cut-offs. A K beyond the pool gives its mathematical value (1.0); `recall_report`
            is the layer that marks it not applicable.
        chunk_size: candidate rows scored at a time.

    Returns:
        {K: recall in [0, 1]}.
    """
    return recall_from_ranks(target_ranks(query_emb, candidate_emb, target_index, chunk_size), ks)


def recall_report(ranks: torch.Tensor | np.ndarray, ks: Iterable[int], pool_size: int) -> dict[str, float | None]:
    """Reporting view: {"R@K": recall} with None where K exceeds the pool (or there are no queries).

    A K larger than the candidate pool says nothing about the model (every target is trivially
    inside), so it is reported as not applicable rather than as a perfect 1.0.
    """
    values = recall_from_ranks(ranks, ks)
    return {f"R@{k}": (None if k > pool_size or math.isnan(v) else v) for k, v in values.items()}


def format_recall(value: float | None, percent: bool = True, digits: int = 2) -> str:
    """A recall cell for tables: "74.61" (percent) or "n/a" for a not-applicable value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NOT_APPLICABLE
    return f"{value * 100:.{digits}f}" if percent else f"{value:.{digits + 2}f}"


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
                            torch.as_tensor(target_index).long(), ks, chunk_size)
        out["exact"] = exact
        out["recall_loss"] = {k: exact[k] - out["recall"][k] for k in ks}
    return out
