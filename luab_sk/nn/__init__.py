"""Plain torch modules and losses for multitask learning from labels and annotation byproducts.

Nothing here knows scikit-learn; the heads do not care where their input comes from, so the same heads
sit on cached embeddings (:class:`luab_sk.estimators.classifier.LUABClassifier`) and on a backbone being
fine-tuned. :mod:`luab_sk.nn.engine` is the one training engine every estimator trains through (and
the one definition of ``alpha``, ``tol`` and ``max_iter``).
"""

from .engine import (
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
    l2_penalty,
    train_module,
)
from .heads import (
    HEADS,
    AttentionHead,
    HeadOutput,
    HeadSpec,
    PooledHead,
    build_head,
    head_spec,
    token_centers,
)
from .init import FeatureMoments, feature_moments, reduced_rank_init_, whitened
from .losses import (
    MultitaskLoss,
    gaussian_heatmap,
    heatmap_loss,
    label_loss,
    masked_regression_loss,
    multitask_loss,
    point_loss,
    prior_label_loss,
    soft_argmax,
)

__all__ = [
    "HEADS",
    "AttentionHead",
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "HeadSpec",
    "LRScheduler",
    "LossPlateau",
    "NonFiniteObjectiveError",
    "ProgressLogger",
    "Timer",
    "TrainResult",
    "Trainer",
    "head_spec",
    "l2_penalty",
    "train_module",
    "FeatureMoments",
    "HeadOutput",
    "MultitaskLoss",
    "PooledHead",
    "build_head",
    "feature_moments",
    "gaussian_heatmap",
    "heatmap_loss",
    "label_loss",
    "masked_regression_loss",
    "multitask_loss",
    "point_loss",
    "prior_label_loss",
    "reduced_rank_init_",
    "soft_argmax",
    "token_centers",
    "whitened",
]
