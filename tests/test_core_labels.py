"""Parameter groups: every label form, per-slice splits, and label errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hidlr_optax


PARAMS = {
    "encoder": {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)},
    "head": {"w": jnp.ones((2, 4)), "b": jnp.zeros(4)},
}
FULL_LABELS = {
    "encoder": {"w": "body", "b": "body"},
    "head": {"w": "head", "b": "head"},
}


def scale_with(param_labels, learning_rate=1.0):
  """Applies a fresh transformation to a unit direction; returns updates, state."""
  tx = hidlr_optax.scale_by_hidlr(learning_rate, param_labels, update_every=10**6)
  state = tx.init(PARAMS)
  state = state._replace(count=jnp.ones((), jnp.int32))  # not a refresh step
  ones = jax.tree.map(jnp.ones_like, PARAMS)
  updates, state = tx.update(ones, state, PARAMS, value_fn=lambda p: 0.0)
  return updates, state


@pytest.mark.parametrize(
    "labels",
    [
        FULL_LABELS,
        {"encoder": "body", "head": "head"},  # prefix
        lambda p: {"encoder": "body", "head": "head"},  # callable -> prefix
        lambda p: jax.tree.map(lambda _: "x", p) | {"head": {"w": "head", "b": "head"},
                                                     "encoder": {"w": "body", "b": "body"}},
    ],
    ids=["pytree", "prefix", "callable-prefix", "callable-full"],
)
def test_label_forms_give_the_same_groups(labels):
  updates, state = scale_with(labels, {"body": 0.1, "head": 0.5})
  assert list(hidlr_optax.learning_rates(state)) == ["body", "head"]
  np.testing.assert_allclose(updates["encoder"]["w"], -0.1)
  np.testing.assert_allclose(updates["head"]["b"], -0.5)


def test_none_labels_is_one_group():
  updates, state = scale_with(None, 0.3)
  assert list(hidlr_optax.learning_rates(state)) == [hidlr_optax.SINGLE_GROUP_LABEL]
  for u in jax.tree.leaves(updates):
    np.testing.assert_allclose(u, -0.3)


def test_per_slice_split_shares_labels_across_leaves():
  labels = {
      "encoder": "body",
      "head": {"w": hidlr_optax.per_slice(1, "task"), "b": hidlr_optax.per_slice(0, "task")},
  }
  rates = {"body": 1.0, **{f"task{i}": float(i + 1) for i in range(4)}}
  updates, state = scale_with(labels, rates)
  assert sorted(hidlr_optax.learning_rates(state)) == sorted(rates)
  np.testing.assert_allclose(updates["head"]["w"], -np.tile([1.0, 2, 3, 4], (2, 1)))
  np.testing.assert_allclose(updates["head"]["b"], -np.array([1.0, 2, 3, 4]))
  np.testing.assert_allclose(updates["encoder"]["w"], -1.0)


def test_per_slice_groups_are_fitted_separately():
  """Each column of a multi-output least-squares head gets its own Newton rate."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(50, 3)))
    scales = jnp.asarray([1.0, 10.0, 100.0])  # per-column loss weights
    w0 = jnp.asarray(rng.normal(size=(3, 3)))

    def loss(w):
      return jnp.sum(scales * jnp.mean((x @ w) ** 2, axis=0))

    tx = hidlr_optax.hidlr(
        optax.identity(), 1e-4, hidlr_optax.per_slice(1, ["c0", "c1", "c2"]),
        smoothing=0.0, max_growth=None,
    )
    state = tx.init(w0)
    updates, state = tx.update(jax.grad(loss)(w0), state, w0, value_fn=loss)
    rates = hidlr_optax.learning_rates(state)
    fits = hidlr_optax.fit_diagnostics(state)
    g = jax.grad(loss)(w0)
    hess = jax.hessian(loss)(w0)
    for j, label in enumerate(["c0", "c1", "c2"]):
      d = jnp.zeros_like(w0).at[:, j].set(g[:, j])
      want_b = jnp.vdot(g, d)
      want_a = jnp.einsum("ij,ijkl,kl->", d, hess, d)
      np.testing.assert_allclose(fits[label].slope, want_b, rtol=1e-6)
      np.testing.assert_allclose(fits[label].curvature, want_a, rtol=1e-6)
      np.testing.assert_allclose(rates[label], want_b / want_a, rtol=1e-6)
    # rates scale inversely with the column weights
    assert float(rates["c0"]) > 5 * float(rates["c1"]) > 25 * float(rates["c2"])


def test_labels_not_matching_params_fail_at_init():
  tx = hidlr_optax.scale_by_hidlr(1.0, {"encoder": "body", "decoder": "x"})
  with pytest.raises(ValueError, match="param_labels does not match"):
    tx.init(PARAMS)


def test_learning_rate_mapping_missing_a_group_fails_at_init():
  tx = hidlr_optax.scale_by_hidlr({"body": 1.0}, {"encoder": "body", "head": "head"})
  with pytest.raises(ValueError, match=r"no initial rate for the group\(s\) \['head'\]"):
    tx.init(PARAMS)


def test_learning_rate_mapping_with_unknown_label_fails_at_init():
  tx = hidlr_optax.scale_by_hidlr(
      {"body": 1.0, "head": 1.0, "neck": 1.0}, {"encoder": "body", "head": "head"}
  )
  with pytest.raises(ValueError, match="neck"):
    tx.init(PARAMS)


def test_per_slice_wrong_length_fails_at_init():
  tx = hidlr_optax.scale_by_hidlr(1.0, {"encoder": "b", "head": {"w": hidlr_optax.per_slice(1, ["a", "b"]), "b": "b"}})
  with pytest.raises(ValueError, match=r"2 labels given for 4 slices"):
    tx.init(PARAMS)


def test_per_slice_bad_axis_fails_at_init():
  tx = hidlr_optax.scale_by_hidlr(1.0, {"encoder": "b", "head": {"w": hidlr_optax.per_slice(2, "t"), "b": "b"}})
  with pytest.raises(ValueError, match="axis 2 is out of range"):
    tx.init(PARAMS)


def test_unsortable_labels_fail_at_init():
  tx = hidlr_optax.scale_by_hidlr(1.0, {"encoder": 0, "head": "head"})
  with pytest.raises(TypeError, match="mutually sortable"):
    tx.init(PARAMS)


def test_state_from_other_labels_is_rejected_at_update():
  tx_a = hidlr_optax.scale_by_hidlr(1.0, {"encoder": "body", "head": "head"})
  tx_b = hidlr_optax.scale_by_hidlr(1.0, {"encoder": "x", "head": "y"})
  with pytest.raises(ValueError, match="the state has groups"):
    tx_b.update(PARAMS, tx_a.init(PARAMS), PARAMS, value_fn=lambda p: 0.0)


def test_accessors_reach_into_wrappers():
  labels = {"encoder": "body", "head": "head"}
  base = hidlr_optax.hidlr(optax.scale_by_adam(), {"body": 0.1, "head": 0.2}, labels)
  wrapped = [
      base,
      optax.MultiSteps(base, every_k_schedule=2),
      optax.chain(optax.clip_by_global_norm(1.0), base),
      optax.chain(
          optax.scale_by_adam(),
          optax.inject_hyperparams(
              hidlr_optax.scale_by_hidlr, static_args=hidlr_optax.STATIC_ARGS
          )({"body": 0.1, "head": 0.2}, labels),
      ),
  ]
  for tx in wrapped:
    state = tx.init(PARAMS)
    rates = hidlr_optax.learning_rates(state)
    assert {k: float(v) for k, v in rates.items()} == pytest.approx({"body": 0.1, "head": 0.2})
    assert set(hidlr_optax.fit_diagnostics(state)) == {"body", "head"}


def test_accessor_errors():
  with pytest.raises(ValueError, match="no Hi-DLR state"):
    hidlr_optax.learning_rates(optax.adam(1.0).init(PARAMS))
  two = optax.chain(hidlr_optax.gen(optax.identity()), hidlr_optax.gen(optax.identity()))
  with pytest.raises(ValueError, match="2 Hi-DLR states"):
    hidlr_optax.learning_rates(two.init(PARAMS))
