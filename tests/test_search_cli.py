"""python -m train.search end to end with a fake trainer (no training): runs cached by
train.run_cache, an interrupted search resumed at no cost on the same path, the budget,
the outputs, and the found table read back by python -m train --multipliers."""

import json
import math
from pathlib import Path

import pytest

from train import __main__ as train_cli
from train import search

TARGET_LR, TARGET_EMBED_START = 0.015, 1.0  # tiny: lr 0.003 (x5), embed start 5 (x1/5)


class FakeTrainer:
    """Stands in for ``python -m train``: writes the final evaluation a run would, with a
    val loss that is a log bowl around the targets (3.0 for uniform), and can stop."""

    def __init__(self, stop_at_call=None):
        self.configs, self.stop_at_call = [], stop_at_call

    def __call__(self, request: Path, log: Path) -> int:
        config = json.loads(request.read_text())
        self.configs.append(config)
        if len(self.configs) == self.stop_at_call:
            return 3  # python -m train's status for "stopped by a signal, resumable"
        if config["method"] == "uniform":
            loss = 3.0
        else:
            table = config["multipliers"]  # None: the paper's, whose embed start is 5
            start = table["multipliers"]["embed"][0] if table else 5.0
            loss = (2.0 + math.log(config["lr"] / TARGET_LR) ** 2
                    + math.log(start / TARGET_EMBED_START) ** 2)
        record = {"kind": "eval", "step": config["steps"], "val_loss": loss}
        (Path(config["out_dir"]) / "metrics.jsonl").write_text(json.dumps(record) + "\n")
        log.write_text("fake run\n")
        return 0


def argv(out, *extra):
    return ["--preset", "tiny", "--steps", "4", "--coordinates", "lr,embed.start",
            "--out", str(out), *extra]


def outcome(out):
    found = json.loads((out / "search.json").read_text())
    return {k: v for k, v in found.items() if k != "command"}


def test_search_caches_resumes_and_writes_a_table_train_accepts(tmp_path, capsys):
    fresh = FakeTrainer()
    assert search.main(argv(tmp_path / "fresh"), launcher=fresh) == 0
    result = outcome(tmp_path / "fresh")
    # lr: 0.003 -> x5 = 0.015 (exact); embed.start: 5 -> x1/5 = 1 (exact); pass 2 moves
    # nothing. Distinct points: 1 + 4 + 4 (pass 1) + 4 + 3 (pass 2: every lr candidate
    # is new since embed.start moved; embed.start 5 with lr 0.015 was seen) = 16.
    assert result["stopped"] == "converged"
    assert [(s["pass"], s["coordinate"], s["before"], s["after"]) for s in result["steps"]] == [
        (1, "lr", 0.003, 0.015), (1, "embed.start", 5.0, 1.0),
        (2, "lr", 0.015, 0.015), (2, "embed.start", 1.0, 1.0)]
    assert result["best_loss"] == pytest.approx(2.0) and result["evaluations"] == 16
    # One child run per distinct point plus the uniform reference.
    assert len(fresh.configs) == result["evaluations"] + 1
    assert {c["method"] for c in fresh.configs} == {"relative", "uniform"}
    assert all(c["steps"] == 4 for c in fresh.configs)

    # Interrupted at the 6th run, then resumed: the 5 finished runs are read back, the
    # stopped one reruns, and the path is the same.
    out = tmp_path / "resumed"
    stopped = FakeTrainer(stop_at_call=6)
    assert search.main(argv(out), launcher=stopped) == 3
    assert "rerun the same command to resume" in capsys.readouterr().err
    again = FakeTrainer()
    assert search.main(argv(out), launcher=again) == 0
    assert outcome(out) == result
    assert len(again.configs) == len(fresh.configs) - 5
    assert again.configs[0] == stopped.configs[5]
    # A third invocation trains nothing.
    idle = FakeTrainer()
    assert search.main(argv(out), launcher=idle) == 0 and idle.configs == []
    text = (out / "search.md").read_text()
    assert "| 1 | 1 | lr | 0.003 |" in text and "trained 0 and read 17 back" in text
    assert (out / "search_loss.png").stat().st_size > 0

    # The found table, as python -m train --method relative --multipliers FILE reads it.
    found = json.loads((out / "multipliers.json").read_text())
    assert found["lr"] == 0.015 and found["final_fraction"] == 0.06
    assert found["multipliers"]["embed"] == [1.0, 0.6]
    parser = train_cli.build_parser()
    cfg = train_cli.config_from_args(parser.parse_args(
        ["--method", "relative", "--multipliers", str(out / "multipliers.json")]))
    assert cfg.multipliers == {"multipliers": found["multipliers"], "final_fraction": 0.06}
    assert cfg.lr == 0.015  # the file's lr, unless a flag gives one
    cfg = train_cli.config_from_args(parser.parse_args(
        ["--method", "relative", "--multipliers", str(out / "multipliers.json"),
         "--lr", "0.001"]))
    assert cfg.lr == 0.001
    # ... and as the start of another search.
    restart = FakeTrainer()
    assert search.main(argv(tmp_path / "restart", "--start", str(out / "multipliers.json")),
                       launcher=restart) == 0
    assert outcome(tmp_path / "restart")["start"]["lr"] == 0.015


def test_budget_limits_the_runs(tmp_path):
    trainer = FakeTrainer()
    assert search.main(argv(tmp_path, "--budget", "3", "--no-reference"), launcher=trainer) == 0
    result = outcome(tmp_path)
    assert result["stopped"] == "budget" and result["evaluations"] == 3
    assert len(trainer.configs) == 3


def test_transfer_runs_three_tables_on_the_target(tmp_path):
    trainer = FakeTrainer()
    assert search.main(argv(tmp_path, "--preset", "moe-tiny", "--budget", "2",
                            "--no-reference", "--transfer-to", "moe-8x34m",
                            "--transfer-steps", "3", "--transfer-set", "num_layers=1"),
                       launcher=trainer) == 0
    assert [(c["preset"], c["steps"]) for c in trainer.configs[:2]] == [("moe-tiny", 4)] * 2
    transfer = trainer.configs[2:]
    assert [(c["preset"], c["method"], c["steps"], c["model_overrides"]) for c in transfer] == [
        ("moe-8x34m", m, 3, {"num_layers": 1}) for m in ("uniform", "relative", "relative")]
    assert transfer[1]["multipliers"] is None  # the paper's table for MoE
    found = transfer[2]["multipliers"]
    assert found["final_fraction"] == 0.04 and set(found["multipliers"]) == {
        "embed", "head", "router", "expert", "attn"}
    assert all(c["lr"] == 0.003 for c in transfer)  # the target's own base LR
    assert "## Transfer to `moe-8x34m`" in (tmp_path / "search.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--budget", "0"], "--budget must be >= 1"),
    (["--coordinates", "lr,mlp.middle"], "--coordinates: unknown mlp.middle"),
    (["--set", "method=uniform"], "the search decides method"),
    (["--set", "colour=3"], "not a TrainConfig or model field"),
    (["--start", "missing.json"], "--start 'missing.json' cannot be read"),
    (["--transfer-to", "moe-tiny"], "between MoE presets or between dense ones"),
])
def test_bad_arguments_are_one_line_errors(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        search.main(argv(tmp_path, *extra), launcher=FakeTrainer())
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_crashed_run_stops_the_search_with_its_log(tmp_path, capsys):
    class Crash(FakeTrainer):
        def __call__(self, request, log):
            log.write_text("Traceback (most recent call last):\nMemoryError\n")
            return 1

    assert search.main(argv(tmp_path), launcher=Crash()) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "MemoryError" in err[0]
