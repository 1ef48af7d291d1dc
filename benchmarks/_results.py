"""Where the benchmark scripts write their tables: ``benchmarks/results/``."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name, text, payload, tag=""):
    """Write the table ``text`` and its data ``payload`` (as JSON) to ``benchmarks/results/<name>.md`` and
    ``.json``; a ``tag`` adds the suffix ``_<tag>``."""
    RESULTS.mkdir(exist_ok=True)
    stem = name + (f"_{tag}" if tag else "")
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2))
