"""hidlr-optax: Hessian-informed differential learning rates for optax.

Hi-DLR (Xu, Bu, Zhang & Barnett) sets one learning rate per parameter group
from a quadratic fit of the loss along the base optimizer's direction; with a
single group it is GeN (Bu & Xu, arXiv:2407.02772).
"""

from hidlr_optax._grouping import SINGLE_GROUP_LABEL, SliceLabels, per_slice
from hidlr_optax._state import GroupFit, LossGuard, PerGroup, ScaleByHiDLRState
from hidlr_optax._diagnostics import (
    check_direction,
    find_states,
    fit_diagnostics,
    learning_rates,
    unresolved_groups,
)
from hidlr_optax._types import Estimate, Line
from hidlr_optax._probe import ProbeEstimator
from hidlr_optax._jvp import JvpEstimator
from hidlr_optax._secant import SecantEstimator
from hidlr_optax._transform import STATIC_ARGS, gen, hidlr, scale_by_hidlr
from hidlr_optax._multi_steps import multi_steps
from hidlr_optax._hyperparams import find_hyperparams, set_hyperparams
from hidlr_optax._train_step import make_nnx_train_step, make_train_step
from hidlr_optax import labels

__version__ = "0.1.0"

__all__ = [
    "Estimate",
    "GroupFit",
    "JvpEstimator",
    "Line",
    "LossGuard",
    "PerGroup",
    "ProbeEstimator",
    "SINGLE_GROUP_LABEL",
    "STATIC_ARGS",
    "SecantEstimator",
    "ScaleByHiDLRState",
    "SliceLabels",
    "check_direction",
    "find_hyperparams",
    "find_states",
    "fit_diagnostics",
    "gen",
    "hidlr",
    "labels",
    "learning_rates",
    "make_nnx_train_step",
    "make_train_step",
    "multi_steps",
    "per_slice",
    "scale_by_hidlr",
    "set_hyperparams",
    "unresolved_groups",
]
