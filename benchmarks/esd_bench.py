"""ESD benchmark: time to compute every PL_Alpha_Hill of the 60m / 130m LLaMa presets.

The matrices are those `scale_by_alpha_hill` fits: per layer q, k, v, o (d x d), gate, up
(d x f) and down (f x d), from `models.presets` (embedding and head are pinned, not fitted).
Weights are float32 standard Gaussian with a fixed seed. Methods:

* ours: `llr_optax.grouped_matrix_alphas` jitted (estimator "auto"), one leaf per matrix as an
  unscanned model has them; includes forming the Gram matrices.
* (a) per matrix `np.linalg.svd(w, compute_uv=False)` + Hill in NumPy.
* (b) per matrix un-batched `jnp.linalg.svd(w, compute_uv=False)` + Hill, jitted per shape.
* (c) per matrix Gram in NumPy + `scipy.linalg.eigh(gram, eigvals_only=True, driver="evd")`
  + Hill in NumPy: the CPU LAPACK limit. Also reported without the Gram ("c: eigh only", Grams
  formed beforehand) next to ours on the same precomputed Grams ("ours: solve only").

Every path is warmed up (compiled) first; the methods are interleaved (rotating order) over
`--repeats` rounds and the median is reported. Targets (2-core CPU): ours >= 3x faster than (a)
and (b), and at most 1.25x the time of (c). All alphas are compared with a float64 reference
(`np.linalg.eigvalsh` of the float64 Gram).

By default OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are removed from this process's environment
before NumPy/SciPy/JAX load OpenBLAS (they force slower kernels); `--keep-openblas-env` keeps
them. OPENBLAS_NUM_THREADS matters a lot on this 2-core machine (NumPy's multi-threaded sgemm
for the Gram, and jaxlib's batched LAPACK kernels, which already split a batch over the XLA
intra-op threads): by default the whole benchmark runs twice, with the environment's value and
with 1. Run: `python benchmarks/esd_bench.py [--presets 60m 130m] [--repeats 5] [--explore]
[--openblas-threads env|1|both]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import openblas_threads  # benchmarks/openblas_threads.py, beside this script

_OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", nargs="+", default=["60m", "130m"])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--keep-openblas-env", action="store_true")
  p.add_argument("--explore", action="store_true",
                 help="also time other estimators (not part of the targets)")
  p.add_argument("--openblas-threads", default="both", choices=openblas_threads.CHOICES,
                 help="OPENBLAS_NUM_THREADS for the run: as in the environment, 1, or both "
                      "(two runs, each in a fresh process; OpenBLAS reads it when loaded)")
  return p.parse_args()


ARGS = _parse()
openblas_threads.apply(ARGS.openblas_threads, __file__)  # before NumPy/jaxlib load it
REMOVED = {}
if not ARGS.keep_openblas_env:  # before numpy/scipy/jax load OpenBLAS
  REMOVED = {k: os.environ.pop(k) for k in _OPENBLAS_VARS if k in os.environ}

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.linalg  # noqa: E402

import llr_optax  # noqa: E402
from llr_optax import _spectral  # noqa: E402
from models.presets import PRESETS  # noqa: E402



def model_shapes(preset: str) -> list[tuple[int, int]]:
  """(rows, cols) of every matrix the method fits, layer by layer (k, v are d x d here)."""
  cfg = PRESETS[preset]
  d, f = cfg["hidden"], cfg["intermediate"]
  per_layer = [(d, d)] * 4 + [(d, f), (d, f), (f, d)]  # q k v o, gate up, down
  return per_layer * cfg["num_layers"]


def hill_np(lam: np.ndarray) -> float:
  """PL_Alpha_Hill with the median of all eigenvalues as xmin (docs/methods.md), NumPy."""
  lam = np.sort(np.maximum(np.asarray(lam, np.float64), 0.0))
  n = lam.size
  if n < 2:
    return float("nan")
  i = n // 2
  total = np.sum(np.log(lam[i:] / lam[i]))
  return float(1.0 + (n - i) / total) if total > 0 else float("nan")


def gram_np(w: np.ndarray) -> np.ndarray:
  return w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T


def build(preset: str, seed: int):
  rng = np.random.default_rng(seed)
  ws = [rng.standard_normal(s, dtype=np.float32) for s in model_shapes(preset)]
  return ws


def make_methods(ws: list[np.ndarray], explore: bool):
  """name -> (callable returning alphas, description). Device data is put there beforehand."""
  wj = [jnp.asarray(w) for w in ws]
  grams_np = [gram_np(w) for w in ws]

  ours_fn = jax.jit(lambda xs: llr_optax.grouped_matrix_alphas([x[None] for x in xs]))
  ours = lambda: np.concatenate([np.asarray(a) for a in jax.block_until_ready(ours_fn(wj))])

  svd_fns = {}
  def jsvd():
    out = []
    for w in wj:
      fn = svd_fns.get(w.shape)
      if fn is None:
        fn = svd_fns[w.shape] = jax.jit(lambda x: _spectral.hill_alpha(
            jnp.sort(jnp.square(jnp.linalg.svd(x, compute_uv=False)))))
      out.append(fn(w))
    return np.asarray(jax.block_until_ready(jnp.stack(out)))

  def npsvd():
    return np.array([hill_np(np.square(np.linalg.svd(w, compute_uv=False))) for w in ws])

  def scipy_c():
    return np.array([hill_np(scipy.linalg.eigh(gram_np(w), eigvals_only=True, driver="evd"))
                     for w in ws])

  def scipy_c_eigh_only():
    return np.array([hill_np(scipy.linalg.eigh(g, eigvals_only=True, driver="evd"))
                     for g in grams_np])

  # Ours on the same precomputed Grams (one [B, k, k] stack per size, as the library batches).
  by_k: dict[int, list[np.ndarray]] = {}
  for g in grams_np:
    by_k.setdefault(g.shape[0], []).append(g)
  gj = [jnp.asarray(np.stack(v)) for v in by_k.values()]
  def solve_fn(estimator):  # the library's batched solve (`grouped_matrix_alphas` uses it)
    fn = jax.jit(lambda gs: [_spectral.fit_alphas(g, estimator) for g in gs])
    return lambda: np.concatenate([np.asarray(a) for a in jax.block_until_ready(fn(gj))])

  methods = {
      "ours": (ours, "llr_optax.grouped_matrix_alphas, jit, estimator auto"),
      "(a) numpy svd": (npsvd, "np.linalg.svd(compute_uv=False) per matrix + Hill"),
      "(b) jnp svd": (jsvd, "jnp.linalg.svd(compute_uv=False) per matrix, jit per shape"),
      "(c) numpy gram + scipy evd": (scipy_c, "W^T W in NumPy + scipy eigh evd, per matrix"),
      "ours: solve only": (solve_fn("auto"), "ours on precomputed Grams (no Gram formation)"),
      "(c) eigh only": (scipy_c_eigh_only, "scipy eigh evd on precomputed Grams"),
  }
  if explore:
    for est in ("tridiagonal", "eigh"):
      methods[f"solve only: {est}"] = (solve_fn(est), f"estimator={est!r} on precomputed Grams")
    variants = {
        "tridiagonal, full spectrum (eigvalsh + hill_alpha)": lambda g: _spectral.hill_alpha(
            _spectral.eigvalsh(g, "tridiagonal")),
        "eigvalsh nosym": lambda g: _spectral.hill_alpha(
            jnp.linalg.eigvalsh(g, symmetrize_input=False)),
        # One matrix per LAPACK call (what the sharded path does on CPU) instead of one batched
        # call that jaxlib splits over the intra-op thread pool.
        "tridiagonal per matrix (lax.map)": lambda g: jax.lax.map(
            lambda x: _spectral.fit_alphas(x, "tridiagonal"), g),
    }
    for name, one in variants.items():
      fn_v = jax.jit(lambda gs, one=one: [one(g) for g in gs])
      methods[f"solve only: {name}"] = (
          lambda fn_v=fn_v: np.concatenate([np.asarray(a) for a in
                                            jax.block_until_ready(fn_v(gj))]), name)
  return methods, grams_np


def reference_alphas(grams_np: list[np.ndarray]) -> np.ndarray:
  return np.array([hill_np(np.linalg.eigvalsh(g.astype(np.float64))) for g in grams_np])


def run_preset(preset: str) -> list[str]:
  ws = build(preset, ARGS.seed)
  methods, grams_np = make_methods(ws, ARGS.explore)
  ref = reference_alphas(grams_np)
  names = list(methods)
  results = {n: methods[n][0]() for n in names}  # warm-up: compiles every jitted path
  times: dict[str, list[float]] = {n: [] for n in names}
  for r in range(ARGS.repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
      t0 = time.perf_counter()
      results[n] = methods[n][0]()
      times[n].append(time.perf_counter() - t0)
  med = {n: float(np.median(v)) for n, v in times.items()}
  ours = med["ours"]
  solve = med["ours: solve only"]

  def target(n):
    if n in ("(a) numpy svd", "(b) jnp svd"):
      ratio = med[n] / ours
      return ">= 3x slower than ours", "pass" if ratio >= 3.0 else "FAIL"
    if n == "(c) numpy gram + scipy evd":
      return "ours <= 1.25x its time", "pass" if ours <= 1.25 * med[n] else "FAIL"
    if n == "(c) eigh only":
      return "(info) ours: solve only <= 1.25x", "pass" if solve <= 1.25 * med[n] else "miss"
    return "", ""

  cfg = PRESETS[preset]
  shapes = model_shapes(preset)
  lines = [f"### {preset}: {len(shapes)} matrices (d={cfg['hidden']}, f={cfg['intermediate']}, "
           f"layers={cfg['num_layers']}), median of {ARGS.repeats}",
           "",
           "| method | seconds | ratio vs ours | target | result | max rel. alpha diff vs f64 |",
           "|---|---:|---:|---|---|---:|"]
  for n in names:
    base = solve if "only" in n else ours
    rel = np.max(np.abs(results[n] - ref) / np.abs(ref))
    tgt, ok = target(n)
    lines.append(f"| {n} | {med[n]:.3f} | {med[n] / base:.2f}x | {tgt} | {ok} | {rel:.1e} |")
  lines.append("")
  lines.append("ratio = method seconds / ours seconds (rows \"... only\": / ours: solve only). "
               f"min seconds: " + ", ".join(f"{n}: {min(v):.3f}" for n, v in times.items()))
  agree = max(np.max(np.abs(results[n] - results["ours"]) / np.abs(results["ours"])) for n in names)
  lines.append(f"alphas of all paths agree with ours to max rel. diff {agree:.1e}; "
               f"alpha range {ref.min():.3f} .. {ref.max():.3f}")
  return lines


def main():
  out = ["## ESD benchmark (benchmarks/esd_bench.py)", ""]
  load0 = os.getloadavg()
  removed = (", ".join(f"{k}={v}" for k, v in REMOVED.items()) or "none were set")
  kept = {k: os.environ[k] for k in _OPENBLAS_VARS if k in os.environ}
  out.append(f"- jax {jax.__version__} ({jax.default_backend()}), numpy {np.__version__}, "
             f"scipy {scipy.__version__}, CPUs: {os.cpu_count()}, "
             f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
             f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
  out.append(f"- OpenBLAS env removed for this process (baselines at their best speed): {removed}"
             + (f"; kept: {kept}" if kept else ""))
  out.append(f"- estimator 'auto' on this backend = "
             f"{_spectral._check_estimator('auto')!r}; load average at start: "
             f"{', '.join(f'{x:.2f}' for x in load0)}")
  out.append("")
  print("\n".join(out), flush=True)
  for preset in ARGS.presets:
    print("\n".join(run_preset(preset)), flush=True)
    print(flush=True)
  print(f"- load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
        "(other processes on this machine skew timings; re-run on a quiet machine)")


if __name__ == "__main__":
  main()
