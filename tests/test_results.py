"""python -m train.results: the report arithmetic against NumPy on synthetic runs, alpha_hill's
factors per module type, and the whole command on a fake run cache (no training)."""

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from train import grid, llr_factors, report, results, results_page, results_setup
from train.grid import Cell
from train.run_cache import RunCache, RunRecord

STEPS, TOKENS = 100, 2048


def record(losses, status="finished", directory=Path("."), **config):
    steps = np.linspace(STEPS / len(losses), STEPS, len(losses)).astype(int)
    return RunRecord(config={"steps": STEPS, **config}, status=status,
                     evals=[(int(s), int(s) * TOKENS, float(l)) for s, l in zip(steps, losses)],
                     wall_seconds=60.0, cpu_seconds=100.0, directory=directory)


def exp_curve(rate, end_shift=0.0, n=25):
    t = np.linspace(1 / n, 1, n)
    return 2.0 + end_shift + 3.0 * np.exp(-rate * t)


def cell_result(method, rate_by_seed, best_lr=3e-3, ladder=None):
    cell = Cell("adamw", method)
    runs = {(best_lr, s): record(exp_curve(r)) for s, r in enumerate(rate_by_seed)}
    seeds = {s: run.final_loss for (_, s), run in runs.items()}
    ladder = ladder or [(best_lr, seeds[0])]
    return report.CellResult(grid.CellPlan(cell, ladder, best_lr, None, seeds, []), runs)


def test_best_vs_best_row_matches_numpy():
    uniform = cell_result("uniform", [2.0, 2.1, 1.9])
    fast = cell_result("alpha_hill", [3.0, 3.2, 2.9], best_lr=1.5e-3)
    table = report.best_vs_best([uniform, fast], uniform).splitlines()
    row = next(line for line in table if line.startswith("| alpha_hill |"))
    a = np.array([exp_curve(r)[-1] for r in (3.0, 3.2, 2.9)])
    u = np.array([exp_curve(r)[-1] for r in (2.0, 2.1, 1.9)])
    se = lambda x: x.std(ddof=1) / np.sqrt(len(x))
    assert f"{a.mean():.4f} ± {se(a):.4f}" in row
    assert f"{a.mean() - u.mean():+.4f} ± {np.hypot(se(a), se(u)):.4f}: better" in row
    # Speed-up: NumPy crossing of the seed-mean curves at uniform's mean final loss.
    tokens = np.array([s for s, _, _ in fast.best_runs[0].evals], float) * TOKENS
    target = u.mean()
    def cross(l):
        i = int(np.argmax(l <= target))
        return np.interp(target, [l[i], l[i - 1]], [tokens[i], tokens[i - 1]])
    u_mean = np.mean([exp_curve(r) for r in (2.0, 2.1, 1.9)], axis=0)
    a_mean = np.mean([exp_curve(r) for r in (3.0, 3.2, 2.9)], axis=0)
    assert f"| {cross(u_mean) / cross(a_mean):.2f}x; seeds " in row
    assert "| 1.5e-03 |" not in row and "| 0.0015 |" in row
    assert table[2].startswith("| alpha_hill |")   # sorted by mean loss


def test_one_seed_gets_no_verdict_against_the_baseline():
    uniform = cell_result("uniform", [2.0, 2.1, 1.9])
    single = cell_result("alpha_hill", [3.0], best_lr=1.5e-3)
    row = next(line for line in report.best_vs_best([uniform, single], uniform).splitlines()
               if line.startswith("| alpha_hill |"))
    d = exp_curve(3.0)[-1] - np.mean([exp_curve(r)[-1] for r in (2.0, 2.1, 1.9)])
    assert f"| {d:+.4f} (one seed: no verdict yet) |" in row and "better" not in row


def test_sweep_table_marks_best_divergence_and_missing():
    ladder = [(1e-3, 2.3), (2e-3, 2.1), (4e-3, 2.2), (8e-3, math.inf), (1.6e-2, None)]
    r = report.CellResult(grid.CellPlan(Cell("adamw", "uniform"), ladder, None, None, {},
                                        [(1.6e-2, 0)]), {})
    table = report.sweep_table([r])
    assert "| 0.002 | **2.1000** |" not in table   # no best before the ladder is settled
    r.plan.best_lr = 2e-3
    table = report.sweep_table([r])
    assert "| 0.002 | **2.1000** |" in table and "| 0.008 | diverged |" in table
    assert "| 0.016 | (to run) |" in table


def test_factor_series_and_lr_weighted_means_match_numpy():
    path = "model/layers/{}/{}/kernel"
    def rec(step, up, q, stacked=False):
        scale = {path.format(0, "mlp/up_proj"): up, path.format(1, "mlp/up_proj"): up + 1.0,
                 path.format(0, "self_attn/q_proj"): q, "model/embed_tokens/embedding": 5.0}
        if stacked:
            scale = {"model/layers/mlp/up_proj/kernel": [up, up + 1.0],
                     "model/layers/self_attn/q_proj/kernel": [q],
                     "model/embed_tokens/embedding": 5.0}
        return {"kind": "scale", "step": step, "scale": scale}
    records = [rec(0, 1.0, 2.0), rec(3, 2.0, 1.0), rec(7, 4.0, 1.5)]
    series = llr_factors.per_step(records, 10)
    np.testing.assert_allclose(series["mlp_up"], [1.5] * 3 + [2.5] * 4 + [4.5] * 3)
    np.testing.assert_allclose(series["attn_q"], [2.0] * 3 + [1.0] * 4 + [1.5] * 3)
    stacked = llr_factors.per_step([rec(0, 1.0, 2.0, True), rec(3, 2.0, 1.0, True),
                                    rec(7, 4.0, 1.5, True)], 10)
    np.testing.assert_allclose(stacked["mlp_up"], series["mlp_up"])
    lrs = np.linspace(1.0, 0.1, 10)
    means = llr_factors.mean_factors([records, records], lrs)
    assert means["mlp_up"] == pytest.approx(np.sum(lrs * series["mlp_up"]) / np.sum(lrs))
    assert means["embed"] == pytest.approx(5.0) and set(means) == {"embed", "attn_q", "mlp_up"}
    assert llr_factors.factor_file({"mlp_up": 2.345678}) == {"mlp_up": 2.346}


# --- the whole command on a fake cache ---------------------------------------------------


def fake_loss(cfg):
    """A made-up final loss: a bowl in log2(lr) whose center depends on the method."""
    best = {"uniform": 3e-3, "alpha_hill": 1.5e-3, "module_constant": 1.5e-3}.get(
        cfg["method"], 3e-3)
    return 2.0 + (math.log2(cfg["lr"] / best)) ** 2 / 20 + 0.002 * cfg["seed"] + (
        0.0 if cfg["method"] == "uniform" else -0.03)


class FakeTrain:
    def __init__(self):
        self.runs = []

    def __call__(self, request: Path, log: Path) -> int:
        cfg = json.loads(request.read_text())
        self.runs.append((cfg["method"], cfg["lr"], cfg["seed"]))
        final = fake_loss(cfg)
        n, every = cfg["steps"] // cfg["eval_every"], cfg["eval_every"]
        records = [{"kind": "eval", "step": every * (i + 1),
                    "val_loss": final + 2.0 * (1 - (i + 1) / n) ** 2} for i in range(n)]
        if cfg["method"] == "alpha_hill":
            scale = {"model/layers/0/mlp/up_proj/kernel": 4.0,
                     "model/layers/0/self_attn/q_proj/kernel": 1.2,
                     "model/embed_tokens/embedding": 5.0}
            alpha = {"model/layers/0/mlp/up_proj/kernel": 3.1,
                     "model/layers/0/self_attn/q_proj/kernel": 2.1}
            if cfg["preset"].startswith("moe"):   # stacked experts log one value each
                alpha = {"model/layers/0/moe/experts/up_proj": [2.4, 2.8],
                         "model/layers/0/self_attn/q_proj/kernel": 2.1}
                scale["model/layers/0/moe/experts/up_proj"] = [2.0, 3.0]
            records += [{"kind": "alpha", "step": 0, "alpha": alpha},
                        {"kind": "scale", "step": 0, "scale": scale}]
        Path(cfg["out_dir"], "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records))
        return 0


@pytest.fixture
def fake_results(monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(results, "RunCache",
                        lambda root, ledger=None: RunCache(root, fake, ledger))
    return fake


def test_command_runs_the_grid_in_order_and_writes_the_page(tmp_path, fake_results):
    page = tmp_path / "results.md"
    page.write_text("old\n" + results_page.KEEP_MARKER + "\n## MoE\nkept text\n")
    argv = ["--runs", str(tmp_path / "cache"), "--report", str(page), "--cells",
            "adamw/uniform,adamw/alpha_hill,adamw/module_constant"]
    assert results.main(argv) == 0
    runs = fake_results.runs
    # uniform: 5-point ladder (interior best 3e-3) + 2 seeds; alpha_hill: its best 1.5e-3 is
    # interior; the ablation: 3 seeds at alpha_hill's best LR.
    assert runs[:7] == [("uniform", lr, 0) for lr in (7.5e-4, 1.5e-3, 3e-3, 6e-3, 1.2e-2)] + [
        ("uniform", 3e-3, 1), ("uniform", 3e-3, 2)]
    assert runs[-3:] == [("module_constant", 1.5e-3, s) for s in range(3)]
    assert len(runs) == 17
    text = page.read_text()
    assert "Regenerate with `python -m train.results --runs" in text
    assert "3 of 29 cells complete, 17 runs" in text
    # 22 tuned cells not started (5 ladder rungs + 2 seeds each) and four fixed cells, the
    # two upper_bound ones, uniform/fan_in_init and alpha_hill/fan_in_init (3 seeds each).
    assert "Still to run: at least 166 runs, about " in text
    assert "- muon/upper_bound: waits for muon/alpha_hill's best LR" in text
    assert "- muon/uniform: LR grid 0/5 run (not started)" in text
    assert "## Best vs best: adamw" in text and "| alpha_hill | 0.0015 |" in text
    assert "| mlp_up" not in text and "| up | 3.10 | 4.00 | 4.00 | 4.00 |" in text
    assert "module_constant minus alpha_hill" in text
    # The setup notes follow the grid's settings: tiny's recompute interval, every center.
    assert ("x2 ladders around a center (AdamW/Muon 3e-3, LARS 0.01, LAMB 0.03, Lion 6e-4, "
            "SGD 0.5)") in text and "recomputed every 50 steps during the first 20%" in text
    assert "The paper's dense table and final fraction 0.06" in text and "**Blockwise.**" in text
    assert ("rectangular MLP matrices (128 x 352) have a mean alpha of 3.10 and the square "
            "attention q/o ones (128 x 128) 2.10, from their aspect ratio alone, so the first "
            "assignment boosts the MLP matrices") in text
    assert text.rstrip().endswith("## MoE\nkept text") and "old" not in text.split("\n")[0]
    for png in ("lr_sweeps", "curves", "speedups", "llr_factors"):
        assert (tmp_path / f"results_{png}.png").stat().st_size > 1000
    # The ablation's factors are alpha_hill's means, handed over as --module-factors.
    request = next((tmp_path / "cache" / "requests").glob("adamw-module_constant-*"))
    assert json.loads(request.read_text())["module_factors"] == {
        "embed": 5.0, "attn_q": 1.2, "mlp_up": 4.0}
    # Everything is cached now: a second invocation trains nothing.
    before = len(runs)
    assert results.main(argv) == 0 and len(fake_results.runs) == before
    # The ledger beside the page holds every run: without the cache (a new machine) the
    # page comes out the same and nothing is trained again.
    assert len(list((tmp_path / "results_runs").glob("*.json.gz"))) == before
    shutil.rmtree(tmp_path / "cache")
    assert results.main(argv + ["--report-only"]) == 0 and page.read_text() == text
    assert results.main(argv) == 0 and len(fake_results.runs) == before


def test_stop_file_and_max_runs_stop_between_runs(tmp_path, fake_results):
    argv = ["--runs", str(tmp_path / "cache"), "--report", str(tmp_path / "r.md"),
            "--cells", "adamw/uniform", "--max-runs", "2"]
    assert results.main(argv) == 0 and len(fake_results.runs) == 2
    stop = tmp_path / "STOP"
    stop.write_text("")
    assert results.main(argv[:-2] + ["--stop-file", str(stop)]) == 0
    assert len(fake_results.runs) == 2
    assert results.main(argv[:-2] + ["--report-only"]) == 0 and len(fake_results.runs) == 2
    assert "LR grid 2/5 run" in (tmp_path / "r.md").read_text()


def test_no_ledger_keeps_none_and_an_empty_ledger_is_an_error(tmp_path, fake_results, capsys):
    page = tmp_path / "r.md"
    argv = ["--runs", str(tmp_path / "cache"), "--report", str(page),
            "--cells", "adamw/uniform", "--max-runs", "1"]
    assert results.main(argv + ["--no-ledger"]) == 0 and len(fake_results.runs) == 1
    assert not (tmp_path / "r_runs").exists()
    text = page.read_text()
    assert "--no-ledger`: it trains only what the run cache lacks;" in text
    assert "ledger `" not in text
    with pytest.raises(SystemExit):
        results.main(argv + ["--ledger", ""])
    assert "--ledger needs a folder (use --no-ledger to keep none)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        results.main(argv + ["--no-ledger", "--ledger", str(tmp_path / "l")])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_waiting_cell_is_announced_again_when_it_completes(capsys):
    # Another worker trains alpha_hill's last seed (busy) while the ablation waits for it;
    # each state of each cell is said once, the ablation's completion included.
    alpha, ablation = (Cell("adamw", "alpha_hill"),
                       Cell("adamw", "module_constant", fixed_lr_of="adamw/alpha_hill"))
    plan = lambda missing=(), waiting_for=None: SimpleNamespace(
        missing=list(missing), waiting_for=waiting_for, best_lr=1.5e-3, ladder=[])
    rounds = [{alpha: plan([(1.5e-3, 2)]), ablation: plan(waiting_for="adamw/alpha_hill")},
              {alpha: plan([(1.5e-3, 2)]), ablation: plan(waiting_for="adamw/alpha_hill")},
              {alpha: plan(), ablation: plan([(1.5e-3, 0)])},
              {alpha: plan(), ablation: plan()}]
    said, got = set(), []
    for plans in rounds:
        g = SimpleNamespace(plan=plans.__getitem__, config=lambda *a: None,
                            cell=lambda name: alpha, cache=SimpleNamespace(busy=lambda cfg: True))
        got.append(results._next_run(g, [alpha, ablation], said))
    assert got == ["busy", "busy", "busy", "done"]
    assert capsys.readouterr().out.splitlines() == [
        "= adamw/module_constant: waits for adamw/alpha_hill",
        "= adamw/alpha_hill: complete (best lr 0.0015)",
        "= adamw/module_constant: complete (best lr 0.0015)"]


def test_report_folder_is_created_and_an_impossible_one_is_a_one_line_error(tmp_path, capsys):
    argv = ["--runs", str(tmp_path / "cache"), "--report-only", "--page-cells", "adamw/uniform"]
    assert results.main(argv + ["--report", str(tmp_path / "new" / "deeper" / "r.md")]) == 0
    assert "LR grid 0/5 run" in (tmp_path / "new" / "deeper" / "r.md").read_text()
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        results.main(argv + ["--report", str(tmp_path / "file" / "r.md")])
    assert "--report " in capsys.readouterr().err.splitlines()[-1]


def test_unknown_cells_are_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        results.main(["--runs", str(tmp_path), "--cells", "adamw/nothing"])
    assert e.value.code == 2 and "matches none of" in capsys.readouterr().err


def test_init_grad_fan_in_init_variant_keeps_the_factors_and_changes_the_start(tmp_path):
    g = results.Grid("tiny", RunCache(tmp_path, FakeTrain()), seeds=3)
    variant, init_grad = g.cell("adamw/init_grad/fan_in_init"), g.cell("adamw/init_grad")
    assert variant.fixed_lr_of is None and g.plan(variant).missing[0] == (7.5e-4, 0)
    paper, model = (g.config(c, 3e-3, 1).to_dict() for c in (variant, init_grad))
    assert (paper.pop("init_grad_train_init"), model.pop("init_grad_train_init")) == (
        "paper", "model")
    assert model == paper   # nothing else differs
    uniform, result = cell_result("uniform", [2.0, 2.1, 1.9]), cell_result("init_grad", [3.0])
    result.plan.cell = variant
    assert "| init_grad/fan_in_init | 0.003 |" in report.best_vs_best([uniform, result], uniform)


def test_uniform_fan_in_init_control_changes_only_the_start(tmp_path):
    g = results.Grid("tiny", RunCache(tmp_path, FakeTrain()), seeds=3)
    control, uniform = g.cell("adamw/uniform/fan_in_init"), g.cell("adamw/uniform")
    assert g.plan(control).waiting_for == "adamw/uniform"
    fan_in, own = (g.config(c, 6e-3, 2).to_dict() for c in (control, uniform))
    assert (fan_in.pop("fan_in_start"), own.pop("fan_in_start")) == (True, False)
    assert fan_in == own


def test_list_prints_every_cell_in_aligned_columns_and_writes_nothing(tmp_path, capsys):
    page = tmp_path / "r.md"
    assert results.main(["--runs", str(tmp_path / "cache"), "--report", str(page), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 29 and not page.exists()
    assert "adamw/alpha_hill/fan_in_init  waits for adamw/alpha_hill's best LR" in lines
    columns = {len(line) - len(line.split("  ", 1)[1].lstrip()) for line in lines}
    assert len(columns) == 1   # every state starts in the same column


def test_a_fixed_cell_starts_once_the_ladder_it_follows_is_settled(tmp_path, fake_results):
    # alpha_hill's 5-point ladder settles its best LR (1.5e-3); upper_bound need not wait for
    # alpha_hill's seeds 1-2, which do not move it. module_constant does: it needs the
    # factors of all of them.
    cache = tmp_path / "cache"
    argv = ["--runs", str(cache), "--report", str(tmp_path / "r.md"), "--cells"]
    assert results.main(argv + ["adamw/alpha_hill", "--max-runs", "5"]) == 0
    g = results.Grid("tiny", RunCache(cache, fake_results), seeds=3)
    upper, ablation = (g.plan(g.cell(n)) for n in ("adamw/upper_bound", "adamw/module_constant"))
    assert upper.missing == [(1.5e-3, s) for s in range(3)] and upper.waiting_for is None
    assert ablation.waiting_for == "adamw/alpha_hill" and not ablation.missing


@pytest.mark.parametrize("elsewhere, expected", [(True, "busy"), (False, "done")])
def test_a_worker_given_only_a_waiting_cell_waits_only_if_its_cell_is_being_trained(
        elsewhere, expected):
    alpha, upper = Cell("adamw", "alpha_hill"), Cell("adamw", "upper_bound",
                                                     fixed_lr_of="adamw/alpha_hill")
    plans = {alpha: SimpleNamespace(missing=[(3e-3, 0)], waiting_for=None),
             upper: SimpleNamespace(missing=[], waiting_for="adamw/alpha_hill", best_lr=None)}
    g = SimpleNamespace(plan=plans.__getitem__, config=lambda *a: None, cell=lambda name: alpha,
                        cache=SimpleNamespace(busy=lambda cfg: elsewhere))
    assert results._next_run(g, [upper], set()) == expected


def test_stopping_with_a_cell_still_waiting_says_so(tmp_path, fake_results, capsys):
    argv = ["--runs", str(tmp_path / "cache"), "--report", str(tmp_path / "r.md"),
            "--cells", "adamw/upper_bound"]
    assert results.main(argv) == 0 and not fake_results.runs
    out = capsys.readouterr().out
    assert ("nothing left to run: adamw/upper_bound waits for adamw/alpha_hill, which no "
            "process is training") in out and "every selected cell is complete" not in out


def test_moe_grid_tunes_its_four_cells_and_states_its_own_setup(tmp_path, fake_results):
    found = tmp_path / "found.json"   # what python -m train.search writes
    found.write_text(json.dumps({"multipliers": {"expert": [0.5, 1.5], "embed": [4, 1]},
                                 "final_fraction": 0.04, "lr": 0.002, "weight_decay": 0.05}))
    page = tmp_path / "moe.md"
    argv = ["--preset", "moe-tiny", "--runs", str(tmp_path / "cache"), "--report", str(page),
            "--searched", str(found)]
    assert results.main(argv) == 0
    runs = fake_results.runs
    assert [m for m, _, _ in runs[::7]] == ["uniform", "relative", "alpha_hill", "relative"]
    assert len(runs) == 28
    # The searched table's ladder is centred on its file's lr; fake best 3e-3 -> 4e-3.
    assert runs[21:] == [("relative", lr, 0) for lr in (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)] + [
        ("relative", 4e-3, 1), ("relative", 4e-3, 2)]
    requests = {p.name: json.loads(p.read_text())
                for p in (tmp_path / "cache" / "requests").glob("*.json")}
    searched = [r for r in requests.values() if r["multipliers"] is not None]
    assert len(searched) == 7 and all(
        r["multipliers"] == {"multipliers": {"expert": [0.5, 1.5], "embed": [4.0, 1.0]},
                             "final_fraction": 0.04}
        and r["weight_decay"] == 0.05 and r["warmup_fraction"] == 0.01 for r in searched)
    paper = [r for r in requests.values()
             if r["method"] == "relative" and r["multipliers"] is None]
    assert len(paper) == 7 and all(r["warmup_fraction"] == 0.01 and r["weight_decay"] == 0.1
                                   for r in paper)
    assert {r["steps"] for r in requests.values()} == {600}
    text = page.read_text()
    assert f"--searched {found}" in text and "4 of 4 cells complete, 28 runs" in text
    assert "The `moe-tiny` MoE LLaMa (3.48 M parameters" in text and "active per token" in text
    assert "its Table 4: embed (5, 0.6)" in text and "router ([128, 8]: 8 eigenvalues)" in text
    assert "the file's weight decay 0.05: expert (0.5, 1.5), embed (4, 1)" in text
    assert "AdamW 3e-3, relative/searched (its file's lr) 2e-3" in text
    assert "| relative/searched | 0.004 |" in text
    # The dense grid's notes and ablation are not this grid's.
    assert "Blockwise" not in text and "Ablation" not in text and "Lion" not in text
    # alpha at step 0 from the runs: experts (2.4 + 2.8) / 2 against q 2.1.
    assert ("the rectangular expert matrices (128 x 256) have a mean alpha of 2.60 and the "
            "square attention q/o ones (128 x 128) 2.10") in text
    assert "| expert | 2.60 | 2.50 | 2.50 | 2.50 |" in text


def test_a_bad_searched_file_is_a_one_line_error_before_any_run(tmp_path, fake_results,
                                                                  capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"multipliers": {"experts_typo": [1, 1]}, "final_fraction": 0.04}))
    for path in (bad, tmp_path / "missing.json"):
        with pytest.raises(SystemExit) as e:
            results.main(["--preset", "moe-tiny", "--runs", str(tmp_path / "c"),
                          "--searched", str(path)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"python -m train.results: error: --searched {str(path)!r}")
    assert fake_results.runs == []


def test_list_into_a_pipe_that_closes_early_is_quiet(tmp_path):
    # `--list | head -1`: head exits after one line; the rest must not end in a traceback.
    import subprocess
    import sys
    script = (f"{sys.executable} -m train.results --runs {tmp_path / 'c'} --list "
              "| head -c 1 >/dev/null; exit ${PIPESTATUS[0]}")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def test_llr_intro_averages_the_step_0_alphas_and_says_which_way_they_point(tmp_path):
    g = results.Grid("tiny", RunCache(tmp_path), seeds=3)
    boosts = results_setup.llr_intro(g, [{"mlp_up": 3.0, "attn_q": 2.0, "embed": 9.0},
                                         {"mlp_down": 3.3, "attn_o": 2.3}])
    assert ("(128 x 352) have a mean alpha of 3.15 and the square attention q/o ones "
            "(128 x 128) 2.15, from their aspect ratio alone, so the first assignment boosts "
            "the MLP matrices.") in boosts
    flat = results_setup.llr_intro(g, [{"mlp_gate": 2.0, "attn_q": 2.5}])
    assert "mean alpha of 2.00" in flat and flat.endswith("yet the first assignment does "
                                                          "not favour them.")
    assert results_setup.llr_intro(g, [{"mlp_up": 3.0}]) == ""   # nothing to compare with


def test_gpu_note_links_the_accelerator_pages_that_exist(tmp_path):
    page = tmp_path / "results.md"
    assert "`20m`: not run yet; `60m`: not run yet." in results_page.gpu_note(page, "tiny")
    assert "on the `20m` and `60m` presets" in results_page.gpu_note(page, "tiny")
    (tmp_path / "results_20m.md").write_text("x")
    note = results_page.gpu_note(page, "tiny")
    assert "`20m`: [results_20m.md](results_20m.md); `60m`: not run yet." in note
    # On a GPU page itself: no link to itself.
    assert "`20m`: this page; `60m`: not run yet." in results_page.gpu_note(
        tmp_path / "results_20m.md", "20m")


def test_budget_left_is_in_minutes_when_short_and_hours_when_long():
    plans = [SimpleNamespace(runs_left=4), SimpleNamespace(runs_left=5)]   # 9 runs left
    short = [SimpleNamespace(cpu_seconds=s) for s in (30.0, 60.0, 600.0)]   # median 1 min
    assert ("at least 9 runs, about 9 CPU-min at the median 1.0 CPU-min of a run so far"
            in results_page.budget_left(plans, short))
    long = [SimpleNamespace(cpu_seconds=1200.0)] * 3   # 20 min: 9 x 20 = 3 h
    assert "about 3 CPU-hours at the median 20.0 CPU-min" in results_page.budget_left(plans, long)
    assert results_page.budget_left([SimpleNamespace(runs_left=0)], short) == ""


def test_software_line_counts_the_runs_of_each_version_set():
    new, newer = "jax 0.10.2, numpy 2.4.6", "jax 0.11.2, numpy 2.4.6"
    records = [SimpleNamespace(software=s) for s in (new, newer, new, "", "")]
    assert results_page.software_line(records) == (
        "- **Software.** jax 0.10.2, numpy 2.4.6 (2 runs); jax 0.11.2, numpy 2.4.6 (1 run); "
        "not recorded (2 runs, kept before runs recorded them).")
    assert results_page.software_line([SimpleNamespace(software=new)]) == (
        "- **Software.** jax 0.10.2, numpy 2.4.6 (1 run).")
    assert results_page.software_line([]) == "- **Software.** no runs yet."
