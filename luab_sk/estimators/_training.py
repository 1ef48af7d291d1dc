"""Former home of the training loop; everything now lives in :mod:`luab_sk.nn.engine` (re-exported here).

The engine is plain torch, so it moved below the estimators; this module keeps the old import path
(``from luab_sk.estimators._training import train_module``) working.
"""

from __future__ import annotations

from ..nn.engine import (
    Callback,
    Checkpoint,
    EarlyStopping,
    LossPlateau,
    LRScheduler,
    NonFiniteObjectiveError,
    ProgressLogger,
    Timer,
    Trainer,
    TrainResult,
    check_finite_objective,
    check_finite_parameters,
    l2_penalty,
    train_module,
)

__all__ = [
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "LRScheduler",
    "LossPlateau",
    "NonFiniteObjectiveError",
    "ProgressLogger",
    "Timer",
    "TrainResult",
    "Trainer",
    "check_finite_objective",
    "check_finite_parameters",
    "l2_penalty",
    "train_module",
]
