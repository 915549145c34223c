"""``hidlr_optax.labels`` on real Flax parameter trees (Linen and NNX)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import hidlr_optax
from hidlr_optax import labels as L

# ----------------------------------------------------------------------------
# Models: the same architectures in Linen and NNX
# ----------------------------------------------------------------------------
# Net: embed -> 3 blocks (dense with a rank-2 LoRA adapter, layer norm) -> head.
# Widths: input 4, hidden 8, LoRA rank 2, output 3.
D_IN, D_H, RANK, D_OUT, N_BLOCKS = 4, 8, 2, 3, 3


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    a = self.param("lora_a", nn.initializers.normal(), (D_H, RANK))
    b = self.param("lora_b", nn.initializers.zeros, (RANK, D_H))
    h = nn.Dense(D_H, name="dense")(x) + x @ a @ b
    return nn.LayerNorm(name="norm")(nn.relu(h))


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D_H, name="embed")(x)
    for i in range(N_BLOCKS):
      x = LinenBlock(name=f"block_{i}")(x)
    return nn.Dense(D_OUT, name="head")(x)


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.LoRALinear(D_H, D_H, lora_rank=RANK, rngs=rngs)
    self.norm = nnx.LayerNorm(D_H, rngs=rngs)

  def __call__(self, x):
    return self.norm(nnx.relu(self.dense(x)))


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(D_IN, D_H, rngs=rngs)
    self.blocks = nnx.List([NNXBlock(rngs) for _ in range(N_BLOCKS)])
    self.head = nnx.Linear(D_H, D_OUT, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def linen_net():
  return LinenNet().init(jax.random.key(0), jnp.ones((1, D_IN)))["params"]


def nnx_net(pure: bool = True):
  state = nnx.state(NNXNet(nnx.Rngs(0)), nnx.Param)
  return nnx.as_pure(state) if pure else state


NETS = {
    "linen": linen_net,
    "nnx_pure": lambda: nnx_net(True),
    "nnx_variables": lambda: nnx_net(False),
}
# Paths of the two frameworks, written in a shared vocabulary.
PATHS = {
    "linen": dict(
        embed_kernel="embed/kernel", block1_bias="block_1/dense/bias",
        block2_kernel="block_2/dense/kernel", block0_lora_a="block_0/lora_a",
        block0_lora_b="block_0/lora_b", block1_norm_scale="block_1/norm/scale",
        block1_norm_bias="block_1/norm/bias", head_kernel="head/kernel", head_bias="head/bias",
    ),
    "nnx": dict(
        embed_kernel="embed/kernel", block1_bias="blocks/1/dense/bias",
        block2_kernel="blocks/2/dense/kernel", block0_lora_a="blocks/0/dense/lora/lora_a",
        block0_lora_b="blocks/0/dense/lora/lora_b", block1_norm_scale="blocks/1/norm/scale",
        block1_norm_bias="blocks/1/norm/bias", head_kernel="head/kernel", head_bias="head/bias",
    ),
}
# Parameter counts.
EMBED = D_IN * D_H + D_H
DENSE = D_H * D_H + D_H
LORA_A = LORA_B = D_H * RANK
NORM = 2 * D_H
HEAD = D_H * D_OUT + D_OUT
TOTAL = EMBED + N_BLOCKS * (DENSE + LORA_A + LORA_B + NORM) + HEAD
BIASES = D_H + N_BLOCKS * (D_H + D_H) + D_OUT  # dense biases and norm shifts


def labels_by_path(label_fn, params) -> dict[str, object]:
  """``{path string: label}`` of every leaf."""
  label_tree = label_fn(params)
  paths = [L.path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  leaves = jax.tree.leaves(label_tree, is_leaf=lambda x: isinstance(x, hidlr_optax.SliceLabels))
  assert len(paths) == len(leaves)
  return dict(zip(paths, leaves))


def check(label_fn, net: str, expected_at: dict[str, object], expected_sizes: dict):
  """Checks labels at named paths, group sizes, and that Hi-DLR takes them."""
  params = NETS[net]()
  paths = PATHS["linen" if net == "linen" else "nnx"]
  got = labels_by_path(label_fn, params)
  for name, label in expected_at.items():
    assert got[paths[name]] == label, (name, paths[name], got[paths[name]])
  assert L.group_sizes(label_fn, params) == expected_sizes
  assert sum(expected_sizes.values()) == TOTAL
  tx = hidlr_optax.hidlr(optax.scale_by_adam(), 1e-3, label_fn)
  assert list(hidlr_optax.learning_rates(tx.init(params))) == sorted(expected_sizes)


@pytest.mark.parametrize("net", list(NETS))
def test_bias_vs_weight(net):
  check(
      L.bias_vs_weight(), net,
      dict(block1_bias="bias", block1_norm_bias="bias", head_bias="bias",
           embed_kernel="weight", block0_lora_a="weight", block1_norm_scale="weight"),
      {"bias": BIASES, "weight": TOTAL - BIASES},
  )


@pytest.mark.parametrize("net", list(NETS))
def test_norm_vs_rest(net):
  check(
      L.norm_vs_rest(), net,
      dict(block1_norm_scale="norm", block1_norm_bias="norm", block1_bias="rest",
           head_kernel="rest"),
      {"norm": N_BLOCKS * NORM, "rest": TOTAL - N_BLOCKS * NORM},
  )


@pytest.mark.parametrize("net", list(NETS))
def test_head_vs_body(net):
  check(
      L.head_vs_body(), net,
      dict(head_kernel="head", head_bias="head", embed_kernel="body", block1_norm_scale="body"),
      {"head": HEAD, "body": TOTAL - HEAD},
  )


@pytest.mark.parametrize("net", list(NETS))
def test_by_depth(net):
  check(
      L.by_depth(), net,
      dict(block1_bias="layer_1", block2_kernel="layer_2", block0_lora_b="layer_0",
           block1_norm_scale="layer_1", embed_kernel="rest", head_bias="rest"),
      {**{f"layer_{i}": DENSE + LORA_A + LORA_B + NORM for i in range(N_BLOCKS)},
       "rest": EMBED + HEAD},
  )


@pytest.mark.parametrize("net", list(NETS))
def test_lora(net):
  check(
      L.lora(), net,
      dict(block0_lora_a="lora_a", block0_lora_b="lora_b", block2_kernel="rest",
           head_kernel="rest"),
      {"lora_a": N_BLOCKS * LORA_A, "lora_b": N_BLOCKS * LORA_B,
       "rest": TOTAL - N_BLOCKS * (LORA_A + LORA_B)},
  )


@pytest.mark.parametrize("net", list(NETS))
def test_by_submodule(net):
  blocks = "blocks" if net != "linen" else None
  sizes = {"embed": EMBED, "head": HEAD}
  block_size = DENSE + LORA_A + LORA_B + NORM
  if blocks:  # nnx.List: one group "blocks" at depth 1
    sizes["blocks"] = N_BLOCKS * block_size
    expected = dict(block1_bias="blocks", embed_kernel="embed")
  else:
    sizes.update({f"block_{i}": block_size for i in range(N_BLOCKS)})
    expected = dict(block1_bias="block_1", embed_kernel="embed")
  check(L.by_submodule(), net, expected, sizes)


@pytest.mark.parametrize("net", ["nnx_pure", "nnx_variables"])
def test_by_submodule_depth_two_splits_an_nnx_list(net):
  block_size = DENSE + LORA_A + LORA_B + NORM
  check(
      L.by_submodule(depth=2), net,
      dict(block1_bias="blocks/1", block0_lora_a="blocks/0", head_bias="head/bias"),
      {"embed/bias": D_H, "embed/kernel": D_IN * D_H, "head/bias": D_OUT,
       "head/kernel": D_H * D_OUT, **{f"blocks/{i}": block_size for i in range(N_BLOCKS)}},
  )


@pytest.mark.parametrize("net", list(NETS))
def test_per_output_splits_the_head_by_column(net):
  sizes = {f"task_{i}": D_H + 1 for i in range(D_OUT)}
  sizes["rest"] = TOTAL - HEAD
  check(L.per_output(r"^head/", "task_"), net, dict(embed_kernel="rest"), sizes)


@pytest.mark.parametrize("net", list(NETS))
def test_by_regex_first_match_wins(net):
  fn = L.by_regex([(r"lora", "adapter"), (r"^block|^blocks/", "blocks")], default="other")
  check(
      fn, net,
      dict(block0_lora_a="adapter", block2_kernel="blocks", head_kernel="other"),
      {"adapter": N_BLOCKS * (LORA_A + LORA_B),
       "blocks": N_BLOCKS * (DENSE + NORM), "other": EMBED + HEAD},
  )


def test_by_regex_without_default_names_the_unmatched_path():
  with pytest.raises(ValueError, match="head/bias"):
    L.by_regex({r"^embed|block": "body"})(linen_net())


# ----------------------------------------------------------------------------
# The paper's two other architectures: an additive model and a mixture of experts
# ----------------------------------------------------------------------------


class LinenAdditive(nn.Module):
  """One MLP per feature plus an output bias (paper section 4.4)."""

  features: int = 3

  @nn.compact
  def __call__(self, x):
    outs = [
        nn.Dense(1, name=f"feature_{i}")(nn.relu(nn.Dense(4, name=f"hidden_{i}")(x[:, i : i + 1])))
        for i in range(self.features)
    ]
    return sum(outs)[:, 0] + self.param("bias", nn.initializers.zeros, ())


class LinenExpert(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(nn.relu(nn.Dense(5)(x)))


class LinenMoE(nn.Module):
  """A gate and 6 experts stacked with ``nn.vmap`` (paper appendix B)."""

  @nn.compact
  def __call__(self, x):
    gate = jax.nn.softmax(nn.Dense(6, name="gate")(x))
    experts = nn.vmap(
        LinenExpert, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=None, out_axes=1, axis_size=6,
    )(name="experts")(x)
    return jnp.einsum("be,bed->bd", gate, experts)


class NNXAdditive(nnx.Module):
  def __init__(self, features: int, rngs: nnx.Rngs):
    self.features = nnx.List([
        nnx.Sequential(nnx.Linear(1, 4, rngs=rngs), nnx.relu, nnx.Linear(4, 1, rngs=rngs))
        for _ in range(features)
    ])
    self.bias = nnx.Param(jnp.zeros(()))


def test_additive_model_one_group_per_feature_network():
  linen = LinenAdditive().init(jax.random.key(0), jnp.ones((2, 3)))["params"]
  # Linen: hidden_i and feature_i are separate top-level modules -> regex.
  fn = L.by_regex([(r"^(hidden|feature)_(\d+)/", r"f")], default="bias")
  assert L.group_sizes(fn, linen) == {"bias": 1, "f": 3 * (8 + 5)}
  per_feature = L.by_path(lambda path, _: "bias" if path == "bias" else "f" + path.split("_")[1][0])
  assert L.group_sizes(per_feature, linen) == {"bias": 1, "f0": 13, "f1": 13, "f2": 13}
  nnx_state = nnx.as_pure(nnx.state(NNXAdditive(3, nnx.Rngs(0)), nnx.Param))
  assert L.group_sizes(L.by_submodule(depth=2), nnx_state) == {
      "bias": 1, "features/0": 13, "features/1": 13, "features/2": 13,
  }


def test_mixture_of_experts_gate_vs_experts_and_per_expert():
  params = LinenMoE().init(jax.random.key(0), jnp.ones((2, 4)))["params"]
  gate, expert = 4 * 6 + 6, 4 * 5 + 5 + 5 * 2 + 2
  assert L.group_sizes(L.by_submodule(), params) == {"experts": 6 * expert, "gate": gate}
  per_expert = L.by_regex({r"^gate/": "gate", r"^experts/": hidlr_optax.per_slice(0, "expert_")})
  sizes = L.group_sizes(per_expert, params)
  assert sizes == {"gate": gate, **{f"expert_{i}": expert for i in range(6)}}
  tx = hidlr_optax.hidlr(optax.scale_by_adam(), 1e-3, per_expert)
  assert len(hidlr_optax.learning_rates(tx.init(params))) == 7


# ----------------------------------------------------------------------------
# Helper details
# ----------------------------------------------------------------------------


def test_by_depth_pads_and_merges_layers():
  params = {f"layers_{i}": {"w": jnp.ones(2)} for i in range(12)}
  labels = L.by_depth()(params)
  assert labels["layers_3"]["w"] == "layer_03" and labels["layers_11"]["w"] == "layer_11"
  merged = L.group_sizes(L.by_depth("g", layers_per_group=4), params)
  assert merged == {"g0": 8, "g1": 8, "g2": 8}


def test_path_string_drops_only_the_nnx_value_attribute():
  state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)
  paths = [L.path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert paths == ["bias", "kernel"]


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_invalid_depths_raise(bad):
  with pytest.raises(ValueError):
    L.by_submodule(bad)
  with pytest.raises(ValueError):
    L.by_depth(layers_per_group=bad)


def test_label_functions_work_as_multi_transform_labels():
  params = linen_net()
  tx = optax.multi_transform({"bias": optax.sgd(0.0), "weight": optax.sgd(1.0)}, L.bias_vs_weight())
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.abs(updates["head"]["bias"]).sum()) == 0.0
  assert float(jnp.abs(updates["head"]["kernel"]).min()) == 1.0



# ----------------------------------------------------------------------------
# A group a helper promises that comes out empty is an error (issue 26, item 2)
# ----------------------------------------------------------------------------


class LinenAutoNamedMLP(nn.Module):
  """Layers ``Dense_0..Dense_2``, no ``head``, no norm, no LoRA."""

  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    for width in (8, 8, D_OUT):
      x = nn.Dense(width, use_bias=self.use_bias)(x)
    return x


def auto_named(use_bias=True):
  return LinenAutoNamedMLP(use_bias).init(jax.random.key(0), jnp.ones((1, D_IN)))["params"]


@pytest.mark.parametrize(
    "helper, pattern",
    [
        (L.head_vs_body, L.HEAD_PATTERN),
        (L.norm_vs_rest, L.NORM_PATTERN),
        (L.lora, L.LORA_A_PATTERN),
        (lambda: L.per_output(r"^head/"), r"^head/"),
    ],
)
def test_a_promised_group_that_is_empty_raises_naming_pattern_and_paths(helper, pattern):
  params = auto_named()
  name = "per_output" if pattern == r"^head/" else helper.__name__
  with pytest.raises(ValueError) as info:
    helper()(params)
  message = str(info.value)
  assert message.startswith(f"{name}: ") and "empty" in message
  assert repr(pattern) in message
  assert "'Dense_0/bias'" in message and "'Dense_2/kernel'" in message
  assert "(6 in all)" in message
  # Every way of using the grouping raises: Hi-DLR's init, group_sizes, optax.
  with pytest.raises(ValueError, match=f"^{name}: "):
    hidlr_optax.hidlr(optax.scale_by_adam(), 1e-3, helper()).init(params)
  with pytest.raises(ValueError, match=f"^{name}: "):
    L.group_sizes(helper(), params)
  with pytest.raises(ValueError, match=f"^{name}: "):
    optax.multi_transform({"head": optax.sgd(1.0), "body": optax.sgd(1.0)}, helper()).init(params)


def test_head_vs_body_on_an_auto_named_model_is_not_plain_gen():
  """The issue's case: today this gives ``{'body': N}``, one group."""
  params = auto_named()
  with pytest.raises(ValueError, match=r"group 'head' .* empty.*head_vs_body\(r'\^Dense_2/'\)"):
    L.group_sizes(L.head_vs_body(), params)
  sizes = L.group_sizes(L.head_vs_body(r"^Dense_2/"), params)
  assert sizes == {"body": D_IN * 8 + 8 + 8 * 8 + 8, "head": 8 * D_OUT + D_OUT}


@pytest.mark.parametrize("net", list(NETS))
def test_the_other_side_of_a_two_way_helper_may_not_be_empty_either(net):
  params = NETS[net]()
  with pytest.raises(ValueError, match="group 'body' .* every parameter path matches"):
    L.head_vs_body(r".")(params)
  with pytest.raises(ValueError, match="group 'rest' .* every parameter path matches"):
    L.norm_vs_rest(pattern=r".")(params)
  with pytest.raises(ValueError, match="group 'weight' .* every parameter path matches"):
    L.bias_vs_weight()({"dense": {"bias": jnp.ones(2)}, "norm": {"bias": jnp.ones(2)}})


def test_bias_vs_weight_without_biases_raises():
  with pytest.raises(ValueError, match=r"bias_vs_weight: the group 'bias' .*'Dense_0/kernel'"):
    L.bias_vs_weight()(auto_named(use_bias=False))


def test_lora_needs_both_factors_but_not_a_rest_group():
  only_a = {"lora_a": jnp.ones((4, 2)), "head": jnp.ones(4)}
  with pytest.raises(ValueError, match="lora: the group 'lora_b'"):
    L.lora()(only_a)
  # nnx.Optimizer(model, tx, wrt=nnx.LoRAParam): only the factors, no rest.
  state = nnx.as_pure(nnx.state(NNXNet(nnx.Rngs(0)), nnx.LoRAParam))
  assert L.group_sizes(L.lora(), state) == {
      "lora_a": N_BLOCKS * LORA_A, "lora_b": N_BLOCKS * LORA_B,
  }


def test_by_depth_without_any_layer_index_raises():
  with pytest.raises(ValueError, match=r"by_depth: .*pattern '\(\\\\d\+\)\$'.*'head/bias'"):
    L.by_depth()({"embed": {"kernel": jnp.ones(2)}, "head": {"bias": jnp.ones(2)}})


def test_a_tree_without_leaves_passes_through():
  for helper in (L.head_vs_body, L.bias_vs_weight, L.norm_vs_rest, L.lora):
    assert helper()({}) == {}


def test_the_message_lists_a_few_paths_not_all():
  params = {f"layer_{i:02d}": {"kernel": jnp.ones(2)} for i in range(50)}
  message = str(pytest.raises(ValueError, L.head_vs_body(), params).value)
  assert "'layer_00/kernel', 'layer_01/kernel', 'layer_02/kernel', ..., 'layer_47/kernel'" in message
  assert "'layer_10/kernel'" not in message and "(50 in all)" in message
