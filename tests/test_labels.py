"""label_params: default rules on the common naming schemes, custom rules, label trees."""

import jax.numpy as jnp
import pytest

import llr_optax
from llr_optax import _labels

# (path, expected label) for the naming schemes our users train with.
CASES = [
    # Our NNX LLaMa / Hugging Face LLaMa
    ("model/embed_tokens/embedding", "embed"),
    ("model/layers/0/self_attn/q_proj/kernel", "attn_q"),
    ("model/layers/0/self_attn/k_proj/kernel", "attn_k"),
    ("model/layers/0/self_attn/v_proj/kernel", "attn_v"),
    ("model/layers/0/self_attn/o_proj/kernel", "attn_o"),
    ("model/layers/0/mlp/gate_proj/kernel", "mlp_gate"),
    ("model/layers/0/mlp/up_proj/kernel", "mlp_up"),
    ("model/layers/0/mlp/down_proj/kernel", "mlp_down"),
    ("model/layers/0/input_layernorm/scale", "norm"),
    ("model/layers/0/post_attention_layernorm/scale", "norm"),
    ("model/norm/scale", "norm"),
    ("lm_head/kernel", "head"),
    # Meta LLaMa
    ("tok_embeddings/weight", "embed"),
    ("layers/3/attention/wq/weight", "attn_q"),
    ("layers/3/attention/wk/weight", "attn_k"),
    ("layers/3/attention/wv/weight", "attn_v"),
    ("layers/3/attention/wo/weight", "attn_o"),
    ("layers/3/feed_forward/w1/weight", "mlp_gate"),
    ("layers/3/feed_forward/w2/weight", "mlp_down"),
    ("layers/3/feed_forward/w3/weight", "mlp_up"),
    ("layers/3/attention_norm/weight", "norm"),
    ("output/weight", "head"),
    # MaxText (scanned layers)
    ("params/token_embedder/embedding", "embed"),
    ("params/decoder/layers/self_attention/query/kernel", "attn_q"),
    ("params/decoder/layers/self_attention/key/kernel", "attn_k"),
    ("params/decoder/layers/self_attention/value/kernel", "attn_v"),
    ("params/decoder/layers/self_attention/out/kernel", "attn_o"),
    ("params/decoder/layers/mlp/wi_0/kernel", "mlp_gate"),
    ("params/decoder/layers/mlp/wi_1/kernel", "mlp_up"),
    ("params/decoder/layers/mlp/wo/kernel", "mlp_down"),
    ("params/decoder/logits_dense/kernel", "head"),
    ("params/decoder/decoder_norm/scale", "norm"),
    # GPT-2 (HF)
    ("transformer/wte/weight", "embed"),
    ("transformer/wpe/weight", "pos_embed"),
    ("transformer/h/0/attn/c_attn/weight", "attn_qkv"),
    ("transformer/h/0/attn/c_proj/weight", "attn_o"),
    ("transformer/h/0/attn/c_proj/bias", "bias"),
    ("transformer/h/0/mlp/c_fc/weight", "mlp_up"),
    ("transformer/h/0/mlp/c_proj/weight", "mlp_down"),
    ("transformer/h/0/ln_1/weight", "norm"),
    ("transformer/ln_f/bias", "bias"),
    # Our NNX GPT-2 (models/gpt2.py) and other position-embedding spellings
    ("wte/embedding", "embed"),
    ("wpe/embedding", "pos_embed"),
    ("h/0/attn/c_attn/kernel", "attn_qkv"),
    ("h/0/attn/c_attn/bias", "bias"),
    ("h/0/mlp/c_proj/kernel", "mlp_down"),
    ("bert/embeddings/position_embeddings/weight", "pos_embed"),
    ("bert/embeddings/word_embeddings/weight", "embed"),
    ("vit/pos_embed", "pos_embed"),
    ("transformer/posembed_input/pos_embedding", "pos_embed"),
    ("decoder/positional_embedding", "pos_embed"),
    # Gemma-style, and MoE (Mixtral / MaxText)
    ("embedder/input_embedding", "embed"),
    ("transformer/unembed/kernel", "head"),
    ("model/layers/1/block_sparse_moe/gate/weight", "router"),
    ("model/layers/1/block_sparse_moe/experts/3/w1/weight", "expert"),
    ("decoder/layers/moe/router/kernel", "router"),
    ("decoder/layers/moe/experts/wi_0", "expert"),
    # Our NNX MoE LLaMa (models/moe.py)
    ("model/layers/0/moe/router/kernel", "router"),
    ("model/layers/0/moe/experts/gate_proj", "expert"),
    ("model/layers/0/moe/experts/down_proj", "expert"),
    ("something/else", "other"),
]


@pytest.mark.parametrize("path,label", CASES)
def test_default_rules(path, label):
  assert _labels.label_path(path) == label


def test_label_params_on_a_pytree_with_lists_and_dicts():
  params = {"model": {"embed_tokens": {"embedding": jnp.zeros((10, 4))},
                      "layers": [{"self_attn": {"q_proj": {"kernel": jnp.zeros((4, 4))}},
                                  "mlp": {"down_proj": {"kernel": jnp.zeros((8, 4))}}}]},
            "lm_head": {"kernel": jnp.zeros((4, 10))}}
  assert llr_optax.label_params(params) == {
      "model": {"embed_tokens": {"embedding": "embed"},
                "layers": [{"self_attn": {"q_proj": {"kernel": "attn_q"}},
                            "mlp": {"down_proj": {"kernel": "mlp_down"}}}]},
      "lm_head": {"kernel": "head"}}


def test_labels_of_our_model_cover_every_leaf():
  from flax import nnx
  from models import LLaMa, llama_config
  model = LLaMa(llama_config("tiny", vocab_size=64, max_seq_len=16, num_layers=1),
                rngs=nnx.Rngs(0))
  labels = llr_optax.label_params(nnx.state(model, nnx.Param))
  import jax
  counts = {}
  for l in jax.tree.leaves(labels):
    counts[l] = counts.get(l, 0) + 1
  assert counts == {"embed": 1, "head": 1, "attn_q": 1, "attn_k": 1, "attn_v": 1, "attn_o": 1,
                    "mlp_gate": 1, "mlp_up": 1, "mlp_down": 1, "norm": 3}


def test_custom_rules_are_ordered_and_fall_back_to_other():
  params = {"blockA": {"w": jnp.zeros(2)}, "blockB": {"w": jnp.zeros(2)}}
  rules = [(r"blocka", "attn_q"), (r"block", "mlp_up")]
  assert llr_optax.label_params(params, rules) == {"blockA": {"w": "attn_q"},
                                                   "blockB": {"w": "mlp_up"}}
  assert llr_optax.label_params(params, [(r"nomatch", "x")]) == {"blockA": {"w": "other"},
                                                                 "blockB": {"w": "other"}}
  with pytest.raises(ValueError, match="rules"):
    llr_optax.label_params(params, [("only-a-pattern",)])


def test_label_tree_with_wrong_structure_is_rejected():
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  with pytest.raises(ValueError, match="labels"):
    _labels.resolve_labels({"a": "embed"}, params)
