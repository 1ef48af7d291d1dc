"""The scikit-learn face: LUAB classifiers on features and on images, kNN baselines, distillation."""

from .classifier import LUABClassifier
from .distill import GeneralizedDistillationClassifier
from .finetune import LUABFineTuner
from .knn import FaissKNNClassifier, KNNByproductImputer

__all__ = [
    "FaissKNNClassifier",
    "GeneralizedDistillationClassifier",
    "KNNByproductImputer",
    "LUABClassifier",
    "LUABFineTuner",
]
