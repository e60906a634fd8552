"""The done runs of a results page, kept in git beside it: what survives the run cache.

A run cache (:mod:`train.run_cache`) keeps each run's checkpoints and full logs, ~7 MB a
``tiny`` run, outside the checkout, so it is lost with the machine: a page built over
several sittings could then no longer be regenerated, nor its grid resumed, without
training every run again (this happened once, to 74 runs). The ledger keeps, per done
run, only what the page reads: the outcome (config, status, wall and CPU seconds, device,
package versions) and the run's evaluation, alpha and scale records (not its per-step
training losses): a few kB for a uniform run, ~70 kB for an alpha_hill one (1 MB before
compression: a scale record per step of each ramp, every one of which the page's mean
factors weigh), small enough to commit. With it, a fresh clone regenerates the page and a
grid resumed on another machine trains only what the ledger lacks.

Layout: ``<ledger>/<run name>.json.gz`` (:func:`train.run_cache.run_name`), one gzipped
JSON object ``{"outcome": {...}, "records": [...]}`` with one record per line (``zcat`` it
to read). Only finished and diverged runs are kept; an entry is written once and never
changed (the same config always names the same numbers).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

# The metrics.jsonl records the results page reads (train/report.py, results_page.py).
KEPT_KINDS = ("eval", "alpha", "scale", "diverged")
# Outcome fields kept (run_cache writes these, plus its exit status).
_OUTCOME_FIELDS = ("config", "status", "wall_seconds", "cpu_seconds", "finished_at", "device",
                   "software")


def entry_path(ledger: str | os.PathLike, name: str) -> Path:
    return Path(ledger) / f"{name}.json.gz"


def read(ledger: str | os.PathLike, name: str) -> tuple[dict[str, Any], list[dict]] | None:
    """``(outcome, records)`` of the run ``name``, or ``None`` if the ledger lacks it."""
    path = entry_path(ledger, name)
    if not path.is_file():
        return None
    entry = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
    return entry["outcome"], entry["records"]


def keep(ledger: str | os.PathLike, name: str, outcome: dict[str, Any],
         records: list[dict]) -> bool:
    """Writes the run's entry unless the ledger has it; returns whether it wrote one.

    The file appears whole or not at all (written beside it, then renamed), so a reader
    never sees half an entry; it holds no time stamp, so two processes keeping the same run
    write the same bytes.
    """
    path = entry_path(ledger, name)
    if path.is_file():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = {k: outcome[k] for k in _OUTCOME_FIELDS if k in outcome}
    lines = [json.dumps(r, sort_keys=True, allow_nan=False) for r in records
             if r.get("kind") in KEPT_KINDS]
    text = ('{"outcome": ' + json.dumps(kept, sort_keys=True, allow_nan=False)
            + ',\n "records": [\n  ' + ",\n  ".join(lines) + "\n]}\n")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    tmp.replace(path)
    return True
