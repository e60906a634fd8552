"""What LLR (alpha_hill) actually does: the LR factor it applies per module type over time.

An alpha_hill run logs, in its ``metrics.jsonl``, a ``scale`` record ``{param path: factor}``
for every update while the factors can move (the active phase and its last ramp) and every
``log_every`` updates after. The factor of a record holds until the next one, so the
applied factor of every update is known exactly.

Per module type (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``, a MoE's ``router``
and ``expert``, and the fixed ``embed``/``head``) we average over the matrices of that type
(all layers), then over time.
The time average is weighted by the base LR, ``sum_t eta(t) s(t) / sum_t eta(t)``: the
constant factor that gives a module type the same total LR as alpha_hill gave it, which is
what the ``module_constant`` ablation then applies at every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# llr_optax labels -> the short module-type names of the report, in display order.
MODULE_TYPES = {"embed": "embed", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_o": "o",
                "mlp_gate": "gate", "mlp_up": "up", "mlp_down": "down", "router": "router",
                "expert": "expert", "head": "head"}


def label_of(path: str) -> str:
    """The llr_optax label of a logged parameter path (``model/layers/0/mlp/up_proj/kernel``)."""
    from llr_optax import _labels  # pylint: disable=import-outside-toplevel

    return _labels.label_path(path.lower())


def per_label(scale: dict[str, float | list | None]) -> dict[str, float]:
    """Mean factor per label of one ``scale`` record (stacked leaves: every matrix counts)."""
    values: dict[str, list[float]] = {}
    for path, value in scale.items():
        label = label_of(path)
        if label not in MODULE_TYPES:
            continue
        for v in value if isinstance(value, list) else [value]:
            if v is not None:
                values.setdefault(label, []).append(float(v))
    return {label: float(np.mean(v)) for label, v in values.items()}


def per_step(records: Sequence[dict], steps: int) -> dict[str, np.ndarray]:
    """``{label: factor applied in each update 0 .. steps-1}`` from a run's ``scale`` records.

    A record's factor holds from its step until the next record; updates before the first
    record take the first record's factor (alpha_hill logs update 0, so none do).
    """
    records = sorted(records, key=lambda r: r["step"])
    if not records:
        raise ValueError("no scale records (not an alpha_hill/tempbalance run?)")
    means = [per_label(r["scale"]) for r in records]
    labels = sorted(set().union(*means), key=list(MODULE_TYPES).index)
    starts = [int(r["step"]) for r in records]
    # index of the record in force at each update
    which = np.clip(np.searchsorted(starts, np.arange(steps), side="right") - 1, 0, None)
    return {label: np.array([means[i].get(label, np.nan) for i in range(len(means))])[which]
            for label in labels}


def weighted_mean(series: np.ndarray, weights: np.ndarray) -> float:
    """``sum w s / sum w`` (the base-LR-weighted time average)."""
    weights = np.asarray(weights, np.float64)
    return float(np.sum(weights * series) / np.sum(weights))


def mean_factors(runs: Sequence[Sequence[dict]], base_lrs: np.ndarray) -> dict[str, float]:
    """``{label: base-LR-weighted mean factor}``, averaged over runs (seeds).

    Args:
      runs: The ``scale`` records of each run (same config but the seed).
      base_lrs: The base schedule's LR at each update (its length is the run length).
    """
    if not runs:
        raise ValueError("no runs")
    steps = len(base_lrs)
    series = [per_step(records, steps) for records in runs]
    labels = [l for l in MODULE_TYPES if all(l in s for s in series)]
    return {l: float(np.mean([weighted_mean(s[l], base_lrs) for s in series])) for l in labels}


def factor_file(factors: dict[str, float]) -> dict[str, float]:
    """The ``--module-factors`` mapping: every label's factor to 4 significant digits (a
    stable run key)."""
    return {label: float(f"{value:.4g}") for label, value in factors.items()}
