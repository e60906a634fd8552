"""Independent NumPy references for the spectral tests (float64 unless stated).

A port of the authors' median-Hill fit (TempBalance's `net_esd_estimator` as used by the LLR and
AlphaDecay code, `pl_fitting='median'`): ascending eigenvalues, optionally `filter_zeros` (keep
those `> thresh`, all of them if none is), `i = int(N / 2)`, `xmin = eigs[i]`, `n = N - i`,
`alpha = 1 + n / (sum(log(eigs[i:])) - n log(xmin))`,
`D = max |1 - (eigs[i:] / xmin)^(1 - alpha) - arange(n) / n|`.
"""

import numpy as np


def esd(w, dtype=np.float64):
  """Squared singular values of `w`, ascending, computed in `dtype` (complex128 for complex w)."""
  w = np.asarray(w)
  s = np.linalg.svd(w.astype(np.complex128 if np.iscomplexobj(w) else dtype), compute_uv=False)
  return np.sort(s * s, axis=-1)


def authors_fit(eigs, filter_zeros=False, thresh=1e-5, dtype=np.float64):
  """(alpha, KS distance) exactly as the authors' median rule computes them, in `dtype`."""
  eigs = np.sort(np.asarray(eigs).astype(dtype))
  if filter_zeros:
    kept = eigs[eigs > thresh]
    eigs = kept if kept.size else eigs
  n_all = eigs.size
  i = int(n_all / 2)
  xmin = eigs[i]
  n = n_all - i
  with np.errstate(divide="ignore", invalid="ignore"):
    logs = np.log(eigs)
    alpha = 1 + n / (np.sum(logs[i:]) - n * logs[i])
    ks = np.max(np.abs(1 - (eigs[i:] / xmin) ** (1 - alpha) - np.arange(n) / n))
  return float(alpha), float(ks)


def authors_alpha(eigs, **kw):
  return authors_fit(eigs, **kw)[0]
