"""Parameter groups: resolving user labels into a static layout.

A *layout* maps every leaf of the parameter pytree to the learning-rate group
(or groups, for a leaf split along an axis) it belongs to. It is a pure
function of the parameters' tree structure and shapes, so it is rebuilt at
trace time by both ``init`` and ``update`` and never stored in the state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

Label = Hashable
LabelsOrFn = Union[Any, Callable[[Any], Any], None]

#: Label given to the single group when ``param_labels`` is ``None``.
SINGLE_GROUP_LABEL = "all"


@dataclasses.dataclass(frozen=True)
class SliceLabels:
  """A label leaf that splits one parameter leaf into one group per slice.

  Build it with :func:`per_slice`. It is deliberately not a pytree node, so it
  sits as a leaf in a label tree.

  Attributes:
    axis: axis of the parameter leaf along which it is split.
    labels: one label per slice, or a string prefix ``p`` giving the labels
      ``f"{p}{i}"`` for slice ``i``.
  """

  axis: int
  labels: Union[str, tuple[Label, ...]]

  def resolve(self, shape: tuple[int, ...], where: str) -> tuple[Label, ...]:
    """Returns one label per slice of a leaf of the given shape."""
    if not shape:
      raise ValueError(f"per_slice label at {where}: the parameter is a scalar")
    if not -len(shape) <= self.axis < len(shape):
      raise ValueError(
          f"per_slice label at {where}: axis {self.axis} is out of range for a"
          f" parameter of shape {shape}"
      )
    size = shape[self.axis]
    if isinstance(self.labels, str):
      return tuple(f"{self.labels}{i}" for i in range(size))
    if len(self.labels) != size:
      raise ValueError(
          f"per_slice label at {where}: {len(self.labels)} labels given for"
          f" {size} slices along axis {self.axis} of shape {shape}"
      )
    return self.labels


def per_slice(axis: int, labels: Union[str, Sequence[Label]]) -> SliceLabels:
  """Labels one parameter leaf with one group per slice along ``axis``.

  Use it as a leaf of ``param_labels`` where a single array holds several
  groups, e.g. a multi-task head whose output columns are separate tasks.
  Slices may share labels with other leaves (a head's column ``i`` and its
  bias entry ``i`` can form one group).

  Args:
    axis: axis of the parameter along which to split.
    labels: a sequence with one label per slice, or a string prefix ``p`` for
      the labels ``p0, p1, ...``.

  Returns:
    A label leaf understood by :func:`hidlr_optax.scale_by_hidlr`.

  Example:
    >>> import hidlr_optax
    >>> labels = {'kernel': hidlr_optax.per_slice(1, 'task'), 'bias': 'bias'}
  """
  if not isinstance(axis, (int, np.integer)):
    raise TypeError(f"per_slice: axis must be an int, got {axis!r}")
  if not isinstance(labels, str):
    labels = tuple(labels)
  return SliceLabels(int(axis), labels)


@dataclasses.dataclass(frozen=True)
class LeafGroups:
  """Group membership of one parameter leaf.

  Attributes:
    group: index of the leaf's group, or ``None`` if the leaf is split.
    axis: the split axis (split leaves only).
    slice_groups: group index of every slice (split leaves only).
  """

  group: Union[int, None] = None
  axis: int = 0
  slice_groups: Union[np.ndarray, None] = None


@dataclasses.dataclass(frozen=True)
class GroupLayout:
  """Static description of the parameter groups.

  Attributes:
    labels: the group labels, sorted; group ``k`` is ``labels[k]``.
    leaves: one :class:`LeafGroups` per parameter leaf, in tree order.
    treedef: tree structure of the parameters.
  """

  labels: tuple[Label, ...]
  leaves: tuple[LeafGroups, ...]
  treedef: Any

  @property
  def num_groups(self) -> int:
    return len(self.labels)

  def scale(self, coeffs: jax.Array, tree: Any) -> Any:
    """Multiplies every group's part of ``tree`` by its coefficient.

    Args:
      coeffs: array of shape ``(num_groups,)``.
      tree: a pytree with the parameters' structure.

    Returns:
      The tree with group ``k``'s entries multiplied by ``coeffs[k]``, in each
      leaf's own dtype.
    """
    leaves = self.treedef.flatten_up_to(tree)
    scaled = [_scale_leaf(coeffs, spec, x) for spec, x in zip(self.leaves, leaves)]
    return self.treedef.unflatten(scaled)

  def sizes(self, params: Any) -> np.ndarray:
    """The number of parameter entries in each group, shape ``(num_groups,)``."""
    counts = np.zeros(self.num_groups)
    for spec, leaf in zip(self.leaves, self.treedef.flatten_up_to(params)):
      shape = np.shape(leaf)
      if spec.slice_groups is None:
        counts[spec.group] += np.prod(shape)
      else:
        np.add.at(counts, spec.slice_groups, np.prod(shape) / shape[spec.axis])
    return counts

  def dot(self, a: Any, b: Any, dtype: Any) -> jax.Array:
    """The inner product of ``a`` and ``b`` within every group, shape ``(num_groups,)``.

    Args:
      a: a pytree with the parameters' structure.
      b: another.
      dtype: the dtype of the result (and of the sums).
    """
    total = jnp.zeros((self.num_groups,), dtype)
    leaves = zip(self.leaves, self.treedef.flatten_up_to(a), self.treedef.flatten_up_to(b))
    for spec, x, y in leaves:
      product = jnp.asarray(x).astype(dtype) * jnp.asarray(y).astype(dtype)
      if spec.slice_groups is None:
        total = total.at[spec.group].add(jnp.sum(product))
      else:
        others = tuple(i for i in range(product.ndim) if i != spec.axis)
        total = total.at[spec.slice_groups].add(jnp.sum(product, axis=others))
    return total

  def move(self, params: Any, coeffs: jax.Array, directions: Any, groups: np.ndarray) -> Any:
    """Returns ``params - coeffs_k * d_k`` over the groups where ``groups`` is set.

    Leaves that hold no entry of those groups are returned as they are (not
    recomputed), so under ``jax.vmap`` over ``coeffs`` they stay unbatched and
    the computations that depend on them alone are done once.

    Args:
      params: the parameters.
      coeffs: array of shape ``(num_groups,)``; zero outside ``groups``.
      directions: a pytree with the parameters' structure.
      groups: static boolean mask of shape ``(num_groups,)``.

    Returns:
      The moved parameters, in each leaf's own dtype.
    """
    p_leaves = self.treedef.flatten_up_to(params)
    d_leaves = self.treedef.flatten_up_to(directions)
    moved = [
        (p - _scale_leaf(coeffs, spec, d)).astype(p.dtype) if _touches(spec, groups) else p
        for spec, p, d in zip(self.leaves, p_leaves, d_leaves)
    ]
    return self.treedef.unflatten(moved)


def _touches(spec: LeafGroups, groups: np.ndarray) -> bool:
  """Whether a leaf holds entries of any group set in the mask ``groups``."""
  if spec.slice_groups is None:
    return bool(groups[spec.group])
  return bool(np.any(groups[spec.slice_groups]))


def _scale_leaf(coeffs: jax.Array, spec: LeafGroups, x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  if spec.slice_groups is None:
    return coeffs[spec.group].astype(x.dtype) * x
  per_slice_coeffs = coeffs[spec.slice_groups].astype(x.dtype)
  shape = [1] * x.ndim
  shape[spec.axis] = x.shape[spec.axis]
  return per_slice_coeffs.reshape(shape) * x


def _path_str(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _sort_labels(labels: set) -> tuple:
  try:
    return tuple(sorted(labels))
  except TypeError as e:
    raise TypeError(
        "param_labels: group labels must be mutually sortable (all strings or"
        f" all ints); got {sorted(map(repr, labels))}"
    ) from e


def _is_label(x: Any) -> bool:
  return isinstance(x, SliceLabels)


def _key_name(key: Any) -> Hashable:
  """A key path entry's name: a dict key, an attribute name or a sequence index."""
  for field in ("key", "name", "idx"):
    if hasattr(key, field):
      return getattr(key, field)
  return key


def _names(path: Sequence[Any]) -> tuple[Hashable, ...]:
  return tuple(_key_name(k) for k in path)


def _labels_by_key_path(labels: Any, params: Any) -> Union[list, None]:
  """One label leaf per parameter leaf, each the label whose key path (by names)
  is a prefix of the leaf's; ``None`` if a leaf has no label or a label no leaf.

  This matches a prefix whose nodes are not the parameters' node types, e.g.
  a dict of labels over an ``nnx.State`` (whose leaves also end in ``.value``).
  """
  by_path = {
      _names(path): label
      for path, label in jax.tree_util.tree_flatten_with_path(labels, is_leaf=_is_label)[0]
  }
  out, used = [], set()
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = _names(path)
    prefix = next((names[:n] for n in range(len(names) + 1) if names[:n] in by_path), None)
    if prefix is None:
      return None
    used.add(prefix)
    out.append(by_path[prefix])
  return out if len(used) == len(by_path) else None


def _broadcast_labels(labels: Any, params: Any) -> list:
  """Returns one label leaf per parameter leaf, expanding a prefix tree.

  The prefix is matched by tree structure, or else by key paths (a dict of
  labels over another mapping node, such as an ``nnx.State``).
  """
  params_def = jax.tree.structure(params)
  labels_def = jax.tree.structure(labels, is_leaf=_is_label)
  if labels_def == params_def:
    return jax.tree.leaves(labels, is_leaf=_is_label)
  try:
    expanded = labels_def.flatten_up_to(params)
  except (ValueError, TypeError) as e:
    by_key_path = _labels_by_key_path(labels, params)
    if by_key_path is not None:
      return by_key_path
    raise ValueError(
        "param_labels does not match the parameters: it must be a pytree of"
        " labels with the parameters' structure, or a prefix of it (or a"
        " callable returning one).\n"
        f"  labels structure: {labels_def}\n  params structure: {params_def}"
    ) from e
  label_leaves = jax.tree.leaves(labels, is_leaf=_is_label)
  out = []
  for label, subtree in zip(label_leaves, expanded):
    out.extend([label] * len(jax.tree.leaves(subtree)))
  return out


def build_layout(param_labels: LabelsOrFn, params: Any) -> GroupLayout:
  """Resolves ``param_labels`` against ``params`` into a :class:`GroupLayout`.

  Args:
    param_labels: ``None`` (one group), a pytree of labels with the
      parameters' structure or a prefix of it, or a callable ``params ->``
      such a pytree. A label leaf may be a :func:`per_slice` split.
    params: the parameters.

  Returns:
    The layout.

  Raises:
    ValueError: if the labels do not match the parameters.
  """
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  if not leaves_with_path:
    return _layout_without_leaves(param_labels, treedef)
  if param_labels is None:
    specs = tuple(LeafGroups(group=0) for _ in leaves_with_path)
    return GroupLayout((SINGLE_GROUP_LABEL,), specs, treedef)

  labels = param_labels(params) if callable(param_labels) else param_labels
  label_leaves = _broadcast_labels(labels, params)

  # One entry per leaf: (label, None) for a whole leaf, (names, axis) if split.
  per_leaf: list[tuple[Any, Union[int, None]]] = []
  for (path, leaf), label in zip(leaves_with_path, label_leaves):
    where = _path_str(path)
    if isinstance(label, SliceLabels):
      names = label.resolve(tuple(np.shape(leaf)), where)
      per_leaf.append((names, label.axis % len(np.shape(leaf))))
    else:
      try:
        hash(label)
      except TypeError as e:
        raise ValueError(
            f"param_labels: the label at {where} is not hashable: {label!r}"
        ) from e
      per_leaf.append((label, None))

  all_labels = set()
  for label, axis in per_leaf:
    all_labels.update(label if axis is not None else (label,))
  group_labels = _sort_labels(all_labels)
  index = {label: k for k, label in enumerate(group_labels)}
  specs = []
  for label, axis in per_leaf:
    if axis is None:
      specs.append(LeafGroups(group=index[label]))
    else:
      idx = np.asarray([index[n] for n in label], dtype=np.int32)
      specs.append(LeafGroups(axis=axis, slice_groups=idx))
  return GroupLayout(group_labels, tuple(specs), treedef)


def _layout_without_leaves(param_labels: LabelsOrFn, treedef: Any) -> GroupLayout:
  """Layout for a tree with no array leaves, with groups read off the labels.

  ``optax.tree.map_params`` initialises optimizers on such a placeholder tree
  to find the parameter-shaped parts of a state; Hi-DLR's state has none, but
  its group labels must still match the real state's.
  """
  if param_labels is None:
    return GroupLayout((SINGLE_GROUP_LABEL,), (), treedef)
  if callable(param_labels):
    raise ValueError(
        "scale_by_hidlr: params has no leaves, so callable param_labels cannot"
        " be resolved; pass the labels as a pytree"
    )
  names: set = set()
  for label in jax.tree.leaves(param_labels, is_leaf=_is_label):
    if isinstance(label, SliceLabels):
      if isinstance(label.labels, str):
        raise ValueError(
            "scale_by_hidlr: params has no leaves, so per_slice with a prefix"
            " cannot be resolved; give per_slice an explicit list of labels"
        )
      names.update(label.labels)
    else:
      names.add(label)
  return GroupLayout(_sort_labels(names), (), treedef)


def initial_rates(
    learning_rate: Union[float, jax.Array, Mapping[Label, float]],
    layout: GroupLayout,
) -> list:
  """Returns the initial learning rate of every group, in layout order.

  Raises:
    ValueError: if a mapping misses a group or names a label no parameter has.
  """
  if not isinstance(learning_rate, Mapping):
    return [learning_rate] * layout.num_groups
  given = set(learning_rate)
  missing = [l for l in layout.labels if l not in given]
  if missing:
    raise ValueError(
        f"learning_rate has no initial rate for the group(s) {missing}; it"
        f" gives rates for {_sort_labels(given)}"
    )
  unused = given - set(layout.labels)
  if unused:
    raise ValueError(
        f"learning_rate names label(s) {_sort_labels(unused)} that no"
        f" parameter carries; the groups are {list(layout.labels)}"
    )
  return [learning_rate[l] for l in layout.labels]
