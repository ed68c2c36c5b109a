"""rayjobs.loadtest: the request loop stops at its fixed count, counts errors, and reports; CLI errors.
(The full run against Ray Serve is the measurement in BENCHMARKS.md, not a test.)"""

from __future__ import annotations

import threading

import pytest

from rayjobs import loadtest


def test_phase_sends_exactly_the_fixed_number_of_requests_and_counts_errors():
    seen, lock = [], threading.Lock()

    def call(session, i):
        with lock:
            seen.append(i)
        return 200 if i % 4 else 503  # every fourth request fails

    row = loadtest.run_phase(call, requests=40, duration=600.0, concurrency=3)
    assert sorted(seen) == list(range(40))  # each request index once, then the loop stopped
    assert row["requests"] == 40 and row["errors"] == 10
    assert row["p50_ms"] <= row["p99_ms"] and row["rps"] > 0


def test_phase_stops_at_its_duration_before_the_count():
    row = loadtest.run_phase(lambda s, i: 200, requests=10**9, duration=0.2, concurrency=2)
    assert 0 < row["requests"] < 10**9


def test_markdown_rows():
    md = loadtest.markdown([{"replicas": 2, "route": "GET /related", "requests": 5, "errors": 0, "seconds": 1.0,
                             "rps": 5.0, "p50_ms": 1.0, "p99_ms": 2.0}],
                           [{"path": "x", "notes": 3, "seconds": 1.5, "notes_per_s": 2.0}])
    assert "| 2 | `GET /related` | 5 | 0 | 1.0 | 5.0 | 1.0 | 2.0 |" in md and "| `x` | 3 | 1.5 | 2.0 |" in md


@pytest.mark.parametrize("argv,needle", [
    (["--index", "{tmp}", "--data", "{tmp}"], "no manifest.json"),
    (["--index", "{tmp}", "--data", "{tmp}", "--replicas", "0"], None),
])
def test_cli_errors(tmp_path, capsys, argv, needle):
    args = [a.format(tmp=tmp_path) for a in argv]
    if needle is None:
        with pytest.raises(SystemExit) as exc:
            loadtest.main(args)
        assert exc.value.code == 2
        return
    assert loadtest.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
