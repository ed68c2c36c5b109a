"""What data preparation kept and skipped, and why: the content of `data_report.json`.

Every row that is dropped or altered is counted under a stage (`notes`, `images`, `events`,
`pairs`, `source`) and a short reason, so a report answers "where did my rows go?" without
reading logs.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class DataReport:
    """Counts of kept rows and of skipped/converted rows by stage and reason."""

    counts: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    converted: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def skip(self, stage: str, reason: str, n: int = 1) -> None:
        """Count `n` rows of `stage` dropped for `reason` (zero counts are not recorded)."""
        if n:
            bucket = self.skipped.setdefault(stage, Counter())
            bucket[reason] += int(n)

    def convert(self, stage: str, reason: str, n: int = 1) -> None:
        """Count `n` rows of `stage` kept after a fix-up (e.g. a CMYK image made RGB)."""
        if n:
            bucket = self.converted.setdefault(stage, Counter())
            bucket[reason] += int(n)

    def count(self, name: str, n: int) -> None:
        self.counts[name] = int(n)

    def merge(self, other: "DataReport") -> None:
        for stage, reasons in other.skipped.items():
            for reason, n in reasons.items():
                self.skip(stage, reason, n)
        for stage, reasons in other.converted.items():
            for reason, n in reasons.items():
                self.convert(stage, reason, n)
        self.counts.update(other.counts)
        self.info.update(other.info)

    def to_dict(self) -> dict:
        return {
            "counts": dict(self.counts),
            "skipped": {s: dict(sorted(r.items())) for s, r in sorted(self.skipped.items())},
            "converted": {s: dict(sorted(r.items())) for s, r in sorted(self.converted.items())},
            **self.info,
        }

    def write(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=False, default=str)
            f.write("\n")
