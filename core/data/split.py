"""Train/validation/test split of mined pairs without note leakage, greedy dedupe, short flags.

- `split_pairs`: seeded random fractions of the distinct *query notes* become test queries and
  (disjoint from them) validation queries. Held-out pairs of a split are every pair whose query
  is one of its queries; training pairs are those that touch no held-out query at all (neither
  as query nor as target). Pairs with a training query but a held-out-query target are dropped
  and counted, so a held-out query never appears in training; validation pairs whose target is a
  test query are dropped and counted too, so choosing never sees a test query.
- `dedupe_test_pairs`: REFERENCE §7 — each note appears once (as query or target) in a held-out
  set. Pairs are visited by score desc, query id asc, target id asc (strongest relations first,
  deterministic), and a pair is kept only if neither of its notes was used before. Evaluation
  applies it to each subset on its own (`core.evaluation.build_protocol`).
- `flag_short`: adds `short_query` / `short_target` from a set of short note ids. "Short" is
  len(title) + len(content) after `core.prompts.clean_note_text` below
  `DataConfig.short_text_chars` (default 20 characters); the paper does not publish its value.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def split_pairs(pairs: pa.Table, *, test_fraction: float, seed: int,
                val_fraction: float = 0.0) -> tuple[pa.Table, pa.Table, pa.Table, dict]:
    """Split pairs by query note into (train, val, test, stats).

    Args:
        pairs: mined pairs with `query_id`, `target_id` (and any other columns, kept).
        test_fraction: fraction of distinct query notes held out for test, in [0, 1).
        seed: seed of the query-note draw.
        val_fraction: fraction of distinct query notes held out for validation, disjoint from
            the test queries; test_fraction + val_fraction < 1.

    Returns:
        train pairs, validation pairs, test pairs (not yet de-duplicated) and counts
        {"test_queries", "val_queries", "dropped_leaky" (training pairs whose target is a held-out
        query), "dropped_val_leaky" (validation pairs whose target is a test query)}.
    """
    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value}: allowed [0, 1)")
    if test_fraction + val_fraction >= 1.0:
        raise ValueError(f"test_fraction + val_fraction = {test_fraction + val_fraction}: must be < 1 "
                         "(training needs query notes too)")
    queries = np.unique(pairs["query_id"].to_numpy())
    n_test, n_val = (int(round(f * len(queries))) for f in (test_fraction, val_fraction))
    if len(queries) > 2:
        n_test = min(max(n_test, 1 if test_fraction > 0 else 0), len(queries) - 2)
        n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(queries) - 1 - n_test)
    elif len(queries) > 1:
        n_test, n_val = (1, 0) if test_fraction > 0 else (0, 1 if val_fraction > 0 else 0)
    else:
        n_test = n_val = 0
    drawn = np.random.default_rng(seed).permutation(queries)
    test_queries = pa.array(np.sort(drawn[:n_test]), type=pairs["query_id"].type)
    val_queries = pa.array(np.sort(drawn[n_test: n_test + n_val]), type=pairs["query_id"].type)
    held_out = pa.array(np.sort(drawn[: n_test + n_val]), type=pairs["query_id"].type)
    q_test = pc.is_in(pairs["query_id"], value_set=test_queries)
    q_val = pc.is_in(pairs["query_id"], value_set=val_queries)
    q_held = pc.is_in(pairs["query_id"], value_set=held_out)
    t_held = pc.is_in(pairs["target_id"], value_set=held_out)
    t_test = pc.is_in(pairs["target_id"], value_set=test_queries)
    test = pairs.filter(q_test)
    val = pairs.filter(pc.and_(q_val, pc.invert(t_test)))
    train = pairs.filter(pc.and_(pc.invert(q_held), pc.invert(t_held)))
    n_val_all = int(pc.sum(q_val.cast(pa.int64())).as_py() or 0)
    stats = {"test_queries": n_test, "val_queries": n_val,
             "dropped_leaky": pairs.num_rows - test.num_rows - n_val_all - train.num_rows,
             "dropped_val_leaky": n_val_all - val.num_rows}
    return train, val, test, stats


def dedupe_test_pairs(test: pa.Table) -> pa.Table:
    """Greedily keep pairs so that every note appears at most once in the test set.

    The walk is sequential by nature (each choice blocks later ones); it runs over NumPy arrays
    of the test split only, which is a small fraction of all pairs.
    """
    if test.num_rows == 0:
        return test
    order = test.sort_by([("score", "descending"), ("query_id", "ascending"), ("target_id", "ascending")])
    q = order["query_id"].to_numpy()
    t = order["target_id"].to_numpy()
    used: set[int] = set()
    keep = np.zeros(len(q), dtype=bool)
    for i, (a, b) in enumerate(zip(q.tolist(), t.tolist())):
        if a not in used and b not in used:
            keep[i] = True
            used.add(a)
            used.add(b)
    kept = order.filter(pa.array(keep))
    return kept.sort_by([("query_id", "ascending"), ("target_id", "ascending")])


def flag_short(pairs: pa.Table, short_note_ids) -> pa.Table:
    """Append boolean `short_query` and `short_target` columns."""
    ids = pa.array(np.asarray(short_note_ids, dtype=np.int64))
    out = pairs
    for col, name in (("query_id", "short_query"), ("target_id", "short_target")):
        flag = pc.is_in(pairs[col], value_set=ids)
        if name in out.column_names:
            out = out.set_column(out.column_names.index(name), name, flag)
        else:
            out = out.append_column(name, flag)
    return out


def is_short_text(title, content, *, threshold: int, title_max_chars: int = 20, content_max_chars: int = 80, language: str = "en") -> bool:
    """The short-note test on one note's text (see module docstring)."""
    from core.prompts import clean_note_text

    text = clean_note_text(title, None, content, language=language, title_max_chars=title_max_chars, content_max_chars=content_max_chars)
    return len(text.title) + len(text.content) < threshold
