"""Ready-made parameter groupings for Hi-DLR's ``param_labels``.

Every helper here returns a *label function*: a callable ``params -> labels``
that maps each parameter leaf to its group label (a string) or to a
:func:`per_slice` split. Pass it as ``param_labels`` to
:func:`hidlr_optax.scale_by_hidlr` / :func:`hidlr_optax.hidlr` (or to
``optax.multi_transform``). The functions are resolved at trace time from the
tree's structure, so they work unchanged on plain dicts, Flax Linen parameter
dicts and ``flax.nnx`` states (pure or holding variables).

Helpers match on a leaf's *path string*: the names of its keys joined by
``/``, e.g. ``"Dense_0/kernel"`` (Linen), ``"layers/2/bias"`` (``nnx.List``)
or ``"head/kernel"``; a trailing ``.value`` of a ``flax.nnx`` variable is
dropped. The groupings follow Xu, Bu, Zhang & Barnett (Hi-DLR), section 4:
head vs body, bias vs weight and normalisation layers (Table 2), LoRA A / B
(Table 1), one sub-network per feature or expert (section 4.4, appendix B)
and one output column per task (section 4.3).

A helper that promises named groups checks them: when a group it promises
comes out empty (``head_vs_body()`` on a model whose output layer is called
``Dense_2``, ``bias_vs_weight()`` on a model without biases), applying its
label function raises a ``ValueError`` naming the helper, the pattern and
some of the paths it saw, instead of training a single group (plain GeN)
without a word. Groups a helper only offers (``lora()``'s ``rest``, the
``rest`` of :func:`by_depth` and :func:`per_output`) may be empty.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import jax
import numpy as np

from hidlr_optax._grouping import Label, LabelsOrFn, SliceLabels, build_layout, per_slice

#: A label function: parameters -> a pytree of labels with their structure.
LabelFn = Callable[[Any], Any]
LabelLeaf = Union[Label, SliceLabels]
Rules = Union[Mapping[str, LabelLeaf], Sequence[tuple[str, LabelLeaf]]]

#: Default regex of :func:`norm_vs_rest`: a module (not the leaf itself) whose
#: name contains ``norm`` (``LayerNorm_0``, ``norm1``, ``RMSNorm_2``), or is
#: ``ln``/``bn`` with an optional suffix (``ln_f``, ``ln1``, ``bn2``).
NORM_PATTERN = r"(?i)(^|/)([^/]*norm[^/]*|ln(_[a-z0-9]+|\d+)?|bn\d*)/"
#: Default regex of :func:`head_vs_body`: a module named ``head*`` or
#: ``classifier*``.
HEAD_PATTERN = r"(?i)(^|/)(head|classifier)[^/]*/"
#: Default regexes of :func:`lora`: ``lora_a``/``lora_A``/``loraA`` (flax.nnx
#: ``LoRA`` and Hugging Face PEFT names), likewise for B.
LORA_A_PATTERN = r"(?i)(^|/)lora_?a(/|$)"
LORA_B_PATTERN = r"(?i)(^|/)lora_?b(/|$)"
#: Regex of :func:`bias_vs_weight`: a leaf named ``bias``.
BIAS_PATTERN = r"(^|/)bias$"

__all__ = [
    "BIAS_PATTERN",
    "HEAD_PATTERN",
    "LORA_A_PATTERN",
    "LORA_B_PATTERN",
    "LabelFn",
    "NORM_PATTERN",
    "bias_vs_weight",
    "by_depth",
    "by_path",
    "by_regex",
    "by_submodule",
    "group_sizes",
    "head_vs_body",
    "lora",
    "norm_vs_rest",
    "path_string",
    "per_output",
    "per_slice",
]


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_string(path: Sequence[Any]) -> str:
  """Joins a JAX key path into ``"a/b/c"``.

  Dict keys, attribute names and sequence indices all become names; a
  trailing ``.value`` attribute (a ``flax.nnx`` variable's array) is dropped.

  Args:
    path: a key path, as given by ``jax.tree_util.tree_flatten_with_path``.

  Returns:
    The path string.

  Example:
    >>> import jax
    >>> [(path, _)] = jax.tree_util.tree_flatten_with_path({'a': [0]})[0]
    >>> path_string(path)
    'a/0'
  """
  keys = list(path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys.pop()
  return "/".join(_key_name(k) for k in keys)


def by_path(label_of: Callable[[str, Any], LabelLeaf]) -> LabelFn:
  """Labels every leaf by a function of its path string and value.

  Args:
    label_of: ``(path, leaf) -> label`` where ``path`` is the leaf's
      :func:`path_string`; the label may be a :func:`per_slice` split.

  Returns:
    A label function ``params -> labels``.

  Example:
    >>> import jax.numpy as jnp
    >>> fn = by_path(lambda path, leaf: 'matrix' if leaf.ndim > 1 else 'vector')
    >>> fn({'w': jnp.ones((2, 3)), 'b': jnp.ones(3)})
    {'b': 'vector', 'w': 'matrix'}
  """

  def labels(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: label_of(path_string(path), leaf), params
    )

  return labels


def _paths_seen(params: Any, shown: int = 3) -> str:
  """The first and last ``shown`` path strings of ``params``, and their count."""
  paths = [repr(path_string(p)) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  listed = paths if len(paths) <= 2 * shown else paths[:shown] + ["..."] + paths[-shown:]
  return f"{', '.join(listed)} ({len(paths)} in all)"


def _group_name(label: LabelLeaf) -> str:
  if not isinstance(label, SliceLabels):
    return f"the group {label!r}"
  if isinstance(label.labels, str):
    return f"the per-slice split into {label.labels}0, {label.labels}1, ..."
  return f"the per-slice split into {list(label.labels)}"


def _promising(
    helper: str, label_fn: LabelFn, promised: Sequence[tuple[LabelLeaf, str]], hint: str = ""
) -> LabelFn:
  """``label_fn``, raising when one of the groups it promises is empty.

  Args:
    helper: the helper's name, for the message.
    label_fn: the label function to check.
    promised: ``(label, why_empty)`` pairs: each label must label at least
      one leaf; ``why_empty`` says, in the message, what matched nothing.
    hint: a sentence on what to do, appended to the message.

  Returns:
    A label function giving ``label_fn``'s labels. A tree without leaves is
    passed through (it has no groups to promise).
  """

  def labels(params: Any) -> Any:
    tree = label_fn(params)
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, SliceLabels))
    for label, why_empty in promised:
      if leaves and not any(leaf == label for leaf in leaves):
        raise ValueError(
            f"{helper}: {_group_name(label)} it promises is empty: {why_empty}."
            f" Paths seen: {_paths_seen(params)}.{' ' + hint if hint else ''}"
        )
    return tree

  return labels


def _two_way(
    helper: str, what: str, pattern: str, matched: LabelLeaf, rest: LabelLeaf, hint: str
) -> LabelFn:
  """``matched`` where a path matches ``pattern``, ``rest`` elsewhere; both
  promised (raising, with ``what`` naming the pattern, when one is empty)."""
  return _promising(
      helper,
      by_regex([(pattern, matched)], default=rest),
      [(matched, f"no parameter path matches the {what} pattern {pattern!r}"),
       (rest, f"every parameter path matches the {what} pattern {pattern!r}")],
      hint,
  )


def by_regex(rules: Rules, default: Union[LabelLeaf, None] = None) -> LabelFn:
  """Labels every leaf by the first regex that its path string matches.

  Args:
    rules: ``{regex: label}`` or a sequence of ``(regex, label)`` pairs, tried
      in order with ``re.search`` on the :func:`path_string`; a label may be a
      :func:`per_slice` split.
    default: the label of leaves no rule matches; ``None`` makes an unmatched
      leaf an error.

  Returns:
    A label function ``params -> labels``.

  Raises:
    ValueError: (when the function is applied) if a leaf matches no rule and
      there is no default.

  Example:
    >>> import jax.numpy as jnp
    >>> fn = by_regex({r'^gate/': 'gate', r'^expert': 'experts'})
    >>> fn({'gate': {'kernel': jnp.ones(2)}, 'expert_0': {'kernel': jnp.ones(2)}})
    {'expert_0': {'kernel': 'experts'}, 'gate': {'kernel': 'gate'}}
  """
  items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
  compiled = [(re.compile(pattern), label) for pattern, label in items]

  def label_of(path: str, leaf: Any) -> LabelLeaf:
    del leaf
    for regex, label in compiled:
      if regex.search(path):
        return label
    if default is None:
      raise ValueError(
          f"by_regex: parameter {path!r} matches none of the patterns"
          f" {[p for p, _ in items]} and no default label is given"
      )
    return default

  return by_path(label_of)


def bias_vs_weight(bias: LabelLeaf = "bias", weight: LabelLeaf = "weight") -> LabelFn:
  """Two groups: biases (leaves named ``bias``) and all other parameters.

  This is the paper's "Hi-DLR (bias)" grouping (Table 2). Normalisation
  layers' ``bias`` (their shift) counts as a bias, as in PyTorch.

  Args:
    bias: label of the biases.
    weight: label of everything else.

  Returns:
    A label function ``params -> labels``.

  Raises:
    ValueError: (when the function is applied) if no leaf is named ``bias``
      or every leaf is.

  Example:
    >>> import jax.numpy as jnp
    >>> bias_vs_weight()({'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}})
    {'dense': {'bias': 'bias', 'kernel': 'weight'}}
  """
  return _two_way("bias_vs_weight", "bias", BIAS_PATTERN, bias, weight,
                  "For a model without biases use another grouping.")


def norm_vs_rest(
    norm: LabelLeaf = "norm", rest: LabelLeaf = "rest", *, pattern: str = NORM_PATTERN
) -> LabelFn:
  """Two groups: parameters of normalisation layers and all others.

  The paper's "Hi-DLR (norm)" grouping (Table 2).

  Args:
    norm: label of the normalisation layers' parameters.
    rest: label of everything else.
    pattern: regex that a normalisation layer's path matches (default
      :data:`NORM_PATTERN`: a module named ``*norm*``, ``ln*`` or ``bn*``).

  Returns:
    A label function ``params -> labels``.

  Raises:
    ValueError: (when the function is applied) if no path matches
      ``pattern`` or every path does.

  Example:
    >>> import jax.numpy as jnp
    >>> norm_vs_rest()({'LayerNorm_0': {'scale': jnp.ones(2)}, 'Dense_0': {'kernel': jnp.ones(2)}})
    {'Dense_0': {'kernel': 'rest'}, 'LayerNorm_0': {'scale': 'norm'}}
  """
  return _two_way("norm_vs_rest", "norm", pattern, norm, rest,
                  "Pass pattern= matching your normalisation layers' paths.")


def head_vs_body(
    pattern: str = HEAD_PATTERN, *, head: LabelLeaf = "head", body: LabelLeaf = "body"
) -> LabelFn:
  """Two groups: the output head and the body.

  The paper's "Hi-DLR (head)" grouping (Table 2).

  Args:
    pattern: regex that the head's parameter paths match (default
      :data:`HEAD_PATTERN`: a module named ``head*`` or ``classifier*``); for
      an auto-named Linen model pass e.g. ``r'^Dense_2/'``.
    head: label of the head's parameters.
    body: label of everything else.

  Returns:
    A label function ``params -> labels``.

  Raises:
    ValueError: (when the function is applied) if no path matches
      ``pattern`` (e.g. an output layer named ``Dense_2``) or every path does.

  Example:
    >>> import jax.numpy as jnp
    >>> head_vs_body()({'encoder': {'kernel': jnp.ones(2)}, 'head': {'kernel': jnp.ones(2)}})
    {'encoder': {'kernel': 'body'}, 'head': {'kernel': 'head'}}
    >>> head_vs_body()({'Dense_0': {'kernel': jnp.ones(2)}, 'Dense_1': {'kernel': jnp.ones(2)}})
    Traceback (most recent call last):
    ...
    ValueError: head_vs_body: the group 'head' it promises is empty: no parameter
    path matches the head pattern ... Paths seen: 'Dense_0/kernel',
    'Dense_1/kernel' (2 in all). Pass pattern= ...
  """
  return _two_way(
      "head_vs_body", "head", pattern, head, body,
      "Pass pattern= matching your output layer's paths, e.g. head_vs_body(r'^Dense_2/').",
  )


def lora(
    a: LabelLeaf = "lora_a",
    b: LabelLeaf = "lora_b",
    rest: LabelLeaf = "rest",
    *,
    a_pattern: str = LORA_A_PATTERN,
    b_pattern: str = LORA_B_PATTERN,
) -> LabelFn:
  """Three groups: LoRA ``A`` factors, LoRA ``B`` factors and the rest.

  The paper's LoRA grouping (Table 1: A / B / head). With ``nnx.LoRA`` and
  ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` only the factors train and
  there is no ``rest`` group.

  Args:
    a: label of the ``A`` (down-projection) factors.
    b: label of the ``B`` (up-projection) factors.
    rest: label of everything else (e.g. a trained head).
    a_pattern: regex of the ``A`` factors' paths (default
      :data:`LORA_A_PATTERN`, e.g. ``lora_a`` or ``lora_A``).
    b_pattern: regex of the ``B`` factors' paths.

  Returns:
    A label function ``params -> labels``.

  Raises:
    ValueError: (when the function is applied) if no path matches
      ``a_pattern`` or none matches ``b_pattern`` (the ``rest`` group may be
      empty).

  Example:
    >>> import jax.numpy as jnp
    >>> lora()({'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 4)), 'head': jnp.ones(4)})
    {'head': 'rest', 'lora_a': 'lora_a', 'lora_b': 'lora_b'}
  """
  return _promising(
      "lora",
      by_regex([(a_pattern, a), (b_pattern, b)], default=rest),
      [(a, f"no parameter path matches a_pattern {a_pattern!r}"),
       (b, f"no parameter path matches b_pattern {b_pattern!r}")],
      "Pass a_pattern= and b_pattern= matching your adapters' factor names.",
  )


def by_submodule(depth: int = 1) -> LabelFn:
  """One group per submodule: the first ``depth`` names of each path.

  With ``depth=1`` every top-level submodule is a group, e.g. each feature
  network of a neural additive model (section 4.4 of the paper) plus its
  output bias, or a mixture of experts' gate and each expert (appendix B).
  Pass the parameters themselves (Linen: ``variables['params']``).

  Args:
    depth: how many leading path names form the label.

  Returns:
    A label function ``params -> labels``.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'feature_0': {'kernel': jnp.ones(2), 'bias': jnp.ones(2)}, 'bias': jnp.ones(())}
    >>> by_submodule()(params)
    {'bias': 'bias', 'feature_0': {'bias': 'feature_0', 'kernel': 'feature_0'}}
  """
  if not isinstance(depth, int) or depth < 1:
    raise ValueError(f"by_submodule: depth must be an int >= 1, got {depth!r}")
  return by_path(lambda path, leaf: "/".join(path.split("/")[:depth]))


def by_depth(
    prefix: str = "layer_",
    rest: LabelLeaf = "rest",
    *,
    layers_per_group: int = 1,
    pattern: str = r"(\d+)$",
) -> LabelFn:
  """One group per layer index (or per run of ``layers_per_group`` layers).

  A leaf's index is read from the outermost module name that ends in digits
  (``Dense_3``, ``layers_3``, ``nnx.List`` entries ``layers/3``, ``fc3``).
  Labels are ``prefix`` plus the zero-padded group index, so that they sort
  in depth order. Linen's automatic names count per layer type (``Dense_0``
  and ``LayerNorm_0`` both get index 0): name the layers to avoid that.

  Args:
    prefix: label prefix.
    rest: label of leaves with no index (e.g. a named ``head``).
    layers_per_group: consecutive indices merged into one group.
    pattern: regex with one group capturing the index in a module name.

  Returns:
    A label function ``params -> labels``.

  Raises:
    ValueError: (when the function is applied) if no leaf has an index.

  Example:
    >>> import jax.numpy as jnp
    >>> p = {f'layers_{i}': {'kernel': jnp.ones(2)} for i in (0, 1, 10)}
    >>> labels = by_depth()(p)
    >>> labels['layers_1']['kernel'], labels['layers_10']['kernel']
    ('layer_01', 'layer_10')
  """
  if not isinstance(layers_per_group, int) or layers_per_group < 1:
    raise ValueError(
        f"by_depth: layers_per_group must be an int >= 1, got {layers_per_group!r}"
    )
  regex = re.compile(pattern)

  def index_of(path: str) -> Union[int, None]:
    for name in path.split("/")[:-1]:
      match = regex.search(name)
      if match:
        return int(match.group(1)) // layers_per_group
    return None

  def labels(params: Any) -> Any:
    paths = [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    indices = [i for i in map(index_of, paths) if i is not None]
    if paths and not indices:
      raise ValueError(
          f"by_depth: the layer groups it promises are empty: no module name on"
          f" any parameter path matches the index pattern {pattern!r}, so every"
          f" parameter would be in {rest!r}. Paths seen: {_paths_seen(params)}."
          " Name the layers with a trailing index, or pass pattern=."
      )
    width = len(str(max(indices))) if indices else 1

    def label_of(path: str, leaf: Any) -> LabelLeaf:
      del leaf
      index = index_of(path)
      return rest if index is None else f"{prefix}{index:0{width}d}"

    return by_path(label_of)(params)

  return labels


def per_output(
    pattern: str, prefix: str = "out_", rest: LabelLeaf = "rest"
) -> LabelFn:
  """One group per output unit (last axis) of the leaves matching ``pattern``.

  For a multi-task head whose output column ``i`` is task ``i`` (the paper's
  CelebA experiment, section 4.3): the kernel's column ``i`` and the bias's
  entry ``i`` form group ``f"{prefix}{i}"``. Built on :func:`per_slice`.

  Args:
    pattern: regex of the split leaves' paths.
    prefix: label prefix of the per-unit groups.
    rest: label of all other leaves.

  Returns:
    A label function ``params -> labels``.

  Raises:
    ValueError: (when the function is applied) if no path matches
      ``pattern``.

  Example:
    >>> import jax.numpy as jnp
    >>> p = {'body': jnp.ones(3), 'head': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)}}
    >>> sorted(group_sizes(per_output(r'^head/', 'task_'), p).items())
    [('rest', 3), ('task_0', 4), ('task_1', 4)]
  """
  split = per_slice(-1, prefix)
  return _promising(
      "per_output",
      by_regex([(pattern, split)], default=rest),
      [(split, f"no parameter path matches the pattern {pattern!r}")],
  )


def group_sizes(param_labels: LabelsOrFn, params: Any) -> dict[Label, int]:
  """Counts the parameters (array entries) in every group.

  Useful to check a grouping before training.

  Args:
    param_labels: any form :func:`hidlr_optax.scale_by_hidlr` accepts.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    ``{label: number of entries}``, in the groups' order.

  Example:
    >>> import jax.numpy as jnp
    >>> group_sizes(bias_vs_weight(), {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)})
    {'bias': 2, 'weight': 6}
  """
  layout = build_layout(param_labels, params)
  counts = np.zeros(layout.num_groups, dtype=np.int64)
  leaves = layout.treedef.flatten_up_to(params)
  for spec, leaf in zip(layout.leaves, leaves):
    shape = np.shape(leaf)
    if spec.slice_groups is None:
      counts[spec.group] += int(np.prod(shape))
    else:
      per = int(np.prod(shape)) // shape[spec.axis]
      np.add.at(counts, spec.slice_groups, per)
  return {label: int(c) for label, c in zip(layout.labels, counts)}
