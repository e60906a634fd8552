"""Sharded ESD check, run by tests/test_sharding.py in a child process with 8 CPU devices.

The parent sets `XLA_FLAGS=--xla_force_host_platform_device_count=8` in this process's
environment (it must be set before jax is imported). Prints one JSON report on stdout:
alphas/scales of sharded params under several layouts and axis types versus the single-device
result, and the all-gathers of the compiled update (a naive, local-solve variant as control).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import llr_optax  # noqa: E402
from llr_optax import _sharded, _spectral  # noqa: E402

D, F, H = 64, 160, 48
# name -> shape. Gram sizes: k=64 for q, up, down, o, gate (3+3+3+1+1 = 11 matrices, which 8
# does not divide); k=48 for k, v (3+2 = 5). `o` has c=100: not a multiple of 8 (zero rows padded).
SHAPES = {
    "embed": (256, D),
    "layers/q_proj": (3, D, D),
    "layers/k_proj": (3, D, H),
    "layers/v_proj": (2, H, D),
    "layers/up_proj": (3, D, F),
    "layers/down_proj": (3, F, D),
    "o_proj": (D, 100),
    "gate_proj": (D, F),
    "final_norm": (D,),
}
GROUPS = {64: 11, 48: 5}  # Gram size k -> number of matrices


# "tp": tensor parallel over the other matrix axis, mixed with 2-D, batch-sharded and replicated.
TP_SPECS = {
    "embed": P("fsdp", None),
    "layers/q_proj": P(None, None, "fsdp"),
    "layers/k_proj": P(None, None, "fsdp"),
    "layers/v_proj": P("data", None, "fsdp"),       # stacked layers over `data`
    "layers/up_proj": P(None, "data", "fsdp"),
    "layers/down_proj": P(None, "fsdp", "data"),
    "o_proj": P(None, None),                        # replicated
    "gate_proj": P(None, ("data", "fsdp")),
    "final_norm": P(),
}


def spec_for(name: str, shape: tuple[int, ...], layout: str) -> P:
  """FSDP (first matrix axis over `fsdp`, replicated over `data`) or the "tp" mix above."""
  if layout == "tp":
    return TP_SPECS[name]
  return P() if len(shape) == 1 else P(*(None,) * (len(shape) - 2), "fsdp", None)


def make_params():
  key = jax.random.key(0)
  return {n: jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32)
          for i, (n, s) in enumerate(SHAPES.items())}


def run(tx, params, shardings=None, execute=True):
  """(alphas, scales, compiled HLO text) of the first (recompute) update."""
  state = tx.init(params)  # from the unsharded params: few eager ops to compile
  if shardings is not None:
    params = jax.tree.map(jax.device_put, params, shardings)
  grads = params  # any updates with the params' layout will do
  compiled = jax.jit(tx.update).lower(grads, state, params).compile()
  hlo = compiled.as_text()
  if not execute:
    return None, None, hlo
  _, new_state = compiled(grads, state, params)
  as_lists = lambda tree: {k: np.asarray(v).ravel().tolist() for k, v in tree.items()}
  alphas = as_lists(llr_optax.last_alphas(new_state))
  scales = as_lists(llr_optax.current_scales(new_state))
  return alphas, scales, hlo


_GATHER = re.compile(  # "%x = f32[4,64]{1,0} all-gather(" or "%x = (f32[..], f32[..]) all-gather("
    r"=\s*(\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+all-gather(?:-start)?\(")
_SHAPE = re.compile(r"[a-z][a-z0-9]*\[([0-9,]*)\]")


def all_gather_shapes(hlo: str) -> list[list[int]]:
  """Result shapes of every all-gather in an HLO text (tuple results give several)."""
  shapes = []
  for m in _GATHER.finditer(hlo):
    for dims in _SHAPE.findall(m.group(1)):
      shapes.append([int(d) for d in dims.split(",") if d])
  return shapes


def full_matrix_pairs() -> set[tuple[int, int]]:
  """Sorted trailing-dim pairs that hold a whole weight matrix or a whole Gram matrix."""
  out = set()
  for name, shape in SHAPES.items():
    if len(shape) < 2 or name == "embed":
      continue
    m, n = shape[-2:]
    c, k = max(m, n), min(m, n)
    out |= {tuple(sorted((m, n))), tuple(sorted((c + -c % 8, k))), (k, k)}
  return out


def gather_report(hlo: str) -> dict:
  """All-gathers of the compiled update; `full` = those whose result holds whole matrices.

  A result (size-1 dims dropped) whose last two dims are a whole weight matrix (either
  orientation, also with the contraction side zero-padded) or a whole `k x k` Gram matrix holds
  complete matrices: the full weight, or the stack of Grams, gathered onto every device.
  """
  shapes = all_gather_shapes(hlo)
  pairs = full_matrix_pairs()
  squeeze = lambda s: [d for d in s if d != 1]
  full = [s for s in shapes if len(squeeze(s)) >= 2 and tuple(sorted(squeeze(s)[-2:])) in pairs]
  stacks = {(count, k, k) for k, count in GROUPS.items()}
  return dict(
      shapes=shapes, full=full,
      full_gram_stacks=[s for s in full if tuple(squeeze(s)) in stacks],
      has_all_to_all_or_reduce_scatter=bool(re.search(r"all-to-all|reduce-scatter", hlo)),
  )


def max_diff(a: dict, b: dict) -> float:
  """Largest absolute difference over all leaves; NaN == NaN, NaN vs a number is inf."""
  out = 0.0
  for k in b:
    x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
    if x.shape != y.shape or not np.array_equal(np.isnan(x), np.isnan(y)):
      return float("inf")
    if x.size:
      out = max(out, float(np.max(np.abs(np.nan_to_num(x) - np.nan_to_num(y)))))
  return out


def main():
  assert jax.device_count() == 8, jax.devices()
  params = make_params()
  tx = lambda **kw: llr_optax.scale_by_alpha_hill(total_steps=1000, **kw)
  report: dict = {"devices": jax.device_count()}

  # Single device: plain arrays, no mesh.
  ref_alphas, ref_scales, _ = run(tx(), params)
  report["reference"] = dict(alphas=ref_alphas, scales=ref_scales)
  participating = [k for k, v in ref_alphas.items() if v and np.all(np.isfinite(v))]
  report["participating"] = participating

  cases = {}
  for kind in ("auto", "explicit"):
    axis_type = AxisType.Auto if kind == "auto" else AxisType.Explicit
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(axis_type,) * 2)
    for layout in ("fsdp", "tp"):
      shardings = {n: NamedSharding(mesh, spec_for(n, s, layout)) for n, s in SHAPES.items()}
      if kind == "auto" and layout == "tp":
        # The mesh passed as an argument (a concrete Mesh, no context mesh) instead.
        name = "auto/tp/mesh-arg"
        alphas, scales, hlo = run(tx(mesh=mesh), params, shardings)
      else:
        name = f"{kind}/{layout}"
        with jax.set_mesh(mesh):
          alphas, scales, hlo = run(tx(), params, shardings)
      cases[name] = dict(
          alpha_diff=max_diff(alphas, ref_alphas), scale_diff=max_diff(scales, ref_scales),
          gathers=gather_report(hlo))
    if kind == "auto":
      shardings = {n: NamedSharding(mesh, spec_for(n, s, "fsdp")) for n, s in SHAPES.items()}
      # Control: the local solve (mesh=False) on the same sharded params under the same mesh.
      # Compiled only: run on 8 CPU devices at once, jaxlib's batched LAPACK kernels can deadlock
      # (see `_sharded._local_solve`).
      with jax.set_mesh(mesh):
        _, _, hlo = run(tx(mesh=False), params, shardings, execute=False)
      report["naive"] = dict(gathers=gather_report(hlo))
      # The standalone `solve=` hook on already formed Gram matrices (7 of them: padded to 8).
      stacks = [params["layers/q_proj"], params["layers/up_proj"], params["o_proj"][None]]
      with jax.set_mesh(mesh):
        got = jax.jit(lambda s: _spectral.grouped_matrix_alphas(
            s, solve=_sharded.sharded_solve()))(stacks)
      want = _spectral.grouped_matrix_alphas(stacks)
      report["sharded_solve_diff"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want))
    else:
      # The naive path under Explicit axes: `gram` of a sharded weight is rejected by JAX.
      with jax.set_mesh(mesh):
        try:
          run(tx(mesh=False), params,
              {n: NamedSharding(mesh, spec_for(n, s, "fsdp")) for n, s in SHAPES.items()},
              execute=False)
          report["naive_explicit"] = "ok"
        except Exception as e:  # noqa: BLE001
          report["naive_explicit"] = type(e).__name__
  report["cases"] = cases
  print(json.dumps(report))


if __name__ == "__main__":
  main()
