"""luab_sk: learning image classifiers from annotation byproducts, the scikit-learn way.

The main names are importable from the top level; they load on first use, so ``import luab_sk`` stays
light and ``luab_sk.byproducts`` works without importing torch.

Examples
--------
>>> import luab_sk
>>> luab_sk.LUABClassifier(byproduct_weight=0.5).byproduct_weight
0.5
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LUABClassifier": "luab_sk.estimators",
    "LUABFineTuner": "luab_sk.estimators",
    "FaissKNNClassifier": "luab_sk.estimators",
    "KNNByproductImputer": "luab_sk.estimators",
    "GeneralizedDistillationClassifier": "luab_sk.estimators",
    "TwoStageLUABClassifier": "luab_sk.estimators",
    "FeatureExtractor": "luab_sk.features",
    "ByproductEncoder": "luab_sk.byproducts",
    "read_imagenet_ab": "luab_sk.byproducts",
    "read_coco_ab": "luab_sk.byproducts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'luab_sk' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
