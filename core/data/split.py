"""Train/test split of mined pairs without note leakage, greedy test de-duplication, short flags.

- `split_pairs`: a seeded random fraction of the distinct *query notes* becomes test queries.
  Test pairs are every pair whose query is a test query; training pairs are those that touch no
  test query at all (neither as query nor as target). Pairs with a training query but a
  test-query target are dropped and counted, so a test query never appears in training.
- `dedupe_test_pairs`: REFERENCE §7 — each note appears once (as query or target) in the test
  set. Pairs are visited by score desc, query id asc, target id asc (strongest relations first,
  deterministic), and a pair is kept only if neither of its notes was used before.
- `flag_short`: adds `short_query` / `short_target` from a set of short note ids. "Short" is
  len(title) + len(content) after `core.prompts.clean_note_text` below
  `DataConfig.short_text_chars` (default 20 characters); the paper does not publish its value.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def split_pairs(pairs: pa.Table, *, test_fraction: float, seed: int) -> tuple[pa.Table, pa.Table, dict]:
    """Split pairs by query note into (train, test, stats).

    Args:
        pairs: mined pairs with `query_id`, `target_id` (and any other columns, kept).
        test_fraction: fraction of distinct query notes held out, in [0, 1).
        seed: seed of the query-note draw.

    Returns:
        train pairs, test pairs (not yet de-duplicated) and counts
        {"test_queries", "dropped_leaky"} (training pairs whose target is a test query).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction}: allowed [0, 1)")
    queries = np.unique(pairs["query_id"].to_numpy())
    n_test = int(round(test_fraction * len(queries)))
    if test_fraction > 0 and len(queries) > 1:
        n_test = min(max(n_test, 1), len(queries) - 1)
    rng = np.random.default_rng(seed)
    test_queries = pa.array(np.sort(rng.choice(queries, size=n_test, replace=False)) if n_test else np.zeros(0, np.int64))
    q_test = pc.is_in(pairs["query_id"], value_set=test_queries)
    t_test = pc.is_in(pairs["target_id"], value_set=test_queries)
    test = pairs.filter(q_test)
    train = pairs.filter(pc.and_(pc.invert(q_test), pc.invert(t_test)))
    stats = {"test_queries": n_test, "dropped_leaky": pairs.num_rows - test.num_rows - train.num_rows}
    return train, test, stats


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
