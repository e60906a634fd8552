"""PNG figures of a comparison (matplotlib, Agg backend: no display needed).

Both functions take the results dicts returned by :func:`train.loop.train`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    return plt


def _smooth(values: Sequence[float], width: int = 5) -> np.ndarray:
    """Trailing moving average (train losses of single batches are noisy)."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return v
    kernel = np.ones(min(width, len(v)))
    return np.convolve(v, kernel, "full")[: len(v)] / np.convolve(np.ones_like(v), kernel,
                                                                  "full")[: len(v)]


def plot_losses(runs: Mapping[str, Sequence[dict]], path: str | Path) -> Path:
    """Validation loss (left) and smoothed training loss (right) per run group.

    Args:
      runs: ``{label: [results of each seed]}``; curves are averaged over seeds.
      path: Output PNG.
    """
    plt = _pyplot()
    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, results in runs.items():
        done = [r for r in results if r.get("evals")]
        if not done:
            continue
        steps = [e["step"] for e in done[0]["evals"]]
        n = min(len(r["evals"]) for r in done)
        val = np.mean([[e["val_loss"] for e in r["evals"][:n]] for r in done], axis=0)
        (line,) = ax_val.plot(steps[:n], val, marker="o", label=label)
        m = min(len(r["train"]) for r in done)
        if m:
            tsteps = [t["step"] for t in done[0]["train"][:m]]
            tloss = np.mean([[t["loss"] for t in r["train"][:m]] for r in done], axis=0)
            ax_train.plot(tsteps, _smooth(tloss), color=line.get_color(), label=label)
    # Say what was evaluated: the whole split, or the first eval_batches batches of it.
    partial = sorted({r["config"].get("eval_batches") for rs in runs.values() for r in rs
                      if r.get("config", {}).get("eval_batches")})
    where = ("whole split" if not partial
             else f"first {'/'.join(map(str, partial))} batches")
    ax_val.set(title=f"Validation loss ({where})", xlabel="step", ylabel="loss (nats/token)")
    ax_train.set(title="Training loss (moving average)", xlabel="step", ylabel="loss")
    for ax in (ax_val, ax_train):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    # Zoom on the part of the run where methods differ, not the initial drop.
    finals = [line.get_ydata()[-1] for line in ax_val.get_lines()]
    if finals:
        lo = min(finals)
        ax_train.set_ylim(lo - 0.2, lo + 1.5)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# The layer number in a parameter path: ``model/layers/<i>/`` (LLaMa, MoE LLaMa) or
# ``h/<i>/`` (GPT-2).
_LAYER = re.compile(r"(?:^|/)(?:layers|h)/(\d+)/(.*)")


def _layer_key(path: str) -> tuple:
    """Sort key: layer number, then module name (``layers/10`` after ``layers/9``); -1 for
    leaves outside the blocks (embeddings, head)."""
    m = _LAYER.search(path)
    return (int(m.group(1)), m.group(2)) if m else (-1, path)


# Line style per module type (q, k, v, o, gate, up, down, ...), colour per layer.
_STYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1)), (0, (3, 1, 1, 1)))


def _module(path: str) -> str:
    """The module inside a block, e.g. ``self_attn/q_proj``, ``mlp/c_proj`` (GPT-2 has a
    ``c_proj`` in both attention and MLP), ``moe/experts/gate_proj``; the whole path for
    leaves outside the blocks."""
    m = _LAYER.search(path)
    name = m.group(2) if m else path
    return name[: -len("/kernel")] if name.endswith("/kernel") else name


def _series(records: list[dict], field: str, key: str, index: int | None) -> list:
    """One matrix's values over the records (``index``: the expert of a stacked leaf)."""
    values = [r[field].get(key) for r in records]
    if index is None:
        return values
    return [v[index] if isinstance(v, list) else None for v in values]


def plot_alpha_layers(result: dict, path: str | Path) -> Path | None:
    """Per-matrix alpha (left) and applied LR factor (right) over training.

    Works for the LLaMa, MoE LLaMa and GPT-2 key paths; a stacked leaf (a MoE layer's
    experts) gives one line per matrix (expert). Leaves outside the blocks (embedding,
    head, GPT-2's position embedding) are drawn in red.

    Args:
      result: The results dict of one alpha_hill (or tempbalance) run.
      path: Output PNG.

    Returns:
      The path, or ``None`` when the run has no alpha records.
    """
    alphas, scales = result.get("alphas") or [], result.get("scales") or []
    if not alphas:
        return None
    plt = _pyplot()
    from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel

    def has_alpha(v):
        return any(x is not None for x in v) if isinstance(v, list) else v is not None

    keys = sorted((k for k, v in alphas[0]["alpha"].items() if has_alpha(v)), key=_layer_key)
    n_layers = 1 + max((_layer_key(k)[0] for k in keys), default=0)
    cmap = plt.get_cmap("viridis")
    fig, (ax_a, ax_s) = plt.subplots(1, 2, figsize=(13, 5))
    a_steps = [r["step"] for r in alphas]
    s_records = scales if scales else alphas
    s_steps = [r["step"] for r in s_records]
    modules = []
    for k in keys:
        layer = _layer_key(k)[0]
        if layer < 0:
            continue  # drawn with the other leaves outside the blocks below
        module = _module(k)
        modules += [module] if module not in modules else []
        color = cmap(layer / max(n_layers - 1, 1))
        style = _STYLES[modules.index(module) % len(_STYLES)]
        value = alphas[0]["alpha"][k]
        for i in range(len(value)) if isinstance(value, list) else [None]:
            ax_a.plot(a_steps, _series(alphas, "alpha", k, i), color=color, ls=style,
                      marker=".", lw=1)
            ax_s.plot(s_steps, _series(s_records, "scale", k, i), color=color, ls=style,
                      lw=1)
    outside = [k for k in (s_records[0]["scale"] if s_records else {})
               if _layer_key(k)[0] < 0 and not isinstance(s_records[0]["scale"][k], list)]
    for n, k in enumerate(outside):
        ls = _STYLES[n % len(_STYLES)]
        if k in keys:
            ax_a.plot(a_steps, _series(alphas, "alpha", k, None), color="red", ls=ls,
                      marker=".", lw=2, alpha=0.6, label=_module(k))
        fixed = "" if k in keys else " (fixed)"
        ax_s.plot(s_steps, _series(s_records, "scale", k, None), color="red", ls=ls, lw=3,
                  alpha=0.4, label=f"{_module(k)}{fixed}")
    handles = [Line2D([], [], color="black", ls=_STYLES[i % len(_STYLES)], label=m)
               for i, m in enumerate(modules)]
    ax_a.legend(handles=handles + ax_a.get_legend_handles_labels()[0], fontsize=8,
                title="module")
    bar = fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, n_layers - 1)),
                       ax=ax_s)
    bar.set_label("layer")
    cfg = result.get("config", {})
    ax_a.set(title="PL_Alpha_Hill per matrix (colour: layer)",
             xlabel="step (recompute)", ylabel="alpha")
    ax_s.set(title=f"Applied LR factor ({cfg.get('method', '')}, "
                   f"s in [{cfg.get('s_min')}, {cfg.get('s_max')}])",
             xlabel="step", ylabel="LR factor")
    ax_s.legend(fontsize=8)
    for ax in (ax_a, ax_s):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
