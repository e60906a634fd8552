"""optax's own contract checks (alias_test, _common_test, masking, state_utils), ported onto ours.

Every transformation (scale_by_alpha_hill, relative_schedule, scale_by_init_grad,
add_decayed_weights_by_alpha_hill) is chained after `optax.adamw` and after `optax.contrib.muon`
and put through what optax checks for its own optimizers:

(a) `optax.tree.map_params` maps only param-shaped leaves (our per-matrix vectors are non-params);
(b) inside `optax.masked` / `optax.partition`, tree-valued arguments (labels, matrix_axes, scales)
    given for the FULL params give the updates of the transformation run on the selected leaves
    alone; the other leaves are left to the other branch;
(c) `optax.inject_hyperparams` under jit equals the plain factory; eager values are validated;
(d) `optax.MultiSteps`: our counts advance once per real update;
(e) `optax.apply_if_finite` keeps our state on a NaN step;
(f) the state's avals (weak types included) do not change in update: no recompile;
(g) `jax.eval_shape(tx.init, ShapeDtypeStructs)` works;
(h) complex params and gradients.

This file holds (a), (b), (f), (g) and the shared fixtures; (c), (d), (e), (h) are in
test_optax_contract_updates.py.

The alpha-driven transformations use `estimator="eigh"` here (where the estimator does not
matter): it compiles ~2x faster than the CPU default, and this file compiles many chains. All
matrices have Gram size 16 (one batched solve).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llr_optax

STEPS = 20
OUR_STATES = (llr_optax.ScaleByAlphaHillState, llr_optax.RelativeScheduleState,
              llr_optax.ScaleByInitGradState, llr_optax.AddDecayedWeightsByAlphaHillState)


def make_params(seed=0):
  """A small tree with a stacked leaf, a norm, two layer subtrees, embedding and head."""
  rng = np.random.default_rng(seed)
  p = {"embed_tokens": rng.standard_normal((24, 16)),
       "layers_0": {"q_proj": rng.standard_t(2.0, (2, 16, 16)) * 0.1,
                    "up_proj": rng.standard_normal((16, 32)) * 0.1,
                    "down_proj": rng.standard_t(3.0, (32, 16)) * 0.1,
                    "input_norm": 1.0 + 0.1 * rng.standard_normal(16)},
       "layers_1": {"q_proj": rng.standard_t(4.0, (16, 16)) * 0.1,
                    "up_proj": rng.standard_t(2.5, (16, 32)) * 0.1},
       "lm_head": rng.standard_normal((16, 24)) * 0.1}
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)


PARAMS = make_params()
PARAM_SHAPES = {x.shape for x in jax.tree.leaves(PARAMS)}


def grads_at(step, params=PARAMS):
  # NumPy draws (eager jax.random would compile a kernel per shape: seconds on this CI).
  rng = np.random.default_rng(1000 + step)
  return jax.tree.map(lambda x: (np.asarray(x) + rng.standard_normal(x.shape)).astype(x.dtype),
                      params)


# Tree-valued arguments, given for the full params. They differ from the defaults so that a
# transformation that ignored them would give other numbers: the head is labelled "other" (it
# joins the alpha fit instead of being pinned, and has no RLRS multiplier), the stacked q_proj
# is read as ONE 32 x 16 matrix instead of two 16 x 16 ones.
LABELS = llr_optax.label_params(PARAMS)
LABELS["lm_head"] = "other"
AXES = jax.tree.map(lambda x, l: None if x.ndim < 2 or l == "norm" else
                    llr_optax.MatrixAxes(reduction_axis=x.ndim - 2, output_axis=x.ndim - 1),
                    PARAMS, LABELS)
AXES["layers_0"]["q_proj"] = llr_optax.MatrixAxes(reduction_axis=(0, 1), output_axis=2)
SCALES = {"embed_tokens": 2.0, "layers_0": {"q_proj": 0.5, "up_proj": 1.5, "down_proj": 0.7,
                                             "input_norm": 3.0},
          "layers_1": {"q_proj": 0.25, "up_proj": 4.0}, "lm_head": 1.2}


def alpha_hill(labels=None, matrix_axes=None, **kw):
  return llr_optax.scale_by_alpha_hill(s_min=1.0, s_max=3.0, interval=2, ramp_steps=1,
                                       total_steps=STEPS, active_fraction=0.5, labels=labels,
                                       matrix_axes=matrix_axes, estimator="eigh", **kw)


def relative(labels=None):
  return llr_optax.relative_schedule(llr_optax.DENSE_MULTIPLIERS, STEPS, 0.1, 2, labels=labels)


def init_grad(scales=None):
  return llr_optax.scale_by_init_grad(SCALES if scales is None else scales)


def alpha_decay(labels=None, matrix_axes=None):
  return llr_optax.add_decayed_weights_by_alpha_hill(
      0.1, interval=2, total_steps=STEPS, active_fraction=0.5, labels=labels,
      matrix_axes=matrix_axes, estimator="eigh")


METHODS = {"alpha_hill": alpha_hill, "relative": relative, "init_grad": init_grad,
           "alpha_decay": alpha_decay}
BASES = {
    "adamw": lambda: optax.adamw(0.05, b1=0.9, b2=0.95, weight_decay=0.1),
    "muon": lambda: optax.contrib.muon(
        0.05, weight_decay=0.1, adam_weight_decay=0.1,
        muon_weight_dimension_numbers=llr_optax.muon_dimension_numbers),
}


def chain(base, method):
  return optax.chain(BASES[base](), METHODS[method]())


def our_states(state):
  nodes = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, OUR_STATES))
  return [n for n in nodes if isinstance(n, OUR_STATES)]


def applied(state):
  """The per-leaf values our (single) transformation applied last, as a params-shaped tree.

  What `current_scales` / `current_weight_decays` return (tested elsewhere), read on the host:
  slicing the device vector eagerly would compile one tiny kernel per slice.
  """
  (ours,) = our_states(state)
  is_decay = isinstance(ours, llr_optax.AddDecayedWeightsByAlphaHillState)
  field = ours.decays if is_decay else ours.scales
  return type(field)(np.asarray(field.values), field.layout).tree()


def apply_updates(params, updates):
  """`optax.apply_updates` on the host (eager jnp would compile an add per leaf shape)."""
  return jax.tree.map(lambda p, u: (np.asarray(p) + np.asarray(u)).astype(p.dtype), params, updates)


def assert_trees_close(got, want, rtol=1e-5, atol=1e-7, what=""):
  assert jax.tree.structure(got) == jax.tree.structure(want), what
  flat = jax.tree_util.tree_flatten_with_path(got)[0]
  paths = [llr_optax._labels.path_to_str(p) for p, _ in flat]
  for path, a, b in zip(paths, jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol,
                               err_msg=f"{what} {path}")


# --- (a) map_params, (f) avals stable, (g) eval_shape -------------------------------------------

class Tag:
  """What map_params made of a state leaf: "param" (with its shape) or "non"."""

  def __init__(self, kind, shape):
    self.kind, self.shape = kind, tuple(shape)


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("method", list(METHODS))
def test_map_params_maps_only_param_shaped_leaves(base, method):
  tx = chain(base, method)
  state = tx.init(PARAMS)
  mapped = optax.tree.map_params(tx, lambda v: Tag("param", v.shape), state,
                                 transform_non_params=lambda v: Tag("non", np.shape(v)))
  tags = jax.tree.leaves(mapped, is_leaf=lambda x: isinstance(x, Tag))
  assert all(isinstance(t, Tag) for t in tags)
  params_tags = [t for t in tags if t.kind == "param"]
  # The base optimizer's moments are params (so the check can tell them apart) ...
  assert len(params_tags) >= len(jax.tree.leaves(PARAMS)) - 1
  # ... and everything tagged as a param has a param's shape (a (2, 1, 1) or () per-matrix
  # array would get the params' sharding and fail to device_put).
  assert {t.shape for t in params_tags} <= PARAM_SHAPES, [t.shape for t in params_tags]
  (ours,) = our_states(mapped)
  assert all(t.kind == "non" for t in jax.tree.leaves(ours, is_leaf=lambda x: isinstance(x, Tag)))
  # The mapped state keeps the state's structure (needed to device_put with it).
  zeros = jax.tree.map(lambda t: 0, mapped, is_leaf=lambda x: isinstance(x, Tag))
  assert jax.tree.structure(zeros) == jax.tree.structure(state)


def avals(tree):
  """(structure, [(shape, dtype, weak_type)] per leaf): what decides whether jit recompiles."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, [(tuple(x.shape), jnp.dtype(x.dtype), bool(jax.typeof(x).weak_type)
                    if isinstance(x, jax.Array) else bool(x.weak_type)) for x in leaves]


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("method", list(METHODS))
def test_state_avals_stable_and_init_on_abstract_params(base, method):
  tx = chain(base, method)
  state = tx.init(PARAMS)
  # (f) update's output state has exactly init's avals (weak types included): a jitted step
  # fed its own output does not recompile.
  _, new_state = jax.eval_shape(tx.update, grads_at(0), state, PARAMS)
  assert avals(new_state) == avals(state)
  # (g) init on abstract params gives the same avals.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
  assert avals(jax.eval_shape(tx.init, abstract)) == avals(state)


# --- (b) masked / partition with tree-valued arguments -----------------------------------------

# A mixed-depth mask: `layers_1` is masked as a whole (a prefix: one MaskedNode for the subtree),
# `layers_0/down_proj` and the norm leaf by leaf.
MASK = {"embed_tokens": True, "layers_0": {"q_proj": True, "up_proj": True, "down_proj": False,
                                           "input_norm": False},
        "layers_1": False, "lm_head": True}


def select(tree, mask, keep=True):
  """The sub-tree of `tree` where the (prefix) `mask` is `keep`."""
  if isinstance(mask, dict):
    out = {k: select(tree[k], m, keep) for k, m in mask.items()}
    return {k: v for k, v in out.items() if v is not None and not (isinstance(v, dict) and not v)}
  return tree if mask == keep else None


def tree_args(method, mask=None, keep=True):
  trees = {"alpha_hill": dict(labels=LABELS, matrix_axes=AXES), "relative": dict(labels=LABELS),
           "init_grad": dict(scales=SCALES), "alpha_decay": dict(labels=LABELS, matrix_axes=AXES)}
  kw = trees[method]
  return kw if mask is None else {k: select(v, mask, keep) for k, v in kw.items()}


def partition_labels(params):
  # A callable label fn, as optax users write: evaluated on the (full) params / updates.
  return jax.tree.map(lambda m, sub: jax.tree.map(lambda _: "ours" if m else "adam", sub),
                      MASK, params)


@pytest.mark.parametrize("method", list(METHODS))
def test_masked_and_partition_with_tree_arguments(method):
  base = BASES["adamw"]
  masked = optax.chain(base(), optax.masked(METHODS[method](**tree_args(method)), MASK))
  part = optax.partition({"ours": optax.chain(base(), METHODS[method](**tree_args(method))),
                          "adam": base()}, partition_labels)
  # Reference: the transformation on the selected leaves alone (its own restricted trees).
  on_selected = optax.chain(base(), METHODS[method](**tree_args(method, MASK)))
  sub = lambda tree, keep=True: select(tree, MASK, keep)

  @jax.jit
  def step(grads, states, params):
    s_masked, s_part, s_ref, s_rest = states
    u_masked, s_masked = masked.update(grads, s_masked, params)
    u_part, s_part = part.update(grads, s_part, params)
    u_ref, s_ref = on_selected.update(sub(grads), s_ref, sub(params))
    u_rest, s_rest = base().update(sub(grads, False), s_rest, sub(params, False))
    return (u_masked, u_part, u_ref, u_rest), (s_masked, s_part, s_ref, s_rest)

  params = PARAMS
  states = (masked.init(params), part.init(params), on_selected.init(sub(params)),
            base().init(sub(params, False)))
  for t in range(3):  # recomputes at 0 and 2; the params move in between
    g = grads_at(t, params)
    (u_masked, u_part, u_ref, u_rest), states = step(g, states, params)
    assert_trees_close(sub(u_masked), u_ref, what=f"masked step {t}")
    assert_trees_close(sub(u_part), u_ref, what=f"partition step {t}")
    assert_trees_close(sub(u_part, False), u_rest, what=f"partition other branch step {t}")
    # masked: the other leaves pass through untouched (they are the base's updates there).
    assert_trees_close(sub(u_masked, False), u_rest, rtol=1e-6, what=f"pass-through {t}")
    params = apply_updates(params, u_masked)
  # Reported values: the masked state reads back on the selected leaves only.
  got = applied(states[0])
  for path in (("layers_0", "q_proj"), ("lm_head",)):
    a, b = got, applied(states[2])
    for k in path:
      a, b = a[k], b[k]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  assert isinstance(got["layers_1"], optax.MaskedNode)
  # The selected leaves get different values, so equal updates above are not a coincidence.
  values = np.concatenate([np.ravel(x) for x in jax.tree.leaves(got)])
  assert np.ptp(values) > 0.1, values


def test_init_grad_only_on_the_muon_branch_of_a_partition():
  # The example: the init-gradient factors (given for the FULL params) chained after
  # Muon on the hidden matrices; AdamW on embedding, head and norms.
  hidden = lambda params: jax.tree.map(
      lambda d: "muon" if d is not None else "adam",
      llr_optax.muon_dimension_numbers(params), is_leaf=lambda x: x is None or
      isinstance(x, llr_optax.MatrixAxes))
  muon = lambda: optax.contrib.muon(
      0.05, muon_weight_dimension_numbers=llr_optax.muon_dimension_numbers)
  adam = lambda: optax.adamw(0.01)
  tx = optax.partition({"muon": optax.chain(muon(), llr_optax.scale_by_init_grad(SCALES)),
                        "adam": adam()}, hidden)
  labels = hidden(PARAMS)
  mask = jax.tree.map(lambda l: l == "muon", labels)
  sub = lambda tree, keep=True: select(tree, mask, keep)
  assert len(jax.tree.leaves(sub(PARAMS))) == 5   # q/up/down of layers_0, q/up of layers_1
  ref_muon, ref_adam = muon(), adam()

  @jax.jit
  def step(g, states, params):
    s, s_m, s_a = states
    u, s = tx.update(g, s, params)
    u_m, s_m = ref_muon.update(sub(g), s_m, sub(params))
    u_a, s_a = ref_adam.update(sub(g, False), s_a, sub(params, False))
    return (u, u_m, u_a), (s, s_m, s_a)

  states = (tx.init(PARAMS), ref_muon.init(sub(PARAMS)), ref_adam.init(sub(PARAMS, False)))
  for t in range(2):
    (u, u_m, u_a), states = step(grads_at(t), states, PARAMS)
    # Muon branch: muon's update times the factor of the leaf, from the full-params SCALES tree.
    want = jax.tree.map(lambda x, s: x * s, u_m, sub(SCALES))
    assert_trees_close(sub(u), want, rtol=1e-6, what=f"muon branch step {t}")
    assert_trees_close(sub(u, False), u_a, rtol=1e-6, what=f"adam branch step {t}")
  scales = llr_optax.current_scales(states[0])
  assert np.asarray(scales["layers_1"]["up_proj"]).item() == 4.0
  assert isinstance(scales["embed_tokens"], optax.MaskedNode)
