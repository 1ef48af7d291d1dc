"""Generalized distillation (Lopez-Paz, Bottou, Schölkopf and Vapnik, ICLR 2016) as a byproduct baseline.

A *teacher* is trained on privileged information available only at training time (the byproducts Z, or X and
Z together); a *student* that sees only X then learns to match a mix of the hard labels and the teacher's soft
labels. With annotation byproducts as the privileged information, this is the classical alternative to the
multitask route of :class:`~luab_sk.estimators.classifier.LUABClassifier`.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.utils import check_array
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .._param_validation import Device, HasMethods, Integral, Interval, Real, StrOptions, _fit_context
from .._utils import resolve_device
from ..nn.engine import Trainer

__all__ = ["GeneralizedDistillationClassifier"]


class GeneralizedDistillationClassifier(ClassifierMixin, BaseEstimator):
    """Linear student on X distilled from a teacher trained on privileged byproducts Z.

    Training follows Lopez-Paz et al. (2016): (1) fit the teacher on the privileged input (``Z``, or
    ``[X, Z]``) of the samples whose Z is observed; (2) compute soft labels ``s_i = softmax(f_t(x*_i) / T)``;
    (3) fit a multinomial logistic student ``f_s`` on X by minimising

    ``mean_i [(1 - lambda_i) CE(y_i, softmax(f_s(x_i))) + lambda_i CE(s_i, softmax(f_s(x_i)))]
    + alpha / 2 * ||W||^2``

    with ``lambda_i = imitation`` where Z is observed and 0 where it is missing (those samples only see their
    hard label). The student is fitted full-batch by the L-BFGS of the training engine
    (:meth:`luab_sk.nn.Trainer.fit_full_batch`) on standardised X, in float64.

    Parameters
    ----------
    teacher : sklearn classifier with ``predict_proba``, or None, default=None
        Teacher model; None means ``LogisticRegression(C=1.0, max_iter=1000)``. It is cloned before fitting.
    teacher_input : {"z", "xz"}, default="xz"
        What the teacher sees: the privileged Z alone, or X concatenated with Z.
    temperature : float > 0, default=2.0
        Softmax temperature T applied to the teacher's log-probabilities.
    imitation : float in [0, 1], default=0.5
        Imitation parameter lambda: weight of the teacher's soft labels against the hard labels.
    alpha : float >= 0, default=2e-3
        L2 penalty ``alpha / 2 * ||W||^2`` on the student's weights (on standardised features; the bias is
        not penalised): the one meaning of ``alpha`` in luab_sk (:mod:`luab_sk.nn.engine`). Before the
        training engine this estimator penalised ``alpha * ||W||^2`` with a default of 1e-3: the same
        objective as the new default.
    max_iter : int, default=200
        Maximum L-BFGS iterations of the student (:mod:`luab_sk.nn.engine`).
    tol : float, default=1e-7
        L-BFGS stops once the largest absolute entry of the objective's gradient is at most ``tol``
        (scikit-learn's ``gtol``; see :mod:`luab_sk.nn.engine`).
    device : str, default="auto"
        Torch device of the student fit (see :func:`luab_sk._utils.resolve_device`).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels.
    teacher_ : estimator
        The fitted teacher.
    coef_ : ndarray of shape (n_classes, n_features)
        Student weights on the original (unstandardised) features.
    intercept_ : ndarray of shape (n_classes,)
        Student biases.
    n_iter_ : int
        L-BFGS iterations used by the student.
    n_features_in_ : int
        Number of features of X.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(80, 5)); y = (X[:, 0] > 0).astype(int)
    >>> Z = np.c_[y + 0.1 * rng.normal(size=80), rng.normal(size=80)]  # privileged, nearly the label
    >>> Z[::7] = np.nan  # some samples have no byproduct
    >>> clf = GeneralizedDistillationClassifier(temperature=2.0, imitation=0.5).fit(X, y, Z=Z)
    >>> clf.score(X, y) > 0.9
    True
    """

    __metadata_request__fit = {"Z": True}

    def __init__(
        self,
        *,
        teacher=None,
        teacher_input="xz",
        temperature=2.0,
        imitation=0.5,
        alpha=2e-3,
        max_iter=200,
        tol=1e-7,
        device="auto",
    ):
        self.teacher = teacher
        self.teacher_input = teacher_input
        self.temperature = temperature
        self.imitation = imitation
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol
        self.device = device

    _parameter_constraints: dict = {
        "teacher": [HasMethods(["fit", "predict_proba"]), None],
        "teacher_input": [StrOptions({"z", "xz"})],
        "temperature": [Interval(Real, 0, None, closed="neither")],
        "imitation": [Interval(Real, 0, 1, closed="both")],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "device": [Device()],
    }

    def _check_Z(self, Z, n_samples):
        if Z is None:
            raise ValueError(
                "GeneralizedDistillationClassifier needs the privileged byproducts: call fit(X, y, Z=Z)."
            )
        if isinstance(Z, dict):
            raise ValueError("Z must be an array of shape (n_samples, k), not a dict (it would not be split)")
        Z = check_array(Z, dtype=np.float64, ensure_all_finite="allow-nan", input_name="Z")
        if len(Z) != n_samples:
            raise ValueError(f"Z has {len(Z)} rows but X has {n_samples} samples; they must match.")
        return Z

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, Z=None):
        """Fit the teacher on the privileged input, then distill it into the student on X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Features the student sees (at training and test time).
        y : array-like of shape (n_samples,)
            Labels.
        Z : array-like of shape (n_samples, k)
            Privileged byproducts, NaN where missing; a row with any NaN is treated as missing (the sample
            then contributes only its hard label).

        Returns
        -------
        self : GeneralizedDistillationClassifier
        """
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        Z = self._check_Z(Z, len(X))
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"y must contain at least two classes, got {self.classes_.tolist()}.")
        observed = ~np.isnan(Z).any(axis=1)
        if not observed.any():
            raise ValueError("Z has no fully observed row: the teacher has nothing to learn from.")
        if len(np.unique(y_idx[observed])) < 2:
            raise ValueError("the samples with an observed Z cover a single class: the teacher cannot learn.")

        privileged = Z if self.teacher_input == "z" else np.hstack([X, Z])
        teacher = LogisticRegression(max_iter=1000) if self.teacher is None else self.teacher
        self.teacher_ = clone(teacher).fit(privileged[observed], y_idx[observed])
        soft = np.zeros((len(X), len(self.classes_)))
        log_p = np.log(np.clip(self.teacher_.predict_proba(privileged[observed]), 1e-12, 1.0))
        soft[np.ix_(observed, self.teacher_.classes_)] = _softmax(log_p / self.temperature)
        weight = np.where(observed, float(self.imitation), 0.0)
        self._fit_student(X, y_idx, soft, weight)
        return self

    def _fit_student(self, X, y_idx, soft, weight):
        device = resolve_device(self.device)
        mean, scale = X.mean(axis=0), X.std(axis=0)
        scale[scale == 0] = 1.0
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float64, device=device)  # noqa: E731
        Xs, soft_t, w = as_tensor((X - mean) / scale), as_tensor(soft), as_tensor(weight)
        y_t = torch.as_tensor(y_idx, device=device)
        k = len(self.classes_)
        # Built on the meta device (no random numbers drawn), then zeroed: the student starts at W = 0, b = 0.
        student = torch.nn.Linear(X.shape[1], k, dtype=torch.float64, device="meta").to_empty(device=device)
        torch.nn.init.zeros_(student.weight)
        torch.nn.init.zeros_(student.bias)

        def objective(module):
            log_p = torch.log_softmax(module(Xs), dim=1)
            hard = -log_p.gather(1, y_t[:, None]).squeeze(1)
            imitate = -(soft_t * log_p).sum(dim=1)
            return ((1 - w) * hard + w * imitate).mean()

        result = Trainer(student).fit_full_batch(
            objective, (), max_iter=self.max_iter, tol=self.tol, alpha=self.alpha
        )
        W_np, b_np = (p.detach().cpu().numpy() for p in (student.weight, student.bias))
        self.coef_ = W_np / scale
        self.intercept_ = b_np - self.coef_ @ mean
        self.n_iter_ = result.n_iter

    def __sklearn_is_fitted__(self):
        return hasattr(self, "coef_")

    def _logits(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return X @ self.coef_.T + self.intercept_

    def decision_function(self, X):
        """Student scores: log-odds of ``classes_[1]`` (n_samples,) for two classes, else logits.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray
        """
        logits = self._logits(X)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict_proba(self, X):
        """Student class probabilities.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        return _softmax(self._logits(X))

    def predict(self, X):
        """Predicted class labels (from ``classes_``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        logits = self._logits(X)
        return self.classes_[logits.argmax(axis=1)]


def _softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
