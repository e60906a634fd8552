"""Scanned / stacked layouts: `infer_matrix_axes`, warnings and `strict` for leaves that take no
part, `alpha_hill_plan_summary`, `muon_dimension_numbers` with `optax.contrib.muon`, and custom
labels in `fixed_scales` / `multipliers`.

Reference alphas: float64 SVD of matrices extracted explicitly with `np.transpose` / `reshape`,
and the float64 port of the authors' median-Hill fit (tests/_numpy_reference.py).
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llr_optax
from tests import _numpy_reference as ref

MA = llr_optax.MatrixAxes
D, L, HEADS, HEAD_DIM, F, V = 16, 2, 2, 8, 32, 24


def maxtext_params(seed=0):
  """MaxText's names and scanned shapes (`param_scan_axis: 1`): layers on axis 1."""
  rng = np.random.default_rng(seed)
  heavy = lambda *s, t=2.0: rng.standard_t(t, s) * 0.1
  gauss = lambda *s: rng.standard_normal(s) * 0.1
  p = {"decoder": {
      "layers": {
          "self_attention": {"query": {"kernel": heavy(D, L, HEADS, HEAD_DIM)},
                             "key": {"kernel": gauss(D, L, HEADS, HEAD_DIM)},
                             "value": {"kernel": heavy(D, L, HEADS, HEAD_DIM, t=4.0)},
                             "out": {"kernel": gauss(HEADS, L, HEAD_DIM, D)}},
          "mlp": {"wi_0": {"kernel": heavy(D, L, F, t=3.0)}, "wi_1": {"kernel": gauss(D, L, F)},
                  "wo": {"kernel": heavy(F, L, D)}},
          "pre_self_attention_layer_norm": {"scale": 1 + gauss(D, L)},
          "post_self_attention_layer_norm": {"scale": 1 + gauss(D, L)}},
      "decoder_norm": {"scale": 1 + gauss(D)},
      "logits_dense": {"kernel": gauss(D, V)}},
      "token_embedder": {"embedding": gauss(V, D)}}
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)


MAXTEXT = maxtext_params()
HIDDEN = {"query", "key", "value", "out", "wi_0", "wi_1", "wo"}


def per_layer_matrices(name, w):
  """`[L, rows, cols]` of a MaxText kernel, extracted by hand (layers on axis 1)."""
  w = np.asarray(w, np.float64)
  if name in ("query", "key", "value"):   # [d, L, heads, head_dim] -> [L, d, heads * head_dim]
    return np.transpose(w, (1, 0, 2, 3)).reshape(L, D, HEADS * HEAD_DIM)
  if name == "out":                        # [heads, L, head_dim, d] -> [L, heads * head_dim, d]
    return np.transpose(w, (1, 0, 2, 3)).reshape(L, HEADS * HEAD_DIM, D)
  return np.transpose(w, (1, 0, 2))        # [in, L, out] -> [L, in, out]


def hidden_leaves(tree):
  """(name, leaf) of the seven hidden kernels of a MaxText-shaped tree."""
  layers = tree["decoder"]["layers"]
  out = [(k, layers["self_attention"][k]["kernel"]) for k in ("query", "key", "value", "out")]
  return out + [(k, layers["mlp"][k]["kernel"]) for k in ("wi_0", "wi_1", "wo")]


def test_infer_matrix_axes_on_maxtext_names():
  axes = llr_optax.infer_matrix_axes(MAXTEXT, layer_axis=1)
  layers = axes["decoder"]["layers"]
  for k in ("query", "key", "value"):
    assert layers["self_attention"][k]["kernel"] == MA(reduction_axis=(0,), output_axis=(2, 3))
  assert layers["self_attention"]["out"]["kernel"] == MA(reduction_axis=(0, 2), output_axis=(3,))
  for k in ("wi_0", "wi_1", "wo"):
    assert layers["mlp"][k]["kernel"] == MA(reduction_axis=(0,), output_axis=(2,))
  assert layers["pre_self_attention_layer_norm"]["scale"] is None
  assert axes["decoder"]["decoder_norm"]["scale"] is None
  # Embedding and head are never stacked: their two axes form the matrix.
  assert axes["token_embedder"]["embedding"] == MA(reduction_axis=(0,), output_axis=(1,))
  assert axes["decoder"]["logits_dense"]["kernel"] == MA(reduction_axis=(0,), output_axis=(1,))


def test_infer_matrix_axes_on_linen_scan_and_unscanned_kernels():
  z = jnp.zeros
  scanned = {"layers": {"attention": {"query": {"kernel": z((L, D, HEADS, HEAD_DIM))},
                                      "out": {"kernel": z((L, HEADS, HEAD_DIM, D))}},
                        "mlp": {"wi": {"kernel": z((L, D, F))}, "wo": {"kernel": z((L, F, D))}},
                        "norm": {"scale": z((L, D))}},
             "embed": {"embedding": z((V, D))}}
  axes = llr_optax.infer_matrix_axes(scanned, layer_axis=0)["layers"]
  assert axes["attention"]["query"]["kernel"] == MA(reduction_axis=(1,), output_axis=(2, 3))
  assert axes["attention"]["out"]["kernel"] == MA(reduction_axis=(1, 2), output_axis=(3,))
  assert axes["mlp"]["wi"]["kernel"] == MA(reduction_axis=(1,), output_axis=(2,))
  assert axes["mlp"]["wo"]["kernel"] == MA(reduction_axis=(1,), output_axis=(2,))
  assert axes["norm"]["scale"] is None
  # Unscanned DenseGeneral kernels [embed, heads, head_dim] / [heads, head_dim, embed]: one
  # embed x (heads * head_dim) matrix each; 2-D kernels [in, out]; experts one per expert.
  flat = {"attn": {"query": {"kernel": z((D, HEADS, HEAD_DIM))},
                   "out": {"kernel": z((HEADS, HEAD_DIM, D))}},
          "mlp": {"wi_0": {"kernel": z((D, F))}},
          "moe": {"experts": {"wi_0": z((4, D, F))}}}
  axes = llr_optax.infer_matrix_axes(flat, layer_axis=None)
  assert axes["attn"]["query"]["kernel"] == MA(reduction_axis=(0,), output_axis=(1, 2))
  assert axes["attn"]["out"]["kernel"] == MA(reduction_axis=(0, 1), output_axis=(2,))
  assert axes["mlp"]["wi_0"]["kernel"] == MA(reduction_axis=(0,), output_axis=(1,))
  assert axes["moe"]["experts"]["wi_0"] == MA(reduction_axis=(1,), output_axis=(2,))
  # The same axes, applied, give exactly the matrices extracted by hand.
  from llr_optax import _matrix_axes
  w = np.arange(L * HEADS * HEAD_DIM * D, dtype=np.float32).reshape(L, HEADS, HEAD_DIM, D)
  got = _matrix_axes.to_matrices(jnp.asarray(w), MA(reduction_axis=(1, 2), output_axis=(3,)))
  np.testing.assert_array_equal(np.asarray(got), w.reshape(L, HEADS * HEAD_DIM, D))


def test_alpha_hill_with_inferred_axes_fits_one_alpha_per_layer_and_matrix():
  s_min, s_max = 1.0, 3.0
  tx = llr_optax.scale_by_alpha_hill(
      s_min, s_max, total_steps=None,
      matrix_axes=functools.partial(llr_optax.infer_matrix_axes, layer_axis=1))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # with the right axes nothing is skipped: no warning
    state = tx.init(MAXTEXT)
    grads = jax.tree.map(jnp.ones_like, MAXTEXT)
    updates, state = jax.jit(tx.update)(grads, state, MAXTEXT)
  alphas, scales = llr_optax.last_alphas(state), llr_optax.current_scales(state)
  want = {name: np.array([ref.authors_alpha(ref.esd(m)) for m in per_layer_matrices(name, w)])
          for name, w in hidden_leaves(MAXTEXT)}
  lo = min(a.min() for a in want.values())
  hi = max(a.max() for a in want.values())
  assert hi - lo > 0.5, "the test needs alphas that differ"
  for (name, a), (_, s), (_, u) in zip(hidden_leaves(alphas), hidden_leaves(scales),
                                       hidden_leaves(updates)):
    # One alpha per layer: the layer axis (1) is kept, the matrix axes are 1.
    assert a.shape[1] == L and np.prod(a.shape) == L, (name, a.shape)
    # Tolerance: float32 Gram + eigensolver vs float64 SVD, ~1e-5 relative on these alphas.
    np.testing.assert_allclose(np.asarray(a).ravel(), want[name], rtol=1e-4, err_msg=name)
    mapped = s_min + (s_max - s_min) * (want[name] - lo) / (hi - lo)
    np.testing.assert_allclose(np.asarray(s).ravel(), mapped, atol=2e-4, err_msg=name)
    # Each layer's slice of the update is scaled by that layer's factor.
    u = np.moveaxis(np.asarray(u), 1, 0).reshape(L, -1)
    np.testing.assert_allclose(u, np.broadcast_to(np.asarray(s).ravel()[:, None], u.shape),
                               rtol=1e-6)
  assert np.asarray(scales["token_embedder"]["embedding"]).item() == s_max
  assert np.asarray(scales["decoder"]["logits_dense"]["kernel"]).item() == s_max
  assert float(scales["decoder"]["decoder_norm"]["scale"]) == 1.0


def test_default_axes_on_maxtext_warn_once_naming_the_skipped_leaves():
  tx = llr_optax.scale_by_alpha_hill(total_steps=None)
  with pytest.warns(UserWarning) as record:
    tx.init(MAXTEXT)
  assert len(record) == 1, [str(r.message) for r in record]   # one warning for all leaves
  message = str(record[0].message)
  skipped = [("self_attention/query", "32 matrices of 2x8"),
             ("self_attention/key", "32 matrices of 2x8"),
             ("self_attention/value", "32 matrices of 2x8"), ("mlp/wi_0", "16 matrices of 2x32"),
             ("mlp/wi_1", "16 matrices of 2x32"), ("mlp/wo", "32 matrices of 2x16")]
  for path, why in skipped:
    assert f"decoder/layers/{path}/kernel: shape" in message, (path, message)
    assert why in message, (why, message)
  assert message.count(": shape") == len(skipped)
  assert "min_eigenvalues=8" in message and "infer_matrix_axes" in message
  # Read as [heads, L] stacks of 8 x 16 matrices, `out` does take part (so it is not named), and
  # norms, embedding and head are not expected to.
  assert "out/kernel" not in message and "norm" not in message and "embed" not in message
  # Once: the same warning from the same place is shown once per session (Python's "default"
  # action), however often init runs or update is traced.
  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("default")
    for _ in range(3):
      tx.init(MAXTEXT)
  assert len(seen) == 1


def test_strict_raises_and_plan_summary_gives_role_and_reason():
  with pytest.raises(ValueError, match=r"6 leaves .*decoder/layers/mlp/wi_0/kernel"):
    llr_optax.scale_by_alpha_hill(total_steps=None, strict=True).init(MAXTEXT)
  with pytest.raises(ValueError, match="wi_0"):
    llr_optax.add_decayed_weights_by_alpha_hill(0.1, strict=True).init(MAXTEXT)
  # With the inferred axes strict is satisfied.
  infer = functools.partial(llr_optax.infer_matrix_axes, layer_axis=1)
  llr_optax.scale_by_alpha_hill(total_steps=None, strict=True, matrix_axes=infer).init(MAXTEXT)

  rows = {r["path"]: r for r in llr_optax.alpha_hill_plan_summary(MAXTEXT)}
  q = rows["decoder/layers/self_attention/query/kernel"]
  assert (q["label"], q["role"]) == ("attn_q", "one")
  assert q["reason"] == ("shape [16, 2, 2, 8] is read as 32 matrices of 2x8: 2 eigenvalues "
                         "< min_eigenvalues=8")
  norm = rows["decoder/layers/pre_self_attention_layer_norm/scale"]
  assert norm["role"] == "one" and norm["reason"] == "shape [16, 2] is not read as a matrix"
  assert rows["token_embedder/embedding"]["role"] == "fixed"
  assert rows["decoder/logits_dense/kernel"]["role"] == "fixed"
  assert rows["decoder/layers/self_attention/out/kernel"]["role"] == "alpha"
  assert rows["decoder/layers/self_attention/out/kernel"]["matrices"] == HEADS * L
  rows = {r["path"]: r for r in llr_optax.alpha_hill_plan_summary(MAXTEXT, matrix_axes=infer)}
  for path, row in rows.items():
    if path.split("/")[-2] in HIDDEN:
      assert (row["role"], row["matrices"], row["reason"]) == ("alpha", L, ""), path


def test_muon_dimension_numbers_route_hidden_matrices_to_muon():
  dims = llr_optax.muon_dimension_numbers(
      MAXTEXT, matrix_axes=functools.partial(llr_optax.infer_matrix_axes, layer_axis=1))
  want_axes = llr_optax.infer_matrix_axes(MAXTEXT, layer_axis=1)
  for (name, d), (_, a) in zip(hidden_leaves(dims), hidden_leaves(want_axes)):
    assert isinstance(d, optax.contrib.MuonDimensionNumbers) and d == a, name
    assert 1 not in d.reduction_axis + d.output_axis, name  # the layer axis is a batch axis
  assert dims["token_embedder"]["embedding"] is None
  assert dims["decoder"]["logits_dense"]["kernel"] is None
  assert dims["decoder"]["decoder_norm"]["scale"] is None
  assert dims["decoder"]["layers"]["pre_self_attention_layer_norm"]["scale"] is None
  # Default axes: stacked layers and experts keep their leading axes as batch axes.
  plain = {"embed_tokens": jnp.zeros((V, D)), "lm_head": jnp.zeros((D, V)),
           "layers": {"q_proj": jnp.zeros((L, D, D)), "input_norm": jnp.ones((L, D)),
                      "o_proj": {"bias": jnp.zeros((L, D))}},
           "moe": {"experts": {"w1": jnp.zeros((L, 4, D, F))}}}
  dims = llr_optax.muon_dimension_numbers(plain)
  assert dims == {"embed_tokens": None, "lm_head": None,
                  "layers": {"q_proj": MA(1, 2), "input_norm": None, "o_proj": {"bias": None}},
                  "moe": {"experts": {"w1": MA(2, 3)}}}


def test_muon_on_a_stacked_leaf_equals_muon_on_each_slice():
  rng = np.random.default_rng(5)
  stacked = {"embed_tokens": rng.standard_normal((V, D)),
             "layers": {"q_proj": rng.standard_normal((L, D, D)),
                        "up_proj": rng.standard_normal((L, D, F)),
                        "input_norm": 1 + rng.standard_normal((L, D)) * 0.1}}
  stacked = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), stacked)
  lay = stacked["layers"]
  split = {"embed_tokens": stacked["embed_tokens"],
           "layers": {"input_norm": lay["input_norm"],
                      **{f"q_proj_{i}": lay["q_proj"][i] for i in range(L)},
                      **{f"up_proj_{i}": lay["up_proj"][i] for i in range(L)}}}
  muon = optax.contrib.muon(0.02, adam_weight_decay=0.1,
                            muon_weight_dimension_numbers=llr_optax.muon_dimension_numbers)

  @jax.jit
  def step(g_stacked, g_split, s_stacked, s_split):
    u1, s_stacked = muon.update(g_stacked, s_stacked, stacked)
    u2, s_split = muon.update(g_split, s_split, split)
    return u1, u2, s_stacked, s_split

  s_stacked, s_split = muon.init(stacked), muon.init(split)
  for t in range(2):
    g = jax.tree.map(lambda x: jnp.asarray(
        np.random.default_rng(t).standard_normal(x.shape), jnp.float32), stacked)
    g_split = {"embed_tokens": g["embed_tokens"],
               "layers": {"input_norm": g["layers"]["input_norm"],
                          **{f"q_proj_{i}": g["layers"]["q_proj"][i] for i in range(L)},
                          **{f"up_proj_{i}": g["layers"]["up_proj"][i] for i in range(L)}}}
    u1, u2, s_stacked, s_split = step(g, g_split, s_stacked, s_split)
    for name in ("q_proj", "up_proj"):
      for i in range(L):
        np.testing.assert_allclose(np.asarray(u1["layers"][name][i]),
                                   np.asarray(u2["layers"][f"{name}_{i}"]), rtol=1e-5,
                                   atol=1e-7, err_msg=f"{name}[{i}] step {t}")
    np.testing.assert_allclose(np.asarray(u1["embed_tokens"]), np.asarray(u2["embed_tokens"]),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u1["layers"]["input_norm"]),
                               np.asarray(u2["layers"]["input_norm"]), rtol=1e-6)
  # Orthogonalised per slice: each [D, D] slice's update has all singular values equal (up to
  # Newton-Schulz's ~0.3 band); one orthogonalisation of the whole stack would not.
  sv = np.linalg.svd(np.asarray(u1["layers"]["q_proj"][0], np.float64), compute_uv=False)
  assert sv.min() / sv.max() > 0.5


# --- custom labels ------------------------------------------------------------------------------

def custom_labels(params):
  return llr_optax.label_params(params, rules=[(r"my_block", "my_label"),
                                               *llr_optax.DEFAULT_RULES])


def custom_params():
  rng = np.random.default_rng(9)
  p = {"embed_tokens": rng.standard_normal((V, D)),
       "my_block": {"kernel": rng.standard_normal((D, D))},
       "q_proj": rng.standard_t(2.0, (D, D)) * 0.1, "up_proj": rng.standard_normal((D, F)) * 0.1}
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)


def test_custom_labels_in_fixed_scales_and_multipliers():
  params = custom_params()
  assert custom_labels(params)["my_block"]["kernel"] == "my_label"
  alpha = llr_optax.scale_by_alpha_hill(1.0, 5.0, total_steps=None, labels=custom_labels,
                                        fixed_scales={"my_label": 2.0, "embed": 5.0},
                                        estimator="eigh")
  rel = llr_optax.relative_schedule({"my_label": (2.0, 1.0), "embed": (3.0, 1.0)}, 100, 0.1,
                                    labels=custom_labels)
  grads = jax.tree.map(jnp.ones_like, params)

  @jax.jit
  def step(s_alpha, s_rel):
    return alpha.update(grads, s_alpha, params), rel.update(grads, s_rel, params)

  (u_a, s_a), (u_r, s_r) = step(alpha.init(params), rel.init(params))
  a = llr_optax.current_scales(s_a)
  assert np.asarray(a["my_block"]["kernel"]).item() == 2.0    # pinned by its custom label
  assert np.isnan(np.asarray(llr_optax.last_alphas(s_a)["my_block"]["kernel"]).item())
  # The other two matrices alone span [s_min, s_max] (my_block left the fit).
  assert sorted([np.asarray(a["q_proj"]).item(), np.asarray(a["up_proj"]).item()]) == [1.0, 5.0]
  np.testing.assert_array_equal(np.asarray(u_a["my_block"]["kernel"]), 2.0)
  r = llr_optax.current_scales(s_r)
  # t = 0, no warmup: r_m = a_m.
  assert float(r["my_block"]["kernel"]) == pytest.approx(2.0)
  assert float(r["embed_tokens"]) == pytest.approx(3.0)
  assert float(r["q_proj"]) == 1.0
  np.testing.assert_allclose(np.asarray(u_r["my_block"]["kernel"]), 2.0, rtol=1e-6)


def test_unknown_label_keys_raise_at_init_or_eagerly():
  params = custom_params()
  # Callable labels: the keys are known only once the labels are (at init).
  alpha = llr_optax.scale_by_alpha_hill(labels=custom_labels, fixed_scales={"no_such": 2.0})
  with pytest.raises(ValueError, match=r"unknown label\(s\) \['no_such'\]"):
    alpha.init(params)
  rel = llr_optax.relative_schedule({"no_such": (2.0, 1.0)}, 100, 0.1, labels=custom_labels)
  with pytest.raises(ValueError, match=r"unknown label\(s\) \['no_such'\]"):
    rel.init(params)
  # Default labels: eagerly, when the transformation is built.
  with pytest.raises(ValueError, match="fixed_scales.*no_such"):
    llr_optax.scale_by_alpha_hill(fixed_scales={"no_such": 2.0})
  with pytest.raises(ValueError, match="multipliers.*no_such"):
    llr_optax.relative_schedule({"no_such": (2.0, 1.0)}, 100, 0.1)
  with pytest.raises(ValueError, match="fixed_decays.*no_such"):
    llr_optax.add_decayed_weights_by_alpha_hill(0.1, fixed_decays={"no_such": 0.2})
