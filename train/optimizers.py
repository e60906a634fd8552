"""Method x base optimizer -> one optax chain.

Every layer-wise method has the same shape (docs/methods.md)::

    clip_by_global_norm(clip) -> base optimizer (AdamW or Muon) on the base schedule
                              -> the method's per-leaf scale

The methods differ only in the last link (and ``relative`` in the schedule it pairs
with). LARS and LAMB are whole optimizers and replace the base instead.

Base schedules (``cfg.schedule``): ``cosine`` (linear warmup, cosine to
``final_lr_fraction * lr``) or ``wsd`` (linear warmup, flat at ``lr``, then LINEAR down to
``final_lr_fraction * lr`` over the last ``decay_fraction`` of the steps). Both are
``lr * (c(t) + f (1 - c(t)))`` after warmup for a progress ``c`` going 1 -> 0, so the
module tables of ``relative``/``blockwise``/``module_constant`` follow the same ``c(t)``
on either (see ``llr_optax.relative_schedule(progress=...)``).

With ``accumulate > 1`` the whole chain sits inside ``optax.MultiSteps``: it sees the
mean gradient of ``accumulate`` micro-batches once per update, so every count in it
(the schedule's, alpha_hill's recompute clock, relative's cosine) counts real updates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import functools

import jax
import optax

import llr_optax
from train.config import TrainConfig, check_combination, model_family

# Muon's update has RMS ~ 1/sqrt(max dim) before scaling; consistent_rms rescales it to
# 0.2, AdamW's typical update RMS (Liu et al. 2025), so both share one lr and schedule.
_MUON_CONSISTENT_RMS = 0.2
# TempBalance: same estimator as alpha_hill, but mapped onto [0.5, 1.5], embedding and
# head left at 1, hard switch, recomputed for the whole run (docs/methods.md).
TEMPBALANCE = dict(s_min=0.5, s_max=1.5, fixed_scales={"embed": 1.0, "head": 1.0},
                   ramp_steps=0, total_steps=None)


def schedule_progress(cfg: TrainConfig) -> Callable[[Any], Any] | None:
    """``c(t)`` of the base schedule for the module tables; ``None`` is the cosine."""
    if cfg.schedule == "wsd":
        return functools.partial(llr_optax.wsd_progress, total_steps=cfg.steps,
                                 decay_steps=cfg.decay_steps)
    return None


def base_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine (or WSD's stable + linear decay) to
    ``final_lr_fraction * lr`` at ``steps``.

    For ``relative`` the final fraction is the table's (:func:`relative_table`): the
    schedule ``relative_schedule`` divides by (built from the same numbers in
    :func:`method_transform`, so the two cannot disagree).
    """
    lr = cfg.lr * (cfg.s_max if cfg.method == "upper_bound" else 1.0)
    final = (relative_table(cfg)[1] if cfg.method == "relative"
             else cfg.final_lr_fraction)
    if cfg.method in _TABLE_METHODS or cfg.schedule != "cosine":
        return llr_optax.relative_base_schedule(lr, cfg.steps, final, cfg.warmup_steps,
                                                progress=schedule_progress(cfg))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.steps, end_value=cfg.final_lr_fraction * lr)


def relative_table(cfg: TrainConfig) -> tuple[dict[str, tuple[float, float]], float]:
    """``relative``'s ``(multipliers, final_fraction)``: the run's own table
    (``cfg.multipliers``, from ``--multipliers``), else the paper's for the preset's
    family: Table 4 (``MOE_MULTIPLIERS``, 0.04) on MoE presets, Table 5
    (``DENSE_MULTIPLIERS``, 0.06) on dense ones (LLaMa and GPT-2)."""
    if cfg.multipliers is not None:
        table = {k: (a, b) for k, (a, b) in cfg.multipliers["multipliers"].items()}
        return table, cfg.multipliers["final_fraction"]
    if model_family(cfg.preset) == "moe":
        return dict(llr_optax.MOE_MULTIPLIERS), llr_optax.MOE_FINAL_FRACTION
    return dict(llr_optax.DENSE_MULTIPLIERS), llr_optax.DENSE_FINAL_FRACTION


# Methods that are a module table on the base schedule (llr_optax.relative_schedule).
_TABLE_METHODS = ("relative", "blockwise", "module_constant")


def base_optimizer(cfg: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW, Muon (+ AdamW for non-matrix leaves), or the standalone LARS/LAMB."""
    if cfg.method == "lars":
        # trust_coefficient=1: each layer's step is lr * ||w|| * direction, so `lr` is the
        # relative change per step (optax's default 1e-3 would need lr ~ 10).
        # No L2 term: LARS adds it to the gradient INSIDE the trust ratio, where a
        # coefficient meant as decoupled decay (0.1) dominates the direction and the run
        # mostly shrinks the weights (tiny preset, 300 steps, lr 1e-2: val loss 2.86 with
        # weight_decay=0.1 here, 2.27 without).
        return optax.lars(schedule, weight_decay=0.0, trust_coefficient=1.0,
                          momentum=cfg.b1)
    if cfg.method == "lamb":
        return optax.lamb(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    if cfg.method == "alpha_decay":
        # AlphaDecay's per-matrix weight decay inside AdamW (AdamW only, as in its paper),
        # recomputed on alpha_hill's interval (the authors: every 500 steps).
        return llr_optax.adamw_alpha_decay(
            schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
            interval=cfg.interval, min_eigenvalues=cfg.min_eigenvalues)
    if cfg.optimizer == "adamw":
        return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "lion":
        # Decoupled weight decay, as optax.adamw (the init-grad paper: b1 0.95, b2 0.98,
        # weight decay 1.0 on GPT-2; pass them with --b1/--b2/--weight-decay).
        return optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        # Heavy-ball momentum (b1) with L2 weight decay added to the gradient, as
        # torch.optim.SGD(weight_decay=...) in the init-grad paper's SGD runs.
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                           optax.sgd(schedule, momentum=cfg.b1))
    return optax.contrib.muon(
        schedule, beta=cfg.b1, weight_decay=cfg.weight_decay,
        adam_b1=cfg.b1, adam_b2=cfg.b2, adam_weight_decay=cfg.weight_decay,
        # Hidden matrices (stacked ones per matrix) to Muon; embedding, head, norms to AdamW.
        muon_weight_dimension_numbers=llr_optax.muon_dimension_numbers,
        consistent_rms=_MUON_CONSISTENT_RMS)


def method_transform(cfg: TrainConfig, init_scales: Any = None) -> optax.GradientTransformation:
    """The per-leaf LR scale chained after the base optimizer (identity if none).

    Args:
      cfg: The run configuration.
      init_scales: ``init_grad`` only: the measured factors (see :func:`measure_init_grad`).
    """
    if cfg.method == "alpha_hill":
        return llr_optax.scale_by_alpha_hill(
            s_min=cfg.s_min, s_max=cfg.s_max, interval=cfg.interval,
            ramp_steps=cfg.ramp_steps, total_steps=cfg.steps,
            active_fraction=cfg.active_fraction, min_eigenvalues=cfg.min_eigenvalues,
            spread=cfg.spread)
    if cfg.method == "tempbalance":
        return llr_optax.scale_by_alpha_hill(
            interval=cfg.interval, min_eigenvalues=cfg.min_eigenvalues, spread=cfg.spread,
            **TEMPBALANCE)
    progress = schedule_progress(cfg)
    if cfg.method == "relative":
        multipliers, final_fraction = relative_table(cfg)
        return llr_optax.relative_schedule(multipliers, cfg.steps, final_fraction,
                                           cfg.warmup_steps, progress=progress)
    if cfg.method == "blockwise":
        # Wang et al.'s peak-LR ratios, every block decaying to the run's common floor
        # (final_lr_fraction * lr), as in their code; see llr_optax.BLOCKWISE_MULTIPLIERS.
        return llr_optax.relative_schedule(
            llr_optax.BLOCKWISE_MULTIPLIERS, cfg.steps, cfg.final_lr_fraction,
            cfg.warmup_steps, progress=progress)
    if cfg.method == "module_constant":
        # start = end: the factor (a c + f a (1 - c)) / (c + f (1 - c)) is `a` at every step.
        return llr_optax.relative_schedule(
            {k: (float(v), float(v)) for k, v in cfg.module_factors.items()}, cfg.steps,
            cfg.final_lr_fraction, cfg.warmup_steps, progress=progress)
    if cfg.method == "init_grad":
        if init_scales is None:
            raise ValueError("method 'init_grad' needs init_scales= (measure_init_grad)")
        return llr_optax.scale_by_init_grad(init_scales)
    # uniform, upper_bound (lr already scaled), lars, lamb, alpha_decay (in the base):
    # no per-leaf factor.
    return optax.identity()


def build_optimizer(cfg: TrainConfig, params: Any = None, *,
                    init_scales: Any = None) -> optax.GradientTransformation:
    """The full optax chain for ``cfg.method`` on ``cfg.optimizer``.

    Args:
      cfg: The run configuration.
      params: Unused except for validation of ``init_scales``' structure; kept so
        callers can pass the params the chain will be initialised with.
      init_scales: Required for ``init_grad``: per-leaf factors shaped like ``params``.

    Returns:
      ``clip -> base -> scale`` as one ``optax.GradientTransformation``.

    Raises:
      ValueError: ``lars``/``lamb`` with ``optimizer="muon"``, or ``init_grad``
        without scales (or with scales for other params).
    """
    check_combination(cfg.method, cfg.optimizer)
    if params is not None and init_scales is not None:
        if jax.tree.structure(params) != jax.tree.structure(init_scales):
            raise ValueError("init_scales do not have the structure of params")
    parts = []
    if cfg.clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip))
    parts.append(base_optimizer(cfg, base_schedule(cfg)))
    parts.append(method_transform(cfg, init_scales))
    tx = optax.chain(*parts)
    if cfg.accumulate > 1:
        tx = optax.MultiSteps(only_when_applied(tx), every_k_schedule=cfg.accumulate)
        tx = tx.gradient_transformation()
    return tx


def only_when_applied(inner: optax.GradientTransformation
                      ) -> optax.GradientTransformationExtraArgs:
    """``inner``, run only when its update is applied (for ``optax.MultiSteps``).

    ``optax.MultiSteps`` evaluates its inner update at EVERY micro-step and keeps the
    result only at the last one (``jnp.where``). That is harmless for AdamW, but
    alpha_hill's recompute (an eigenvalue solve per matrix) would run ``accumulate``
    times per recompute. The caller passes ``apply=`` (``mini_step == k - 1``, read
    from the MultiSteps state), which MultiSteps forwards here, and the inner update
    runs behind a ``lax.cond`` on it; otherwise zero updates and the unchanged state,
    exactly what MultiSteps would have kept.
    """
    def update(updates, state, params=None, *, apply=True, **extra_args):
        del extra_args
        return jax.lax.cond(
            apply, lambda: inner.update(updates, state, params),
            lambda: (jax.tree.map(jax.numpy.zeros_like, updates), state))

    return optax.GradientTransformationExtraArgs(inner.init, update)


def fan_in_params(cfg: TrainConfig, params: Any) -> Any:
    """The fan-in initialised copy of ``params`` (``llr_optax.fan_in_init``, the paper's
    rule) that init_grad measures at: one key per seed, so ``fan_in_start`` runs start
    from the same weights as init_grad's ``"paper"``-start run with that seed."""
    return llr_optax.fan_in_init(params, jax.random.fold_in(jax.random.key(cfg.seed), 0x1A17))


def measure_init_grad(
    cfg: TrainConfig,
    grad_fn: Callable[[Any, dict], Any],
    params: Any,
    batches: Any,
    *,
    return_params: bool = False,
) -> Any:
    """Init-gradient LR factors (docs/methods.md) for ``params``' structure.

    Gradients are taken at a fan-in initialised copy of ``params``
    (``llr_optax.fan_in_init``, the paper's rule; the training params themselves are
    not touched), held fixed over ``cfg.init_grad_batches`` minibatches drawn from
    ``batches``.

    Args:
      cfg: The run configuration (``seed``, ``init_grad_batches``).
      grad_fn: ``(params, batch) -> grads`` with ``params``' structure.
      params: The model's parameters (a pure pytree of arrays).
      batches: An iterator of training batches. Pass a SEPARATE iterator (the loop uses
        a differently seeded one), so measuring does not shift the training data order.

      return_params: Also return the fan-in initialised copy.

    Returns:
      Per-leaf float32 factors whose parameter-weighted mean is 1; with
      ``return_params``, ``(factors, the copy they were measured at)``.
    """
    measured = fan_in_params(cfg, params)
    grads = [grad_fn(measured, next(batches)) for _ in range(cfg.init_grad_batches)]
    scales = llr_optax.init_grad_scales(grads)
    return (scales, measured) if return_params else scales
