"""The report arithmetic of `python -m train.results` (mean ± std, differences to uniform)."""

import numpy as np

from train import results


def fake(method, optimizer, losses, lr=3e-3):
  return [{"config": {"method": method, "optimizer": optimizer, "lr": lr},
           "final": {"val_loss": v, "val_bpb": v / np.log(2)}, "tokens_per_sec": 1000.0}
          for v in losses]


def test_grid_table_mean_std_and_order_match_numpy():
  grid = {("adamw", "uniform"): fake("uniform", "adamw", [2.10, 2.12, 2.14]),
          ("adamw", "alpha_hill"): fake("alpha_hill", "adamw", [2.00, 2.05, 2.03])}
  table = results.grid_table(grid).splitlines()
  # alpha_hill has the lower mean, so it is listed first.
  assert "| alpha_hill |" in table[2] and "| uniform |" in table[3]
  a = np.array([2.00, 2.05, 2.03])
  assert f"{a.mean():.4f} ± {a.std(ddof=1):.4f}" in table[2]
  bpb = a / np.log(2)
  assert f"{bpb.mean():.4f} ± {bpb.std(ddof=1):.4f}" in table[2]


def test_versus_uniform_difference_and_verdicts():
  u = [2.10, 2.12, 2.14]
  grid = {("adamw", "uniform"): fake("uniform", "adamw", u),
          ("adamw", "better"): fake("better", "adamw", [2.00, 2.01, 2.02]),
          ("adamw", "tied"): fake("tied", "adamw", [2.09, 2.13, 2.15]),
          ("muon", "lonely"): fake("lonely", "muon", [1.0])}
  lines = results.versus_uniform(grid).splitlines()
  assert len(lines) == 2  # no uniform run with muon: nothing to compare against
  diff = np.mean([2.00, 2.01, 2.02]) - np.mean(u)
  se = np.sqrt(np.var([2.00, 2.01, 2.02], ddof=1) / 3 + np.var(u, ddof=1) / 3)
  assert f"{diff:+.4f} nats" in lines[0] and f"{se:.4f}" in lines[0]
  assert lines[0].endswith("better.")
  assert lines[1].endswith("within 2 standard errors.")


def test_single_seed_has_no_spread_and_sweep_marks_divergence():
  sweep = {("uniform", 1e-3): fake("uniform", "adamw", [2.3]),
           ("uniform", 1e-2): [{"config": {}, "final": None}]}
  table = results.sweep_table(sweep, [1e-3, 1e-2])
  assert "| 0.001 | 2.3000 |" in table
  assert "| 0.01 | diverged |" in table
