"""Suite `mining`: events/s of `core.data.pairs.mine_pairs` against a straightforward pandas
group-by implementation of the same algorithm (checked equal on the same events)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pyarrow as pa

from core.data.pairs import mine_pairs
from rayjobs.benchmark.harness import TARGETS, Context, figure, log, spread


def synthetic_events(n: int, seed: int = 0) -> pa.Table:
    """A click log with co-occurrence structure: users click near the note they viewed."""
    rng = np.random.default_rng(seed)
    n_notes, n_users = max(n // 10, 100), max(n // 20, 10)
    users = rng.integers(0, n_users, n)
    viewed = rng.integers(0, n_notes, n)
    clicked = (viewed + rng.integers(-20, 21, n)) % n_notes
    return pa.table({"user_id": users, "viewed_note_id": viewed, "clicked_note_id": clicked})


def mine_pairs_pandas(df: pd.DataFrame, lower: float = 0.0, upper: float = float("inf"), top_t: int = 10) -> pd.DataFrame:
    """Straightforward pandas version of `mine_pairs` (same semantics), the baseline."""
    d = df[["user_id", "viewed_note_id", "clicked_note_id"]].dropna().astype("int64")
    d.columns = ["u", "a", "b"]
    d = d[d["a"] != d["b"]]
    uab = d.drop_duplicates()
    n_u = d[["u", "b"]].drop_duplicates().groupby("u").size().rename("n")
    w = uab.join(n_u, on="u")
    w["w"] = 1.0 / w["n"]
    s = w.groupby(["a", "b"], sort=False)["w"].sum().reset_index()
    s["score"] = np.round(s["w"].to_numpy(), 12)
    s = s[(s["score"] >= lower) & (s["score"] <= upper)]
    s = s.sort_values(["a", "score", "b"], ascending=[True, False, True])
    s = s.groupby("a", sort=False).head(top_t)
    return pd.DataFrame({"query_id": s["a"].to_numpy(), "target_id": s["b"].to_numpy(), "score": s["score"].to_numpy()})


def run(ctx: Context) -> dict:
    figures, absolute, cases = {}, {}, []
    for n, repeats in ctx.p["mining"]:
        tag = f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"
        log(f"mining: {n:,} events")
        table = synthetic_events(n)
        df = table.to_pandas()
        t_arrow, t_pandas = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ours = mine_pairs(table)
            t_arrow.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref = mine_pairs_pandas(df)
            t_pandas.append(time.perf_counter() - t0)
        o = ours.to_pandas()
        match = len(o) == len(ref) and bool((o["query_id"].to_numpy() == ref["query_id"].to_numpy()).all()
                                            and (o["target_id"].to_numpy() == ref["target_id"].to_numpy()).all()
                                            and np.allclose(o["score"].to_numpy(), ref["score"].to_numpy()))
        figures[f"speedup_{tag}"] = figure(float(np.median(t_pandas)) / float(np.median(t_arrow)), TARGETS["mining_speedup"], True,
                                           f"pandas time / mine_pairs time on {n:,} events")
        absolute[f"mine_pairs_{tag}_events_per_s"] = spread([n / t for t in t_arrow], "events/s")
        absolute[f"pandas_{tag}_events_per_s"] = spread([n / t for t in t_pandas], "events/s")
        cases.append({"events": n, "pairs": len(o), "outputs_identical": match})
        del table, df, ours, ref, o
    return {"figures": figures, "absolute": absolute, "config": {"cases": cases, "top_t": 10}}
