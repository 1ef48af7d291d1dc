"""The scikit-learn face: LUAB classifiers on features and on images, kNN baselines, distillation."""

from .classifier import LUABClassifier
from .distill import GeneralizedDistillationClassifier
from .finetune import LUABFineTuner
from .knn import FaissGPUFallbackWarning, FaissKNNClassifier, KNNByproductImputer
from .two_stage import TwoStageLUABClassifier

__all__ = [
    "FaissGPUFallbackWarning",
    "FaissKNNClassifier",
    "GeneralizedDistillationClassifier",
    "KNNByproductImputer",
    "LUABClassifier",
    "LUABFineTuner",
    "TwoStageLUABClassifier",
]
