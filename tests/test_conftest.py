"""conftest.py and tests/_fast_compile.py: the XLA flags, slow tests first, one-worker modules."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from tests import _fast_compile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_adds_each_flag_once_and_keeps_the_users_value():
    assert _fast_compile.with_fast_compile("") == (
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    given = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=2"
    assert _fast_compile.with_fast_compile(given) == (
        given + " --xla_llvm_disable_expensive_passes=true")
    once = _fast_compile.with_fast_compile("")
    assert _fast_compile.with_fast_compile(once) == once


def test_this_process_compiles_with_the_flags_unless_opted_out():
    names = {flag.split("=", 1)[0] for flag in os.environ.get("XLA_FLAGS", "").split()}
    if os.environ.get("LLR_TEST_FULL_XLA_OPT") != "1":
        assert set(_fast_compile.FLAGS) <= names
    # jax read them (an unknown or malformed flag would have made XLA abort at first use).
    assert float(jax.jit(lambda x: (x * x).sum())(jnp.arange(4.0))) == 14.0


def _mock_suite(tmp_path) -> pathlib.Path:
    """The real conftest.py over stand-in test modules with the real modules' names."""
    shutil.copy(ROOT / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n")
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "__init__.py").write_text("")
    shutil.copy(ROOT / "tests" / "_fast_compile.py", tests / "_fast_compile.py")
    many = ("import pytest\n\n@pytest.mark.parametrize('i', range({n}))\n"
            "def test_{name}(i):\n    pass\n")
    (tests / "test_mesh_train.py").write_text(many.format(n=6, name="mesh"))
    (tests / "test_sharding.py").write_text(many.format(n=4, name="sharding"))
    (tests / "test_other.py").write_text(
        many.format(n=30, name="other") + "\n\n@pytest.mark.slow\ndef test_long():\n    pass\n")
    return tmp_path


def _pytest(cwd, *args) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_slow_tests_are_collected_first_and_the_rest_keep_their_order(tmp_path):
    out = _pytest(_mock_suite(tmp_path), "--collect-only", "-q", "tests/test_other.py")
    ids = [line for line in out.splitlines() if "::" in line]
    assert ids == ["tests/test_other.py::test_long"] + [
        f"tests/test_other.py::test_other[{i}]" for i in range(30)]


def test_each_child_check_module_runs_whole_on_one_xdist_worker(tmp_path):
    out = _pytest(_mock_suite(tmp_path), "-n", "2", "-v")
    worker_of = {}
    for worker, nodeid in re.findall(r"\[(gw\d)\] \[ *\d+%\] PASSED (\S+)", out):
        worker_of.setdefault(nodeid.split("::")[0], set()).add(worker)
    assert len(worker_of["tests/test_mesh_train.py"]) == 1, worker_of
    assert len(worker_of["tests/test_sharding.py"]) == 1, worker_of
    # The control: the ordinary module's tests are spread over both workers.
    assert worker_of["tests/test_other.py"] == {"gw0", "gw1"}, worker_of


def test_an_unclear_opt_out_value_is_refused(monkeypatch):
    monkeypatch.setenv("LLR_TEST_FULL_XLA_OPT", "yes")
    with pytest.raises(ValueError, match="must be 0 or 1, got 'yes'"):
        _fast_compile.install()
