"""The command line reaches every TrainConfig field; --config files; --help; exit codes.
No training here (parsing only), so this file takes about a second."""

from __future__ import annotations

import dataclasses
import json

import pytest

from train import __main__ as cli
from train import config as config_lib
from train.config import TrainConfig

# A value different from the tiny preset's for every field, as a flag would give it.
NON_DEFAULT = {
    "lr": ("--lr", "0.0123", 0.0123), "steps": ("--steps", "77", 77),
    "batch_size": ("--batch-size", "3", 3), "seq_len": ("--seq-len", "48", 48),
    "warmup_fraction": ("--warmup-fraction", "0.25", 0.25),
    "final_lr_fraction": ("--final-lr-fraction", "0.2", 0.2),
    "weight_decay": ("--weight-decay", "0.01", 0.01), "clip": ("--clip", "0.5", 0.5),
    "b1": ("--b1", "0.8", 0.8), "b2": ("--b2", "0.99", 0.99),
    "eval_every": ("--eval-every", "7", 7), "eval_batches": ("--eval-batches", "3", 3),
    "val_batch_size": ("--val-batch-size", "none", None), "seed": ("--seed", "5", 5),
    "data": ("--data", "corpus.txt", "corpus.txt"),
    "tokenizer": ("--tokenizer", "sentencepiece", "sentencepiece"),
    "vocab_size": ("--vocab-size", "1000", 1000),
    "val_fraction": ("--val-fraction", "0.1", 0.1), "out_dir": ("--out", "elsewhere", "elsewhere"),
    "checkpoint_every": ("--checkpoint-every", "0", 0),
    "keep_checkpoints": ("--keep-checkpoints", "4", 4), "log_every": ("--log-every", "3", 3),
    "s_min": ("--s-min", "0.5", 0.5), "s_max": ("--s-max", "2.5", 2.5),
    "interval": ("--interval", "40", 40), "ramp_steps": ("--ramp-steps", "none", None),
    "active_fraction": ("--active-fraction", "0.5", 0.5),
    "min_eigenvalues": ("--min-eigenvalues", "16", 16), "spread": ("--spread", "4", 4),
    "tokenizer_model": ("--tokenizer-model", "tok.model", "tok.model"),
    "init_grad_batches": ("--init-grad-batches", "4", 4),
    "dtype": ("--dtype", "bfloat16", "bfloat16"), "accumulate": ("--accumulate", "4", 4),
    "progress": ("--no-progress", None, False), "mesh": ("--mesh", "data=1", "data=1"),
    "tensorboard": ("--tensorboard", None, True), "profile": ("--profile", "5:2", "5:2"),
    "compilation_cache_dir": ("--compilation-cache-dir", "/tmp/c", "/tmp/c"),
    "peak_tflops": ("--peak-tflops", "312", 312.0),
    "preset": ("--preset", "20m", "20m"), "method": ("--method", "alpha_hill", "alpha_hill"),
    "optimizer": ("--optimizer", "muon", "muon"),
    "schedule": ("--schedule", "wsd", "wsd"), "decay_fraction": ("--decay-fraction", "0.3", 0.3),
    "module_factors": (None, None, {"mlp": 2.0, "embed": 5.0}),
    # --init-grad-train-init applies to --method init_grad only: its own test below.
    "init_grad_train_init": (None, None, "model"),
    "fan_in_start": ("--fan-in-start", None, True),
    # --multipliers FILE applies to --method relative only: its own tests below.
    "multipliers": (None, None, None),
    "model_overrides": (None, None, {"num_layers": 2, "hidden": 64, "intermediate": 96,
                                     "num_heads": 8, "num_kv_heads": 2, "rope_theta": 500.0,
                                     "norm_eps": 1e-5, "tie_embeddings": True}),
}
MODEL_ARGV = ["--num-layers", "2", "--hidden", "64", "--intermediate", "96", "--num-heads", "8",
              "--num-kv-heads", "2", "--rope-theta", "500", "--norm-eps", "1e-5",
              "--tie-embeddings"]


def _parse(argv):
    return cli.config_from_args(cli.build_parser().parse_args(argv))


def test_every_config_field_is_reachable_from_the_command_line(tmp_path):
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields == set(NON_DEFAULT), "a TrainConfig field without a flag (or a stale test)"
    factors = tmp_path / "factors.json"
    factors.write_text(json.dumps(NON_DEFAULT["module_factors"][2]))
    argv = list(MODEL_ARGV) + ["--module-factors", str(factors)]
    for flag, value, _ in NON_DEFAULT.values():
        if flag is not None:
            argv += [flag] if value is None else [flag, value]
    cfg = _parse(argv)
    for name, (_, _, expected) in NON_DEFAULT.items():
        assert getattr(cfg, name) == expected, name
    tiny = config_lib.from_preset("tiny")
    assert all(getattr(tiny, name) != expected for name, (_, _, expected) in NON_DEFAULT.items()
               if name not in ("preset", "multipliers", "init_grad_train_init")), \
        "each value must differ from the default"
    init_grad = _parse(["--method", "init_grad", "--init-grad-train-init", "paper"])
    assert (tiny.init_grad_train_init, init_grad.init_grad_train_init) == ("model", "paper")


def test_config_file_overrides_the_preset_and_flags_override_the_file(tmp_path):
    settings = {"preset": "20m", "method": "alpha_hill", "lr": 0.002, "steps": 50,
                "model_overrides": {"num_layers": 2}, "dtype": "bfloat16", "accumulate": 2}
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps(settings))
    cfg = _parse(["--config", str(json_file), "--steps", "60", "--num-kv-heads", "2"])
    preset = config_lib.PRESETS["20m"]
    assert cfg.preset == "20m" and cfg.interval == preset["interval"]  # from the preset
    assert (cfg.method, cfg.lr, cfg.dtype, cfg.accumulate) == ("alpha_hill", 0.002,
                                                               "bfloat16", 2)  # the file
    assert cfg.steps == 60  # the flag
    assert cfg.model_overrides == {"num_layers": 2, "num_kv_heads": 2}
    assert cfg.out_dir == "runs/20m_alpha_hill_adamw"

    yaml = pytest.importorskip("yaml")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(yaml.safe_dump(settings))
    assert _parse(["--config", str(yaml_file), "--steps", "60", "--num-kv-heads", "2"]) == cfg


@pytest.mark.parametrize("content, name, message", [
    ('{"lr": 0.1, "learning_rate": 2}', "a.json", "unknown setting(s) learning_rate"),
    ("{not json", "a.json", "is not valid JSON"),
    ("[1, 2]", "a.json", "must hold a mapping"),
    ("lr: [unclosed", "a.yaml", "is not valid YAML"),
    ("lr: 1", "a.toml", "expected a .json, .yaml or .yml file"),
    ('{"steps": -1}', "a.json", "steps must be an integer >= 1"),
    ('{"model_overrides": {"depth": 3}}', "a.json", "unknown model field 'depth'"),
])
def test_bad_config_files_are_one_line_errors(content, name, message, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        cli.main(["--config", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("argv, content, message", [
    (["--method", "module_constant"], None, "needs --module-factors FILE"),
    (["--method", "module_constant", "--module-factors"], "[2.0]", "must hold a JSON object"),
    (["--method", "module_constant", "--module-factors"], "{oops", "not a readable JSON file"),
    (["--method", "module_constant", "--module-factors"], '{"mlp": -1}',
     "expected module type -> positive number"),
    (["--schedule", "wsd", "--warmup-fraction", "0.5", "--decay-fraction", "0.6"], None,
     "must end before the decay"),
    (["--schedule", "linear"], None, "Unknown schedule 'linear'"),
    (["--decay-fraction", "0"], None, "decay_fraction must lie in (0, 1]"),
    (["--init-grad-train-init", "paper"], None, "applies to --method init_grad only"),
    (["--method", "init_grad", "--fan-in-start"], None, "fan_in_start is for the other"),
])
def test_schedule_and_module_factor_errors_are_one_line(argv, content, message, tmp_path,
                                                       capsys):
    if content is not None:
        path = tmp_path / "factors.json"
        path.write_text(content)
        argv = argv + [str(path)]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


def test_missing_config_file_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--config", str(tmp_path / "nope.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "cannot be read" in err[0]


def test_help_shows_preset_values_and_exit_codes():
    text = cli.build_parser().format_help()
    assert "--lr LR" in text and "(tiny: 0.003)" in text
    assert "--num-layers NUM_LAYERS" in text and "decoder blocks (tiny: 6)" in text
    assert "--config FILE" in text and "--tensorboard" in text and "--accumulate" in text
    for code, meaning in [("0", "finished"), ("1", "diverged"), ("2", "bad input"),
                          ("3", "stopped by SIGTERM or SIGINT"), ("130", "interrupted")]:
        assert any(line.split()[:1] == [code] and meaning in line
                   for line in text.splitlines()), code
    assert (cli.EXIT_DIVERGED, cli.EXIT_USER_ERROR, cli.EXIT_SIGNAL) == (1, 2, 3)
