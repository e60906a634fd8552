"""`import llr_optax` needs only jax, optax and numpy: the trainer's stack is never imported.

Run in a fresh interpreter (this test process has already imported whatever other tests need).
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER_ONLY = ("flax", "orbax", "grain", "tqdm", "matplotlib", "tensorboardX")

PROBE = f"""
import json, sys
import llr_optax
top = {{name.split(".")[0] for name in sys.modules}}
print(json.dumps({{"file": llr_optax.__file__, "heavy": sorted(top & set({TRAINER_ONLY!r})),
                  "needed": sorted(top & {{"jax", "optax", "numpy"}})}}))
"""


def probe(code):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_llr_optax_imports_no_trainer_dependency():
  report = probe(PROBE)
  assert report["file"].startswith(os.path.join(ROOT, "llr_optax")), report["file"]
  assert report["heavy"] == [], report["heavy"]
  assert report["needed"] == ["jax", "numpy", "optax"]


def test_probe_detects_a_trainer_import():
  # Control: the same probe, after importing tqdm, reports it (so an empty list means something).
  report = probe("import tqdm\n" + PROBE)
  assert report["heavy"] == ["tqdm"]
