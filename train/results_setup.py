"""The setup notes of a results page: what was run and how it departs from the papers.

They are written from the grid's own settings (the preset, ``RUN_SETTINGS``, the cells and
their overrides), so a page for another preset or model family (``--preset moe-tiny``, the
GPU pages of ``20m``/``60m``) states what *its* runs did. Only the bullets for cells the
grid has appear.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import llr_optax

if TYPE_CHECKING:
    from train.results import Grid

_FAMILY_NAMES = {"llama": "LLaMa", "moe": "MoE LLaMa", "gpt2": "GPT-2"}
_OPTIMIZER_NAMES = {"adamw": "AdamW", "muon": "Muon", "lion": "Lion", "sgd": "SGD"}
_OWN_OPTIMIZERS = {"lars": "LARS", "lamb": "LAMB"}   # methods that are their own optimizer
# The default corpus' training split in byte tokens (what `python -m train` prints for it).
DEFAULT_TRAIN_TOKENS = 2_724_002


def _model(g: Grid):
    from models.presets import model_config  # pylint: disable=import-outside-toplevel

    cfg = g.config(g.cells[0], 1e-3, 0)
    return cfg, model_config(cfg.preset, 257, cfg.seq_len)


def setup_lines(g: Grid) -> list[str]:
    """The scale and validation bullets."""
    from models.presets import active_param_count, param_count  # pylint: disable=import-outside-toplevel

    cfg, model = _model(g)
    params = param_count(model)
    size = f"{params / 1e6:.1f} M parameters with the byte vocabulary"
    if g.family == "moe":
        size = (f"{params / 1e6:.2f} M parameters with the byte vocabulary, "
                f"{active_param_count(model) / 1e6:.2f} M active per token")
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    subset = (cfg.eval_batches or 0) * (cfg.val_batch_size or cfg.batch_size) * cfg.seq_len
    return [
        f"- **Scale.** The `{cfg.preset}` {_FAMILY_NAMES[g.family]} ({size}), byte-level "
        f"tokens, the default corpus (an English Wikipedia sample, "
        f"{DEFAULT_TRAIN_TOKENS / 1e6:.1f} M training tokens), "
        f"{cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens = "
        f"{tokens / 1e6:.1f} M tokens per run ({tokens / DEFAULT_TRAIN_TOKENS:.1f} passes "
        "over the training split). The papers train 60 M-1 B parameters on "
        "billions of tokens: read the gaps as what happens at this scale only.",
        f"- **Validation.** Every {cfg.eval_every} steps ({cfg.steps // cfg.eval_every} "
        f"evaluations per run) on a fixed subset, the first {cfg.eval_batches} batches of "
        f"{cfg.val_batch_size or cfg.batch_size} x {cfg.seq_len} tokens ({subset:,} tokens) of "
        "the validation split, the same for every run, because a full pass is expensive (on "
        "`tiny`, 179 k tokens from 5 documents: as much as 20 training steps). Losses in the "
        "tables are on that subset, in nats per token.",
    ]


def _lr_text(lr: float) -> str:
    """``3e-3``, ``6e-4``, ``0.03``, ``0.5``: as the papers write learning rates."""
    if 1e-2 <= lr < 100:
        return f"{lr:g}"
    mantissa, exponent = f"{lr:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _centers(g: Grid) -> str:
    """The ladders' centers, names that share one joined (``AdamW/Muon 3e-3``)."""
    centers: dict[str, list[str]] = {}
    for cell in g.cells:
        if cell.fixed_lr_of:
            continue
        name = _OWN_OPTIMIZERS.get(cell.method) or _OPTIMIZER_NAMES[cell.optimizer]
        if cell.variant == "searched":
            name = "relative/searched (its file's lr)"
        names = centers.setdefault(_lr_text(cell.center_lr), [])
        if name not in names:
            names.append(name)
    return ", ".join(f"{'/'.join(names)} {lr}" for lr, names in centers.items())


def _table_text(table: dict) -> str:
    pairs = ", ".join(f"{k} ({a:g}, {b:g})" for k, (a, b) in table["multipliers"].items())
    return f"{pairs}; final fraction {table['final_fraction']:g}"


def departure_lines(g: Grid) -> list[str]:
    """One bullet per setting that a reader comparing with the papers must know."""
    names = {cell.name for cell in g.cells}
    alpha = g.config(g.cell("adamw/alpha_hill"), 1e-3, 0)
    lines = [
        f"- **LR tuning.** x2 ladders around a center ({_centers(g)}), extended until the "
        "best point is interior (at most 3 extra rungs per side); seed 0 at the best LR is "
        "also the grid's run, so the best point is picked on a noisy single seed (each "
        "method's mean is biased low by this selection in the same way).",
        f"- **LLR (alpha_hill).** s in [{alpha.s_min:g}, {alpha.s_max:g}] (the "
        f"`{g.preset}` preset's; the paper studies (1, 2) to (1, 5) and its released 130 M "
        "recipe uses [1, 3]), the authors' all-eigenvalue Hill estimate, recomputed every "
        f"{alpha.interval} steps during the first {alpha.active_fraction:.0%} of the run and "
        f"ramped over {alpha.ramp_steps} steps (the paper: every 100 steps); embedding and "
        "head at s_max; matrices with fewer than "
        f"{alpha.min_eigenvalues} eigenvalues keep factor 1."
        + (" `tempbalance` maps onto [0.5, 1.5] and recomputes all run long; `alpha_decay` "
           "uses the same interval." if "adamw/tempbalance" in names else ""),
    ]
    if g.family == "moe":
        lines += [
            "- **RLRS (relative).** The paper's MoE table (its Table 4: "
            + _table_text({"multipliers": llr_optax.MOE_MULTIPLIERS,
                           "final_fraction": llr_optax.MOE_FINAL_FRACTION})
            + ") with its 1% warmup; every other method warms up over 10%.",
            _moe_line(g)]
    else:
        lines += [
            "- **RLRS (relative).** The paper's dense table and final fraction "
            f"{llr_optax.DENSE_FINAL_FRACTION:g} with its 1% warmup; every other method warms "
            "up over 10%. The multipliers were tuned by the paper on its own models"
            + (" (the searched table: below)." if any(c.variant == "searched" for c in g.cells)
               else " and are not searched here (`python -m train.search` does that).")]
    searched = next((c for c in g.cells if c.variant == "searched"), None)
    if searched is not None:
        cfg = g.config(searched, 1e-3, 0)
        decay = ("" if cfg.weight_decay == alpha.weight_decay else
                 f", the file's weight decay {cfg.weight_decay:g}")
        lines.append(
            "- **relative/searched** runs a table found by `python -m train.search` (the "
            f"`--searched` file), on RLRS's 1% warmup and its own LR ladder{decay}: "
            f"{_table_text(cfg.multipliers)}. It is the best of the points the search "
            "tried, picked on its runs' noise; these runs test it afresh.")
    if g.family != "moe":
        lines.append(DENSE_NOTES)
    decayed = "/".join(dict.fromkeys(_OPTIMIZER_NAMES[c.optimizer] for c in g.cells
                                     if c.optimizer in ("adamw", "muon")))
    lines.append(f"- **Weight decay** {alpha.weight_decay:g} ({decayed}) on every parameter, "
                 "norms and embeddings included.")
    return lines


def _moe_line(g: Grid) -> str:
    cfg, model = _model(g)
    router = min(model.hidden, model.num_experts)
    router_text = (f"the router ([{model.hidden}, {model.num_experts}]: {router} eigenvalues) is "
                   "below `min_eigenvalues` and keeps factor 1" if router < cfg.min_eigenvalues
                   else "so does the router")
    return (f"- **MoE.** {model.num_experts} SwiGLU experts of width {model.intermediate} per "
            f"layer, top-{model.top_k} routing with dense dispatch; the training loss is "
            f"cross-entropy + {model.router_z_loss_weight:g} x router z-loss + "
            f"{model.load_balance_loss_weight:g} x load-balancing loss, the validation loss "
            f"cross-entropy only. alpha_hill fits one alpha per expert matrix; {router_text}. "
            "The papers' MoE runs are 8 x 34 M and larger, on billions of tokens.")


DENSE_NOTES = """\
- **Blockwise.** Peak ratios from the authors' README, every block decaying to the run's own
  floor (0.1 x peak here; their OpenWebText runs use 0.05 and WSD on some runs).
- **upper_bound** is uniform at s_max x the LR it is given; it is run at alpha_hill's best LR
  (the LLR paper's control: is alpha_hill more than a larger LR?), not tuned on its own, since
  tuned it would be tuned uniform again.
- **module_constant** (the ablation) runs at alpha_hill's best LR with alpha_hill's
  base-LR-weighted mean factor per module type, constant over time and the same for every
  layer.
- **init_grad** measures its factors at the fan-in initialisation (matrices N(0, 1/fan_in),
  the untied embedding std 1) and trains, like every method, from the model's own init
  (normal, std 0.02): the paper trains its baseline and layer-wise runs from one shared init
  (GPT-2's std 0.02 for language models). **init_grad/fan_in_init**
  (`--init-grad-train-init paper`, the trainer's default until 2026-11-30) trains from the
  fan-in weights the factors were measured at, tuned on its own ladder; **uniform/fan_in_init**
  (`--fan-in-start`) trains uniform from the same weights with the same seed, at uniform's
  best LR: together they split a gain between the factors and the start.
  **alpha_hill/fan_in_init** runs alpha_hill from those weights at its own best LR: on `tiny`
  the model's std 0.02 is 4.4x below 1/sqrt(width 128) (1.8x at the 130 M width), so it asks
  whether alpha_hill's gain is more than making up for a small init.
- **Lion** uses the init-grad paper's GPT-2 settings (b1 0.95, b2 0.98, weight decay 1.0) but,
  like every optimizer here, decays every parameter (the paper: linear layers only). **SGD**
  (heavy-ball 0.9, L2 1e-4) has no language-model setting in any of the papers.
  **Sophia** (optax.contrib) is not run: its update needs the loss closure (Hutchinson's
  Hessian estimate) passed through the clip, MultiSteps and layer-wise links of the trainer's
  chain, a change to the training step for one optimizer.
- **WSD.** Warmup 10%, stable, then linear decay to 0.1 x peak over the last 20% (LLR's
  Table 16 does not state its decay shape). relative/blockwise on WSD keep their start
  multipliers through the stable phase and move to their end multipliers during the decay
  (`relative_schedule(progress=wsd_progress)`; the RLRS paper only defines the cosine)."""


def llr_intro(g: Grid, first_alphas: list[dict[str, float]]) -> str:
    """What alpha_hill's first assignment favours, from the runs' first alphas per label
    (rectangular MLP/expert matrices vs square attention ones: aspect ratio alone)."""
    _, model = _model(g)
    kind, labels = (("expert", ("expert",)) if g.family == "moe" else
                    ("MLP", ("mlp_gate", "mlp_up", "mlp_down")))
    rect = [a[k] for a in first_alphas for k in labels if k in a]
    square = [a[k] for a in first_alphas for k in ("attn_q", "attn_o") if k in a]
    if not rect or not square:
        return ""
    rect_alpha, square_alpha = sum(rect) / len(rect), sum(square) / len(square)
    width = getattr(model, "intermediate", 4 * model.hidden)   # GPT-2: 4 x hidden
    favoured = (f"so the first assignment boosts the {kind} matrices" if rect_alpha > square_alpha
                else "yet the first assignment does not favour them")
    return (f"At step 0, before any training, the rectangular {kind} matrices ({model.hidden} "
            f"x {width}) have a mean alpha of {rect_alpha:.2f} and the square attention q/o "
            f"ones ({model.hidden} x {model.hidden}) {square_alpha:.2f}, from their aspect "
            f"ratio alone, {favoured}.")
