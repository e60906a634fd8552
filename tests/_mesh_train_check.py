"""Mesh-training check, run by tests/test_mesh_train.py in a child process with 8 CPU devices.

Usage: ``python tests/_mesh_train_check.py WORKDIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` in the environment (it must be set
before jax is imported). Trains the tiny preset (one block) for 2 steps through
``train.loop.train``, on one device and on meshes, and prints one JSON report on stdout:
losses, alphas, per-leaf parameter differences against the single-device run, the
shardings recorded in the mesh runs' checkpoints, and the errors of unfit layouts.

Runs (each mesh run is compared with the single-device run of the same method):

* ``uniform/adamw``: ``data=2,fsdp=4`` stopped after step 1, resumed under ``fsdp=8``
  (a checkpoint written on one layout restored into another);
* ``alpha_hill/adamw``: ``data=2,fsdp=4``, alphas recomputed at both steps (interval 1);
* ``uniform/muon``: ``data=2,fsdp=2,tensor=2`` (tensor parallel too), with gradient
  accumulation over 2 micro-batches (the micro-batch axis stays whole, rows are split);
* ``moe-uniform/muon``: the MoE preset (one block, 4 experts) on ``fsdp=2,tensor=4``: the
  experts spread over ``tensor`` (expert parallelism), Muon orthogonalising each expert.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax import nnx  # noqa: E402

from train import data as data_lib  # noqa: E402
from train import loop  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.mesh import MeshLayout  # noqa: E402

# (method, optimizer) -> legs of the mesh run: (mesh, stop_after); a leg after the first
# resumes from the previous one's checkpoint.
RUNS = {
    "uniform/adamw": [("data=2,fsdp=4", 1), ("fsdp=8", None)],
    "alpha_hill/adamw": [("data=2,fsdp=4", None)],
    "uniform/muon": [("data=2,fsdp=2,tensor=2", None)],
    "moe-uniform/muon": [("fsdp=2,tensor=4", None)],
}
# Extra settings of a run (both its single-device and its mesh legs). alpha_hill trains the
# embedding and head at s_max = 5x the LR: at lr 1e-2 its first step overshoots (the loss rises
# 5.62 -> 5.98), where float noise in AdamW's sign-like first update moves the step-2 loss by
# 1.5e-5 (relative) between the two runs; at 2e-3 its largest LR is the other runs' 1e-2.
RUN_OVERRIDES = {"uniform/muon": {"accumulate": 2}, "alpha_hill/adamw": {"lr": 2e-3}}
# Runs on another model than the tiny LLaMa (the name's prefix before '-').
MODELS = {"moe": dict(preset="moe-tiny", model_overrides={"num_layers": 1, "num_experts": 4})}
# Leaves whose recorded sharding is reported (one per kind of layout).
SHARDING_LEAVES = ("model/layers/0/mlp/up_proj/kernel", "model/layers/0/mlp/down_proj/kernel",
                   "lm_head/kernel", "model/embed_tokens/embedding",
                   "model/layers/0/moe/experts/up_proj", "model/layers/0/moe/experts/down_proj",
                   "model/layers/0/moe/router/kernel")


def config(workdir: Path, corpus: Path, **overrides) -> TrainConfig:
    values = dict(
        preset="tiny", model_overrides={"num_layers": 1}, seq_len=32, batch_size=8,
        val_batch_size=8, steps=2, lr=1e-2, warmup_fraction=0.0, eval_every=1000,
        eval_batches=1, log_every=1, checkpoint_every=0, progress=False, data=str(corpus),
        out_dir=str(workdir / "run"), interval=1, ramp_steps=1, active_fraction=1.0,
        min_eigenvalues=8)
    return TrainConfig(**{**values, **overrides})


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def checkpoints(out_dir: str) -> dict[int, dict]:
    """``{step: {"params": {path: array}, "specs": {path: (mesh shape, spec)}}}`` of a run's
    checkpoints, read back with the shardings they were written from."""
    mngr = ocp.CheckpointManager(Path(out_dir, "checkpoints").absolute())
    out = {}
    for s in mngr.all_steps():
        state = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
        leaves = jax.tree_util.tree_flatten_with_path(state["params"])[0]
        specs = {jax.tree_util.keystr(k, simple=True, separator="/"):
                 (dict(v.sharding.mesh.shape), str(v.sharding.spec))
                 if hasattr(v.sharding, "spec") else None for k, v in leaves}
        out[int(s)] = {"params": flat(state["params"]), "specs": specs}
    mngr.close()
    return out


def train(cfg: TrainConfig, data, **kwargs) -> dict:
    t0 = time.perf_counter()
    result = loop.train(cfg, data=data, **kwargs)
    return {"steps": [r["step"] for r in result["train"]],
            "losses": [r["loss"] for r in result["train"]],
            "val_loss": result["final"]["val_loss"] if result["final"] else None,
            "alphas": [r["alpha"] for r in result["alphas"]],
            "seconds": time.perf_counter() - t0}


def compare(single: dict, mesh: dict, init: dict) -> dict:
    """Per leaf: max |difference| and ||difference|| / ||single-device update||."""
    out = {}
    for k, a in single.items():
        b = mesh[k]
        update = np.linalg.norm(a - init[k])
        out[k] = {"max_abs": float(np.max(np.abs(a - b))),
                  "update_rel": float(np.linalg.norm(a - b) / max(update, 1e-30))}
    return out


def unfit_layout_errors(workdir: Path, corpus: Path) -> dict[str, str]:
    out = {}
    for name, overrides in {
        "product": dict(mesh="data=2,fsdp=2"),
        "batch": dict(mesh="data=2,fsdp=4", batch_size=4),
        "val_batch": dict(mesh="data=8", val_batch_size=12),
    }.items():
        try:
            MeshLayout.from_config(config(workdir, corpus, **overrides))
            out[name] = ""
        except ValueError as e:
            out[name] = str(e)
    # Tensor parallelism does not split the batch: any batch size fits.
    out["tensor_only_batch_parallel"] = MeshLayout.from_config(
        config(workdir, corpus, mesh="tensor=8", batch_size=3)).batch_parallel
    return out


def main(workdir: Path) -> dict:
    from pydoc_data.topics import topics

    corpus = workdir / "corpus.txt"
    corpus.write_text("\n\n".join(topics[k].strip() for k in sorted(topics))[:150_000],
                      encoding="utf-8")
    base = config(workdir, corpus)
    data = data_lib.build_data(loop.data_config(base))
    report = {"devices": jax.device_count(), "errors": unfit_layout_errors(workdir, corpus),
              "runs": {}}
    finals = {}
    for name, legs in RUNS.items():
        model, _, run = name.rpartition("-")
        method, optimizer = run.split("/")
        single_cfg = config(workdir, corpus, method=method, optimizer=optimizer,
                            out_dir=str(workdir / f"{model}{method}_{optimizer}_single"),
                            **MODELS.get(model, {}), **RUN_OVERRIDES.get(name, {}))
        init = flat(nnx.to_pure_dict(nnx.state(loop.build_model(single_cfg, data.vocab_size),
                                               nnx.Param)))
        single = train(single_cfg, data)
        single_params = checkpoints(single_cfg.out_dir)[2]["params"]
        out_dir = str(workdir / f"{model}{method}_{optimizer}_mesh")
        mesh_legs = []
        for i, (mesh, stop_after) in enumerate(legs):
            leg_cfg = single_cfg.replace(mesh=mesh, out_dir=out_dir)
            mesh_legs.append(train(leg_cfg, data, resume=i > 0, stop_after=stop_after))
        saved = checkpoints(out_dir)
        finals[name] = (single_params, init)
        report["runs"][name] = {
            "single": single,
            # A resumed run reports the whole run's records (kept up to its checkpoint).
            "mesh": {**mesh_legs[-1], "seconds": [leg["seconds"] for leg in mesh_legs]},
            "layouts": [mesh for mesh, _ in legs],
            "accumulate": single_cfg.accumulate,
            "specs": {s: {k: saved[s]["specs"][k] for k in SHARDING_LEAVES
                          if k in saved[s]["specs"]} for s in saved},
            "diff": compare(single_params, saved[2]["params"], init),
        }
    # Control: two different single-device runs (AdamW and Muon, same data and LR) differ by
    # O(1) on this scale, so the tolerance on "diff" can tell a wrong mesh step from noise.
    report["control"] = compare(finals["uniform/adamw"][0], finals["uniform/muon"][0],
                                finals["uniform/adamw"][1])
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
