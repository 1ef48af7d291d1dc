"""luab_sk: learning image classifiers from annotation byproducts, the scikit-learn way."""

__version__ = "0.1.0"
