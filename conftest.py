"""Test-session setup shared by `tests/` and the library's doctests.

* XLA flags for faster compiles, set before anything imports jax: tests/_fast_compile.py.
* Scheduling under the README's `pytest -n 2` (xdist's default `--dist load`): the modules in
  `ONE_WORKER_MODULES` each go whole to one worker, and the tests marked `slow` (the few over
  ~20 s) are handed out first. Each of those modules runs one child process (8 simulated
  devices, 1-2 minutes) whose report all its tests read; split over two workers, one of them
  would sit idle waiting for it. Long tests started last would leave one worker running a
  notebook alone at the end; started first, the short ones fill in around them.
"""

from __future__ import annotations

import sys
import warnings

import pytest

from tests import _fast_compile

_fast_compile.install()
if "jax" in sys.modules:  # a plugin imported jax first: XLA has read its flags already
    warnings.warn("jax was imported before conftest.py; the fast-compile XLA flags reach only "
                  "child processes", stacklevel=1)

ONE_WORKER_MODULES = ("tests/test_mesh_train.py", "tests/test_sharding.py")


def pytest_collection_modifyitems(items):
    # A stable sort: the slow tests keep their order, and so does the rest. Every xdist
    # worker computes the same order, which xdist requires.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's per-test scheduling, except that `ONE_WORKER_MODULES` are one unit each.

    (xdist's own `xdist_group` marker would say this, but its `--dist loadgroup` does not
    group under pytest 9.2 with xdist 3.8: it sets `item._nodeid`, which pytest no longer
    reads.) Units are handed out in collection order, the multi-test ones first, each to a
    worker with at most 2 tests pending.
    """
    if config.getvalue("dist") != "load":
        return None  # another mode asked for explicitly: xdist's own scheduler
    from xdist.scheduler import LoadScopeScheduling  # pylint: disable=import-outside-toplevel

    class _Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER_MODULES else nodeid

    return _Scheduling(config, log)
