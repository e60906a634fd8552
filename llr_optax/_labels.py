"""Module-type labels for parameter leaves, from their key paths.

Every layer-wise method needs to know what a leaf *is* (embedding, query projection, MLP
down-projection, norm scale, ...). We read that off the leaf's key path with an ordered list of
regular expressions: the first rule whose pattern is found in the lower-cased, "/"-joined path
wins. The default rules cover the common Flax, Hugging Face, MaxText, Meta-LLaMa and GPT-2
spellings; users can pass their own rules or a ready label tree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

# Every label the default rules can produce. Custom rules may produce any other string.
LABELS = (
    "embed", "pos_embed", "head",
    "attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv",
    "mlp_gate", "mlp_up", "mlp_down",
    "router", "expert",
    "norm", "bias", "other",
)

# Coarse module types used by the papers' tables (RLRS multipliers are per group). A key of a
# `relative_schedule` multiplier table may be a group name or a single label.
LABEL_GROUPS: Mapping[str, tuple[str, ...]] = {
    "attn": ("attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv"),
    "mlp": ("mlp_gate", "mlp_up", "mlp_down"),
}

# Path fragments that mean "inside a feed-forward block"; they disambiguate names such as `wo`
# (MaxText uses it for both attention output and MLP down-projection) and `c_proj` (GPT-2).
_FFN = r"(mlp|feed_?forward|ffn|ff)"
_SEP = r"(^|/)"
_END = r"(/|$)"

# Ordered: bias and norm first (a norm inside an attention block is still a norm), experts and
# router before the generic MLP names (an expert's `w1` is an expert), MLP before attention
# (`mlp/wo` is a down-projection), head before embed (`unembed` contains `embed`), position
# embeddings before embed (`wpe/embedding` contains `embed`). Position embeddings are their own
# type: the init-grad paper initialises them like biases (0), not like token embeddings.
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (rf"{_SEP}(bias|b)$", "bias"),
    (r"norm|rms|layer_?norm|" + rf"{_SEP}ln(_\w*)?{_END}", "norm"),
    (r"router|" + rf"(moe|block_sparse_moe)/(gate|wg){_END}", "router"),
    (rf"{_SEP}experts?{_END}|{_SEP}experts?_|moe_?(mlp|ffn)", "expert"),
    (r"lm_head|unembed|logits_dense|" + rf"{_SEP}(output|head){_END}", "head"),
    (rf"{_SEP}(wpe|pos(ition(al)?)?_?emb\w*){_END}", "pos_embed"),
    (rf"embed|{_SEP}(wte|tok_embeddings|word_embeddings){_END}", "embed"),
    (rf"gate_proj|{_SEP}(w1|wi_0|w_gate){_END}|{_FFN}/gate{_END}", "mlp_gate"),
    (rf"up_proj|{_SEP}(w3|wi_1|wi|c_fc|fc1|w_up){_END}|{_FFN}/(up|fc_in){_END}", "mlp_up"),
    (rf"down_proj|{_SEP}(w2|fc2|w_down){_END}|{_FFN}/(wo|out|c_proj|down|fc_out|dense){_END}",
     "mlp_down"),
    (rf"qkv|c_attn|{_SEP}(wqkv|query_key_value){_END}", "attn_qkv"),
    (rf"q_proj|{_SEP}(wq|query|q){_END}", "attn_q"),
    (rf"k_proj|{_SEP}(wk|key|k){_END}", "attn_k"),
    (rf"v_proj|{_SEP}(wv|value|v){_END}", "attn_v"),
    (rf"o_proj|out_proj|{_SEP}(wo|out|o|c_proj|dense){_END}", "attn_o"),
)

Rules = Sequence[tuple[str, str]]
LabelsOrFn = Any  # a pytree of strings with the params' structure, or params -> such a tree


def path_to_str(path: Sequence[Any]) -> str:
  """Joins a JAX key path into a lower-case "a/b/0/c" string.

  Attribute keys named `value`/`raw_value` are dropped: they are the inside of a Flax NNX
  `Variable` (`.../q_proj/kernel/.value`), not part of the parameter's name.
  """
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.GetAttrKey) and key.name in ("value", "raw_value"):
      continue
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts).lower()


def label_path(path: str, rules: Rules | None = None) -> str:
  """Returns the label of one "/"-joined key path (first matching rule, else "other")."""
  for pattern, label in DEFAULT_RULES if rules is None else rules:
    if re.search(pattern, path.lower()):
      return label
  return "other"


def label_params(params: Any, rules: Rules | None = None) -> Any:
  """Labels every leaf of a parameter pytree with its module type.

  Args:
    params: A pytree of arrays (e.g. `nnx.state(model, nnx.Param)` or a Flax linen params dict).
    rules: Ordered `(regex, label)` pairs tried against the lower-cased "/"-joined key path; the
      first pattern found (`re.search`) decides. Defaults to `DEFAULT_RULES`. Leaves that match no
      rule are labelled "other".

  Returns:
    A pytree with the structure of `params` whose leaves are label strings.

  Example:
    >>> import jax.numpy as jnp
    >>> import llr_optax
    >>> params = {"embed_tokens": jnp.zeros((10, 4)), "layer0": {"q_proj": jnp.zeros((4, 4))}}
    >>> llr_optax.label_params(params)
    {'embed_tokens': 'embed', 'layer0': {'q_proj': 'attn_q'}}
  """
  if rules is not None:
    for rule in rules:
      if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
        raise ValueError(f"rules must be (regex, label) pairs, got {rule!r}")
      re.compile(rule[0])
  return jax.tree_util.tree_map_with_path(
      lambda path, _: label_path(path_to_str(path), rules), params)


def is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def align_to(tree: Any, like: Any, what: str, is_leaf=None) -> Any:
  """`tree`, given for the params, laid out exactly like `like` (the params as a transformation
  sees them), matching leaves by key path.

  Two differences are bridged: inside `optax.masked`/`partition`/`multi_transform` the params
  hold `MaskedNode`s in place of masked-out leaves or subtrees, and a user's tree (labels, matrix
  axes, scales) lacks them; and NNX params wrap each array in an `nnx.Variable` node that a
  user's plain-dict tree does not have (`path_to_str` drops the `.value` key).

  Raises:
    ValueError: a params leaf has no entry in `tree`, or `tree` has entries that are no params
      leaf (the message names `what` and the path).
  """
  if jax.tree.structure(tree, is_leaf=is_leaf) == jax.tree.structure(like):
    return tree
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  given = {path_to_str(p): v for p, v in flat}
  if len(given) != len(flat):
    raise ValueError(f"{what}: two entries have the same key path up to case; give a tree with "
                     "the params' exact structure")
  out, used, masked = [], set(), []
  for p, v in jax.tree_util.tree_flatten_with_path(like, is_leaf=is_masked)[0]:
    key = path_to_str(p)
    if is_masked(v):
      masked.append(key)
    elif key in given:
      out.append(given[key])
      used.add(key)
    else:
      raise ValueError(f"{what} must have the params' tree structure: it has no entry for the "
                       f"params leaf {key!r}")
  extra = [k for k in given if k not in used
           and not any(k == m or k.startswith(m + "/") or not m for m in masked)]
  if extra:
    raise ValueError(f"{what} must have the params' tree structure: {extra[:3]} are not params "
                     "leaves")
  return jax.tree.unflatten(jax.tree.structure(like), out)


def resolve_labels(labels: LabelsOrFn | None, params: Any) -> Any:
  """Turns the `labels` argument of a transformation into a label tree matching `params`
  (see `align_to`: `MaskedNode`s and NNX variables are bridged)."""
  if labels is None:
    return label_params(params)
  tree = labels(params) if callable(labels) else labels
  return align_to(tree, params, "labels")


def expand_label_keys(keys: Sequence[str], what: str,
                      extra_labels: Sequence[str] = ()) -> dict[str, str]:
  """Maps every label covered by `keys` (labels or group names) to the key that covers it.

  A single label wins over a group that contains it, so `{"attn": ..., "attn_q": ...}` gives
  queries their own value. Keys that are neither a default label, a group, nor one of
  `extra_labels` (labels a user's own label tree uses) raise a `ValueError` naming `what`.
  """
  singles = set(LABELS) | set(extra_labels)
  unknown = [k for k in keys if k not in singles and k not in LABEL_GROUPS]
  if unknown:
    raise ValueError(
        f"{what} has unknown label(s) {unknown}; known labels are {sorted(singles)} and groups "
        f"{sorted(LABEL_GROUPS)}.")
  out: dict[str, str] = {}
  for key in keys:
    for label in LABEL_GROUPS.get(key, ()):
      out.setdefault(label, key)
  for key in keys:
    if key in singles:
      out[key] = key
  return out


def labels_in(labels: LabelsOrFn | None) -> tuple[str, ...]:
  """The distinct labels of a concrete label tree (empty for None or a callable)."""
  if labels is None or callable(labels):
    return ()
  return tuple(sorted({l for l in jax.tree.leaves(labels) if isinstance(l, str)}))
