"""Benchmark models for the overhead benchmark (``benchmarks/overhead/``), in plain JAX.

Three workloads, each on synthetic batches:

* ``mlp``: a dense ReLU network (784-1024-1024-10 by default), full training;
* ``transformer``: a pre-LayerNorm encoder with mean pooling, full training;
* ``lora``: a frozen ReLU network with rank-``r`` adapters and a trainable
  head, so the backward pass costs about one forward (no weight gradients of
  the frozen layers).

A model is a :class:`Model`: its trainable parameters, its frozen ones (an
argument of the loss, so that nothing is baked into the compiled step as a
constant), a batch factory and the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import hidlr_optax

Batch = tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class Model:
  """A benchmark workload.

  Attributes:
    name: short name used in the tables.
    params: trainable parameters.
    frozen: frozen parameters (``{}`` for full training).
    loss: ``loss(params, frozen, batch) -> scalar``.
    make_batch: ``make_batch(key) -> batch``.
    units: top-level keys of ``params``, ordered from input to output; groups
      are contiguous blocks of units.
    description: one line for the results file.
  """

  name: str
  params: Any
  frozen: Any
  loss: Callable[[Any, Any, Batch], jax.Array]
  make_batch: Callable[[jax.Array], Batch]
  units: tuple[str, ...]
  description: str

  @property
  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.params))


def _dense(key: jax.Array, n_in: int, n_out: int) -> dict:
  return {
      "w": jax.random.normal(key, (n_in, n_out)) / jnp.sqrt(n_in),
      "b": jnp.zeros((n_out,)),
  }


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _image_batch(batch: int, dim: int, classes: int) -> Callable[[jax.Array], Batch]:
  def make(key):
    kx, ky = jax.random.split(key)
    return (
        jax.random.normal(kx, (batch, dim)),
        jax.random.randint(ky, (batch,), 0, classes),
    )

  return make


def mlp(widths: Sequence[int] = (784, 1024, 1024, 10), batch: int = 512) -> Model:
  """A ReLU MLP classifier; the last layer is ``head``."""
  keys = jax.random.split(jax.random.key(0), len(widths) - 1)
  units = tuple(f"dense{i}" for i in range(len(widths) - 2)) + ("head",)
  params = {
      u: _dense(k, n_in, n_out)
      for u, k, n_in, n_out in zip(units, keys, widths[:-1], widths[1:])
  }

  def loss(params, frozen, batch):
    del frozen
    x, y = batch
    for u in units[:-1]:
      x = jax.nn.relu(x @ params[u]["w"] + params[u]["b"])
    return _cross_entropy(x @ params["head"]["w"] + params["head"]["b"], y)

  return Model(
      "mlp", params, {}, loss, _image_batch(batch, widths[0], widths[-1]), units,
      f"MLP {'-'.join(map(str, widths))}, ReLU, batch {batch}",
  )


def _layer_norm(x: jax.Array, p: dict) -> jax.Array:
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-6) * p["scale"] + p["bias"]


def _block(x: jax.Array, p: dict, heads: int) -> jax.Array:
  b, s, d = x.shape
  h = _layer_norm(x, p["ln1"])
  qkv = (h @ p["qkv"]["w"] + p["qkv"]["b"]).reshape(b, s, 3, heads, d // heads)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  att = jax.nn.softmax(jnp.einsum("bqhc,bkhc->bhqk", q, k) / jnp.sqrt(d // heads), -1)
  mixed = jnp.einsum("bhqk,bkhc->bqhc", att, v).reshape(b, s, d)
  x = x + mixed @ p["out"]["w"] + p["out"]["b"]
  h = _layer_norm(x, p["ln2"])
  h = jax.nn.gelu(h @ p["ff1"]["w"] + p["ff1"]["b"])
  return x + h @ p["ff2"]["w"] + p["ff2"]["b"]


def transformer(
    vocab: int = 1024, width: int = 256, heads: int = 4, depth: int = 6,
    ff: int = 1024, seq: int = 32, batch: int = 4, classes: int = 10,
) -> Model:
  """A pre-LayerNorm transformer encoder classifier (mean pooling)."""
  keys = iter(jax.random.split(jax.random.key(1), 6 * depth + 3))
  norm = lambda: {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))}
  params = {
      "embed": {
          "tokens": jax.random.normal(next(keys), (vocab, width)) * 0.02,
          "position": jax.random.normal(next(keys), (seq, width)) * 0.02,
      },
      "head": _dense(next(keys), width, classes),
  }
  blocks = tuple(f"block{i:02d}" for i in range(depth))
  for name in blocks:
    params[name] = {
        "ln1": norm(), "ln2": norm(),
        "qkv": _dense(next(keys), width, 3 * width),
        "out": _dense(next(keys), width, width),
        "ff1": _dense(next(keys), width, ff),
        "ff2": _dense(next(keys), ff, width),
    }
  params["head"]["ln"] = norm()

  def loss(params, frozen, batch):
    del frozen
    tokens, y = batch
    x = params["embed"]["tokens"][tokens] + params["embed"]["position"]
    for name in blocks:
      x = _block(x, params[name], heads)
    x = _layer_norm(x, params["head"]["ln"]).mean(1)
    return _cross_entropy(x @ params["head"]["w"] + params["head"]["b"], y)

  def make_batch(key):
    kx, ky = jax.random.split(key)
    return (
        jax.random.randint(kx, (batch, seq), 0, vocab),
        jax.random.randint(ky, (batch,), 0, classes),
    )

  return Model(
      "transformer", params, {}, loss, make_batch, ("embed",) + blocks + ("head",),
      f"transformer encoder: vocab {vocab}, width {width}, {heads} heads, depth"
      f" {depth}, MLP {ff}, sequence {seq}, batch {batch}",
  )


def lora(
    widths: Sequence[int] = (784, 1024, 1024, 1024, 10), rank: int = 8, batch: int = 512,
) -> Model:
  """A frozen ReLU MLP with LoRA adapters ``x @ (W + A B)`` and a trainable head."""
  n = len(widths) - 2
  keys = iter(jax.random.split(jax.random.key(2), 3 * n + 1))
  units = tuple(f"layer{i}" for i in range(n)) + ("head",)
  frozen, params = {}, {}
  for u, n_in, n_out in zip(units[:-1], widths[:-2], widths[1:-1]):
    frozen[u] = _dense(next(keys), n_in, n_out)
    params[u] = {
        "a": jax.random.normal(next(keys), (n_in, rank)) / jnp.sqrt(n_in),
        "b": jax.random.normal(next(keys), (rank, n_out)) * 0.01,
    }
  params["head"] = _dense(next(keys), widths[-2], widths[-1])

  def loss(params, frozen, batch):
    x, y = batch
    for u in units[:-1]:
      w, ad = frozen[u], params[u]
      x = jax.nn.relu(x @ w["w"] + (x @ ad["a"]) @ ad["b"] + w["b"])
    return _cross_entropy(x @ params["head"]["w"] + params["head"]["b"], y)

  return Model(
      "lora", params, frozen, loss, _image_batch(batch, widths[0], widths[-1]), units,
      f"LoRA rank {rank} on a frozen MLP {'-'.join(map(str, widths))}, trainable"
      f" head, batch {batch}",
  )


def group_labels(model: Model, num_groups: int, grouping: str = "layers") -> Any:
  """Labels the trainable parameters with ``num_groups`` groups.

  Args:
    model: the workload.
    num_groups: ``K``.
    grouping: ``"layers"``: contiguous blocks of units (input to output),
      falling back to ``"interleaved"`` when ``K`` exceeds the number of
      units; ``"interleaved"``: the last axis of every leaf dealt round-robin
      over the ``K`` groups (:func:`hidlr_optax.per_slice`), so every group
      touches every leaf (like a biases-versus-weights split, the worst case
      for probes that move one group).

  Returns:
    ``None`` for one group, else a label pytree for ``param_labels``.
  """
  if num_groups == 1:
    return None
  if grouping == "layers" and num_groups <= len(model.units):
    return {
        u: f"g{i * num_groups // len(model.units)}" for i, u in enumerate(model.units)
    }
  cycle = lambda x: hidlr_optax.per_slice(
      -1, [f"g{i % num_groups}" for i in range(x.shape[-1])]
  )
  return jax.tree.map(cycle, model.params)


def build(name: str, quick: bool) -> Model:
  """The named workload at full size, or tiny for ``quick`` runs."""
  if name == "mlp":
    return mlp((784, 64, 64, 10), 32) if quick else mlp()
  if name == "transformer":
    return (
        transformer(vocab=64, width=32, heads=2, depth=2, ff=64, seq=8, batch=2)
        if quick else transformer()
    )
  if name == "lora":
    return lora((784, 64, 64, 64, 10), 8, 32) if quick else lora()
  raise ValueError(f"unknown model {name!r}")
