"""The trainer on a device mesh (``--mesh``, train/mesh.py) matches the single-device run.

The 8-device checks run `tests/_mesh_train_check.py` in ONE child process with 8 simulated CPU
devices (`XLA_FLAGS` must be set before jax is imported, so this process is left alone) and
assert on its JSON report; the child trains the tiny and moe-tiny presets (one block) for 2
steps on one device and on meshes (see its docstring for the runs). Under pytest-xdist the
child still runs once: conftest.py sends this whole module to one worker, so the other goes on
with other tests (under another `--dist` mode than the default, the first worker to need the
report produces it and the others wait for its file).

Tolerances. The mesh step computes the same math with other reduction orders (sharded matmuls,
the gradient all-reduce) and the model is initialised by one jitted call instead of op by op,
so results agree to float32 rounding, not bitwise:

* losses (train and validation) and alphas: relative 1e-5 (measured: train losses <= 5e-7,
  validation <= 2e-7, alphas <= 2e-6; alpha_hill runs at lr 2e-3 so that its largest LR,
  s_max x lr on embedding and head, is the other runs' 1e-2: at 1e-2 its first step
  overshoots and its step-2 loss differs by 1.5e-5);
* parameters after 2 steps: per leaf, ||mesh - single|| <= 1e-3 ||single - init||, i.e.
  relative to what the 2 updates moved it (measured <= 9e-5). An elementwise bound on the
  parameters themselves would be loose: AdamW's first steps divide each gradient entry by
  its own magnitude (m / sqrt(v) ~ sign(g)), so entries whose gradient is ~eps = 1e-8 (rare
  vocabulary columns of the head, where the sum over positions cancels) turn float noise of
  ~1e-9 into parameter differences of up to ~1% of lr (measured 9e-5 at lr 1e-2; as large
  under pure data parallelism, where only the all-reduce order differs). The control (the
  AdamW and the Muon run, same metric) is >= 0.7, so the bound separates a wrong step from
  float noise.

The compiled code is built with XLA's backend optimisation level 0 in the child: it halves
the compile time, which dominates here, and both sides of every comparison use it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from train import __main__ as cli
from train import config as config_lib
from train import option_text

from tests import _fast_compile

PARENT_XLA_FLAGS = os.environ.get("XLA_FLAGS")
CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_mesh_train_check.py")
RUNS = ("uniform/adamw", "alpha_hill/adamw", "uniform/muon", "moe-uniform/muon")
LOSS_RTOL = 1e-5
PARAM_UPDATE_RTOL = 1e-3


def _run_child(workdir) -> dict:
    env = dict(os.environ)
    # The suite's fast-compile flags, always (even under LLR_TEST_FULL_XLA_OPT=1): both sides
    # of every comparison run in this child.
    replaced = ("--xla_force_host_platform_device_count", *_fast_compile.FLAGS)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(replaced)]
    env["XLA_FLAGS"] = _fast_compile.with_fast_compile(
        " ".join(flags + ["--xla_force_host_platform_device_count=8"]))
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, CHECK, str(workdir)], env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    if proc.returncode != 0:
        return {"failed": proc.stderr[-6000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    # xdist workers share the parent of their base temp dir: the first to create the lock
    # directory runs the child, the others read its report.
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path, lock = root / "mesh_train_report.json", root / "mesh_train.lock"
    try:
        lock.mkdir()
    except FileExistsError:
        deadline = time.monotonic() + 900
        while not path.exists():
            assert time.monotonic() < deadline, "timed out waiting for the mesh-train report"
            time.sleep(0.5)
    else:
        try:
            result = _run_child(tmp_path_factory.mktemp("mesh_train"))
        except Exception as e:  # pylint: disable=broad-except  (waiting workers must not hang)
            result = {"failed": repr(e)}
        tmp = root / "mesh_train_report.json.tmp"
        tmp.write_text(json.dumps(result))
        tmp.replace(path)  # atomic: a waiting worker never reads half a file
    result = json.loads(path.read_text())
    assert "failed" not in result, result.get("failed")
    return result


def _close(a, b, rtol=LOSS_RTOL) -> bool:
    return abs(a - b) <= rtol * abs(a)


def test_child_has_eight_devices_and_parent_is_untouched(report):
    assert report["devices"] == 8
    assert os.environ.get("XLA_FLAGS") == PARENT_XLA_FLAGS


@pytest.mark.parametrize("run", RUNS)
def test_mesh_losses_match_single_device(report, run):
    single, mesh = report["runs"][run]["single"], report["runs"][run]["mesh"]
    assert single["steps"] == mesh["steps"] == [1, 2]
    assert all(_close(a, b) for a, b in zip(single["losses"], mesh["losses"])), (
        single["losses"], mesh["losses"])
    assert _close(single["val_loss"], mesh["val_loss"]), (single["val_loss"], mesh["val_loss"])


@pytest.mark.parametrize("run", RUNS)
def test_mesh_params_match_single_device(report, run):
    diff = report["runs"][run]["diff"]
    worst = max(diff, key=lambda k: diff[k]["update_rel"])
    assert diff[worst]["update_rel"] <= PARAM_UPDATE_RTOL, (worst, diff[worst])
    # The control: the same metric between two different runs is far above the bound.
    assert min(d["update_rel"] for d in report["control"].values()) > 100 * PARAM_UPDATE_RTOL


def test_alpha_hill_recomputes_the_same_alphas_on_the_mesh(report):
    single = report["runs"]["alpha_hill/adamw"]["single"]["alphas"]
    mesh = report["runs"]["alpha_hill/adamw"]["mesh"]["alphas"]
    assert len(single) == len(mesh) == 2  # interval 1: a recompute at both steps
    for a, b in zip(single, mesh):
        assert a.keys() == b.keys()
        values = [(a[k], b[k]) for k in a if a[k] is not None]
        assert len(values) == 7  # q, k, v, o, gate, up, down of the one block
        assert all(_close(x, y) for x, y in values), values


def test_params_are_sharded_on_the_mesh(report):
    # Read back from the checkpoints with the shardings they were written from.
    specs = report["runs"]["uniform/adamw"]["specs"]
    # Step 1 was written under data=2,fsdp=4; the run resumed under fsdp=8 for step 2.
    assert specs["1"]["model/layers/0/mlp/up_proj/kernel"] == [
        {"data": 2, "fsdp": 4, "tensor": 1}, "P('fsdp',)"]
    assert specs["2"]["model/layers/0/mlp/up_proj/kernel"] == [
        {"data": 1, "fsdp": 8, "tensor": 1}, "P('fsdp',)"]
    assert specs["2"]["model/layers/0/mlp/down_proj/kernel"][1] == "P(None, 'fsdp')"
    # The 257-token byte vocabulary is kept whole; the model width is split.
    assert specs["2"]["model/embed_tokens/embedding"][1] == "P(None, 'fsdp')"
    # uniform/muon accumulates 2 micro-batches per update (a [2, batch, seq] batch).
    assert report["runs"]["uniform/muon"]["accumulate"] == 2
    tensor = report["runs"]["uniform/muon"]["specs"]["2"]
    assert tensor["model/layers/0/mlp/up_proj/kernel"][1] == "P('fsdp', 'tensor')"
    assert tensor["model/layers/0/mlp/down_proj/kernel"][1] == "P('tensor', 'fsdp')"
    # MoE: the 4 experts over tensor=4 (expert parallelism), each expert's width over fsdp;
    # the router's expert columns stay whole (the softmax needs all of them).
    moe = report["runs"]["moe-uniform/muon"]["specs"]["2"]
    assert moe["model/layers/0/moe/experts/up_proj"][1] == "P('tensor', 'fsdp')"
    assert moe["model/layers/0/moe/experts/down_proj"][1] == "P('tensor', None, 'fsdp')"
    assert moe["model/layers/0/moe/router/kernel"][1] == "P('fsdp',)"


def test_unfit_layouts_are_refused_clearly(report):
    errors = report["errors"]
    assert "has 4 devices" in errors["product"] and "there are 8" in errors["product"]
    assert "batch_size=4 is not divisible by the data-parallel size 8" in errors["batch"]
    assert "val_batch_size=12 is not divisible by the data-parallel size 8" in errors[
        "val_batch"]
    assert errors["tensor_only_batch_parallel"] == 1


# ------------------------------------------------------------------- single process


def test_parse_mesh():
    assert option_text.parse_mesh("") == {}
    assert option_text.parse_mesh(" fsdp=4, data=2 ") == {"data": 2, "fsdp": 4, "tensor": 1}
    for bad, match in [("data", "axis=size"), ("data=2,pipe=2", "unknown axis 'pipe'"),
                       ("data=2,data=2", "given twice"), ("fsdp=0", "positive integer"),
                       ("fsdp=x", "positive integer"), ("data=2,", "axis=size")]:
        with pytest.raises(ValueError, match=match):
            option_text.parse_mesh(bad)


def test_mesh_is_resumable_and_validated():
    cfg = config_lib.from_preset("tiny")
    assert cfg.mesh == ""
    assert cfg.trajectory_diff(cfg.replace(mesh="data=2,fsdp=4")) == {}
    with pytest.raises(ValueError, match="unknown axis"):
        cfg.replace(mesh="model=2")


def test_cli_mesh_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--mesh", "data=2,pipe=2", "--out", str(tmp_path / "a")])
    assert e.value.code == 2
    assert "unknown axis 'pipe'" in capsys.readouterr().err
    # More devices than this process has: refused before any data is read.
    status = cli.main(["--mesh", "data=4096", "--out", str(tmp_path / "b"), "--no-progress"])
    assert status == 2
    assert "must multiply to the device count" in capsys.readouterr().err
    assert "--mesh" in cli.build_parser().format_help()
