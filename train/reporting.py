"""What the loop tells the user: metrics records, log lines or a bar, TensorBoard, MFU.

:class:`Reporter` receives each step's metrics as device arrays right after the step is
dispatched and reads them ONE STEP LATE (when the next step has been dispatched), so
the host never waits for the device between steps; :meth:`Reporter.flush` reads the
pending step at once (before an evaluation or a checkpoint). A NaN/Inf loss raises
:class:`DivergedError` when it is read.

Throughput: tokens/s counts the tokens of the steps finished between two train records,
over the wall time between reading their metrics (evaluations and checkpoints excluded;
so is a process's first step, which pays one-time costs: its record has no tokens/s).
MFU = FLOPs of one compiled step (XLA's ``cost_analysis()`` of the program, per device:
everything the step computes, optimizer included) x steps/s / peak FLOP/s of a device.
The peak comes from ``peak_tflops`` or, failing that, :data:`PEAK_TFLOPS` (dense bf16
figures from the vendors' data sheets, matched against ``device_kind``; float32 runs
use the same figure, so their MFU is relative to the bf16 peak). Devices not listed
(CPUs) get no MFU unless ``--peak-tflops`` is given.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from train.config import TrainConfig
from train.option_text import parse_profile
from train.errors import UserError
from train.metrics_log import FactorReport, MetricsLog

ALPHA_METHODS = ("alpha_hill", "tempbalance")

# Peak dense bf16 TFLOP/s per device (vendor data sheets), matched as substrings of
# jax.devices()[0].device_kind, most specific first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0),
    ("V100", 125.0), ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0), ("TPU v4", 275.0), ("TPU v3", 123.0),
)


class DivergedError(RuntimeError):
    """Training produced a NaN/Inf loss (or parameters); the run stopped.

    Attributes:
      step: The update whose loss (or resulting parameters) was not finite.
      last_checkpoint: The latest (good) checkpoint step kept on disk, or ``None``.
    """

    def __init__(self, message: str, step: int, last_checkpoint: int | None):
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


def peak_tflops(cfg: TrainConfig) -> float | None:
    """The peak TFLOP/s of one device for the MFU (``None``: unknown)."""
    if cfg.peak_tflops is not None:
        return float(cfg.peak_tflops)
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in PEAK_TFLOPS if name.lower() in kind.lower()), None)


def recompute_due(cfg: TrainConfig, count: int) -> bool:
    """Whether update ``count`` (0-based) recomputes alphas (or, with ``spread``, a slice of
    them), as in scale_by_alpha_hill."""
    if cfg.method not in ALPHA_METHODS or count % cfg.interval >= cfg.spread:
        return False
    start = count - count % cfg.interval
    return cfg.method == "tempbalance" or start < math.ceil(cfg.active_fraction * cfg.steps)


def ramping(cfg: TrainConfig, count: int) -> bool:
    """Whether alpha_hill's factors may still move at update ``count`` (log every step)."""
    if cfg.method != "alpha_hill":
        return False
    ramp = cfg.interval // 2 if cfg.ramp_steps is None else cfg.ramp_steps
    return count <= math.ceil(cfg.active_fraction * cfg.steps) + cfg.spread - 1 + ramp


class TensorBoard:
    """TensorBoard event files in ``out_dir/tensorboard`` (tensorboardX).

    On resume, events at or after the resumed step are hidden (``purge_step``), as the
    metrics file drops them.
    """

    def __init__(self, out_dir: Path, start_step: int):
        try:
            from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        except ImportError:
            raise UserError("--tensorboard needs the tensorboardX package: "
                            "pip install 'llr-optax[tensorboard]'") from None
        self.writer = SummaryWriter(str(out_dir / "tensorboard"),
                                    purge_step=start_step or None)

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)

    def per_layer(self, step: int, prefix: str, values: dict[str, Any]) -> None:
        """One scalar per layer (per matrix of a stacked leaf) and a histogram."""
        finite = []
        for name, value in values.items():
            for i, v in enumerate(value if isinstance(value, list) else [value]):
                if v is not None:
                    tag = f"{prefix}/{name}" + (f"/{i}" if isinstance(value, list) else "")
                    self.writer.add_scalar(tag, v, step)
                    finite.append(v)
        if finite:
            self.writer.add_histogram(f"{prefix}_histogram", np.asarray(finite), step)

    def close(self) -> None:
        self.writer.close()


class Reporter:
    """Reads each step's metrics one step late and reports them.

    Args:
      cfg: The run configuration.
      log: The metrics file.
      start: Updates done before this run's first step.
      tokens_per_step: Tokens of one update over all processes.
      flops_per_step: FLOPs of one compiled step per device (``None``: unknown).
      lrs: The base schedule's LR at update counts ``0 .. steps``.
      factors: Unpacks the packed factor metrics (alpha methods), or ``None``.
      primary: Whether this process prints.
      tensorboard: Where TensorBoard scalars go, or ``None``.
    """

    def __init__(self, cfg: TrainConfig, log: MetricsLog, *, start: int,
                 tokens_per_step: int, flops_per_step: float | None, lrs: np.ndarray,
                 factors: FactorReport | None, primary: bool,
                 tensorboard: TensorBoard | None):
        self.cfg, self.log, self.lrs, self.factors = cfg, log, lrs, factors
        self.tokens_per_step, self.flops = tokens_per_step, flops_per_step
        self.peak = peak_tflops(cfg)
        self.primary, self.tb = primary, tensorboard
        self.pending: tuple[int, dict] | None = None
        # The first step of a process runs a freshly loaded executable and starts the
        # data pipeline's threads: one-time costs, not throughput. Timing starts when its
        # metrics arrive.
        self.first_step_done = False
        # Whole run (without evals and checkpoints) and the window since the last record;
        # host time = CPU time of this (the main) thread: work, not waiting for the device.
        self.steps = self.seconds = self.host_seconds = self.process_seconds = 0.0
        self.window_steps = 0
        self.resume_timing()
        self.interactive = (cfg.progress and primary and sys.stdout.isatty()
                            and sys.stderr.isatty())
        self.bar = None
        if self.interactive:
            from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

            self.bar = tqdm(total=cfg.steps, initial=start, unit="step", leave=True,
                            desc=f"{cfg.method}/{cfg.optimizer} seed {cfg.seed}",
                            dynamic_ncols=True)

    # -- the one-step-late protocol --------------------------------------------------

    def push(self, count: int, metrics: dict) -> None:
        """Takes the metrics of update ``count`` (updates done) and reports the previous."""
        previous, self.pending = self.pending, (count, metrics)
        if previous is not None:
            self._report(*previous)

    def flush(self) -> None:
        """Reports the pending step now (waits for it)."""
        previous, self.pending = self.pending, None
        if previous is not None:
            self._report(*previous)

    def pause(self) -> None:
        """Ends the timing window (before an evaluation or a checkpoint)."""
        self.flush()
        self._close_window()

    def resume_timing(self) -> None:
        self.window_start, self.window_cpu = time.perf_counter(), time.thread_time()
        self.window_process = time.process_time()

    def _close_window(self) -> float:
        seconds = time.perf_counter() - self.window_start
        self.steps += self.window_steps
        self.seconds += seconds
        self.host_seconds += time.thread_time() - self.window_cpu
        self.process_seconds += time.process_time() - self.window_process
        steps, self.window_steps = self.window_steps, 0
        self.resume_timing()
        return steps / seconds if steps and seconds > 0 else float("nan")

    def _report(self, count: int, metrics: dict) -> None:
        host = jax.device_get(metrics)
        if self.first_step_done:
            self.window_steps += 1
        else:
            self.first_step_done = True
            self.resume_timing()
        loss, c, cfg = float(host["loss"]), count - 1, self.cfg
        if not math.isfinite(loss):
            self.log.write({"kind": "diverged", "step": count, "loss": str(loss)})
            raise _Diverged(f"the loss is {loss} at step {count}", count)
        if self.factors is not None:
            scales = None
            if recompute_due(cfg, c):
                scales = self.factors.unpack(host["scales"])
                alphas = self.factors.unpack(host["alphas"])
                self.log.write({"kind": "alpha", "step": c, "alpha": alphas, "scale": scales})
                if self.tb:
                    self.tb.per_layer(c, "alpha", alphas)
            log_now = count % cfg.log_every == 0 or count == cfg.steps
            if log_now or ramping(cfg, c):
                scales = scales or self.factors.unpack(host["scales"])
                self.log.write({"kind": "scale", "step": c, "scale": scales})
                if self.tb and log_now:
                    self.tb.per_layer(c, "factor", scales)
        if count % cfg.log_every == 0 or count == cfg.steps:
            self._train_record(count, loss, float(host["grad_norm"]), moe_parts(host))

    def _train_record(self, count: int, loss: float, grad_norm: float,
                      parts: dict | None = None) -> None:
        steps_per_sec = self._close_window()
        tps = self.tokens_per_step * steps_per_sec
        lr = float(self.lrs[min(count - 1, len(self.lrs) - 1)])
        record = {"kind": "train", "step": count, "loss": loss, "grad_norm": grad_norm,
                  "lr": lr, "tokens_per_sec": tps, **(parts or {})}
        mfu = self.mfu(steps_per_sec)
        if mfu is not None:
            record["mfu"] = mfu
        self.log.write(record)
        if self.tb:
            self.tb.scalars(count, {"train/loss": loss, "train/grad_norm": grad_norm,
                                    "train/lr": lr, "train/tokens_per_sec": tps,
                                    "train/mfu": mfu,
                                    **{f"train/{k}": v for k, v in (parts or {}).items()
                                       if not isinstance(v, list)}})
        rate = f"{tps:,.0f} tok/s" if math.isfinite(tps) else "- tok/s"
        extra = f", MFU {100 * mfu:.1f}%" if mfu is not None and math.isfinite(mfu) else ""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
        elif self.primary:
            gn = f"{grad_norm:.3g}" if math.isfinite(grad_norm) else str(grad_norm)
            moe = (f" (ce {parts['ce_loss']:.4f} + aux {parts['aux_loss']:.4f}, expert "
                   f"imbalance {parts['expert_imbalance']:.2f})" if parts else "")
            print(f"step {count}/{self.cfg.steps}: loss {loss:.4f}{moe}, grad_norm {gn}, "
                  f"lr {lr:.3g}, {rate}{extra}", flush=True)

    def mfu(self, steps_per_sec: float) -> float | None:
        """Model FLOPs utilisation at ``steps_per_sec`` (``None``: unknown peak/FLOPs)."""
        if self.flops is None or self.peak is None or not math.isfinite(steps_per_sec):
            return None
        return self.flops * steps_per_sec / (self.peak * 1e12)

    # -- other output ------------------------------------------------------------------

    def advanced(self, n: int = 1) -> None:
        """Moves the bar (called when a step is dispatched)."""
        if self.bar is not None:
            self.bar.update(n)

    def eval_record(self, record: dict) -> None:
        self.log.write(record)
        if self.tb:
            self.tb.scalars(record["step"], {f"eval/{k}": v for k, v in record.items()
                                             if k.startswith("val_")})
        if self.primary:
            bpb = f", bpb {record['val_bpb']:.4f}" if record["val_bpb"] else ""
            self.say(f"step {record['step']}: val loss {record['val_loss']:.4f}, "
                     f"ppl {record['val_ppl']:.2f}{bpb}")

    def say(self, line: str) -> None:
        """A line for the user (above the bar when there is one)."""
        if not self.primary:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def timing(self) -> dict:
        """``{"steps", "seconds", "host_seconds", "process_seconds"}`` of the timed steps
        of this run (host: CPU time of the loop's thread, i.e. its own work, not its
        waits; process: CPU time of all threads, XLA's included)."""
        return {"steps": int(self.steps), "seconds": self.seconds,
                "host_seconds": self.host_seconds, "process_seconds": self.process_seconds}

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def moe_parts(host: dict) -> dict:
    """A MoE step's loss parts for the train record (nothing for a dense model).

    ``ce_loss``, ``aux_loss``, ``router_z_loss``, ``load_balance_loss`` as floats;
    ``expert_load`` as ``[num_layers][E]`` fractions; and ``expert_imbalance``: the
    largest expert's share over the mean share (``E * max_e load``), the worst layer's:
    1 for perfectly even routing, ``E`` when one expert takes every token.
    """
    if "expert_load" not in host:
        return {}
    load = np.asarray(host["expert_load"], np.float64)
    out = {k: float(host[k]) for k in ("ce_loss", "aux_loss", "router_z_loss",
                                       "load_balance_loss")}
    out["expert_imbalance"] = float(np.max(load.max(axis=-1) * load.shape[-1]))
    out["expert_load"] = [[round(float(x), 6) for x in row] for row in load]
    return out


class _Diverged(Exception):
    """Raised by the reporter; the loop turns it into a :class:`DivergedError`."""

    def __init__(self, what: str, step: int):
        super().__init__(what)
        self.what, self.step = what, step


class ProfileWindow:
    """``--profile START:N``: a ``jax.profiler`` trace of updates START+1 .. START+N."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, primary: bool):
        window = parse_profile(cfg.profile)
        self.start, self.stop = (window[0], window[0] + window[1]) if window else (-1, -1)
        self.directory = str(out_dir / "profile")
        self.active = False
        self.primary = primary

    def before_step(self, count: int) -> None:
        """Called with the updates done before dispatching the next one."""
        if count == self.start and not self.active:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after_step(self, count: int, state: Any) -> None:
        if self.active and count >= self.stop:
            self.finish(state)

    def finish(self, state: Any) -> None:
        if self.active:
            try:
                jax.block_until_ready(state)  # the traced steps end inside the trace
            except Exception:  # pylint: disable=broad-except  (stopping on an error anyway)
                pass
            jax.profiler.stop_trace()
            self.active = False
            if self.primary:
                which = (f"update {self.stop}" if self.stop == self.start + 1
                         else f"updates {self.start + 1}-{self.stop}")
                print(f"profile of {which} written to "
                      f"{self.directory!r} (open with TensorBoard's profile plugin or "
                      "xprof)", flush=True)
