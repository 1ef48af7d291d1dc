"""LUABClassifier: a classifier on frozen features that also learns from annotation byproducts."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from .._grid import infer_grid
from .._param_validation import Integral, Interval, Real, StrOptions, _fit_context
from .._utils import resolve_device
from ..nn import (
    HEADS,
    Timer,
    TrainResult,
    build_head,
    feature_moments,
    head_spec,
    label_loss,
    multitask_loss,
    prior_label_loss,
    reduced_rank_init_,
    train_module,
    whitened,
)
from ..nn.engine import EarlyStopping, check_finite_objective, check_finite_parameters
from ..nn.solvers import LinearProbeFit, fit_linear_head, fit_linear_probe_minibatch, head_map
from ._base import (
    LUABClassifierMixin,
    check_warm_head,
    nan_standardization,
    seed_from,
    streaming_standardization,
    validation_split,
)

__all__ = ["LUABClassifier"]

# Every byproduct_target some head supports (each head's HeadSpec says which ones it takes).
BYPRODUCT_TARGETS = tuple(dict.fromkeys(t for spec in HEADS.values() for t in spec.targets))
# solver="auto" uses full-batch L-BFGS up to this many input elements (samples x width); above, the linear
# head's streaming mini-batch solver, and AdamW for the other heads.
_LBFGS_MAX_ELEMENTS = 100_000_000
# Token rows used to fit the width-reducing PCA of the attention head.
_PCA_MAX_ROWS = 20_000
_PREDICT_CHUNK = 8192
# The fitted-versus-prior label loss check runs on an evenly strided subsample of about this many rows,
# and warns when the fitted loss exceeds the prior's by this relative (and absolute) margin.
_PRIOR_CHECK_ROWS = 8192
_PRIOR_MARGIN = 1e-2
# The convex solver needs tol > 0 (its nuclear norm is smoothed at tol / 10): tol=0 is raised to this.
_CONVEX_MIN_TOL = 1e-10


class LUABClassifier(LUABClassifierMixin, ClassifierMixin, BaseEstimator):
    """Classifier on frozen features trained with labels and annotation byproducts (LUAB).

    A shared trunk (a linear bottleneck, an MLP, or attention pooling over tokens) feeds a label head
    and a byproduct head; the loss is the label loss plus ``byproduct_weight`` times the byproduct loss
    (Han et al., "Neglected Free Lunch", ICCV 2023). Because the trunk is shared, the byproducts shape
    the representation the label head reads, and the byproduct weight changes the classifier.
    Byproducts are only needed in ``fit``; prediction uses X alone.

    Parameters
    ----------
    head : {"mlp", "linear", "attention"}, default="mlp"
        ``"linear"``: a linear bottleneck of rank ``hidden_size`` shared by both heads. ``"mlp"``:
        ``n_layers`` shared ReLU layers of width ``hidden_size``. ``"attention"``: X holds tokens
        (n_samples, L, C) on a ``grid_shape`` grid; learned queries pool them, the label head reads the
        pooled vector, and the byproducts (click points) supervise the attention map.
    hidden_size : int, default=128
        Bottleneck rank, hidden width, or projected token width (attention). The linear head's rank is
        capped at ``min(n_features, n_outputs + n_byproducts)``: a larger rank represents no other map
        and has the same optimum, only slower.
    n_layers : int, default=1
        Hidden layers of the ``"mlp"`` head.
    byproduct_weight : float, default=1.0
        Weight of the byproduct loss; 0 (or ``Z=None``) trains a plain classifier.
    byproduct_loss : {"smooth_l1", "l2", "l1"}, default="smooth_l1"
        Elementwise loss for ``byproduct_target="regression"`` and ``"point"``. ``"l1"`` is not
        differentiable at a zero residual, so no gradient-based stop rule is met exactly: full-batch fits
        with it usually run to ``max_iter`` and warn (``ConvergenceWarning``); ``"smooth_l1"`` (Huber,
        quadratic within 1 of the target) is the smooth alternative.
    byproduct_target : {"auto", "regression", "heatmap", "point"}, default="auto"
        How Z is used. ``"regression"`` (pooled heads): regress Z's columns. For the attention head,
        Z holds click points (x, y) in [0, 1], one per sample (n, 2) or one per class (n, 2 * n_classes);
        ``"heatmap"``: KL divergence between the attention map and a Gaussian of width ``sigma`` around
        the click; ``"point"``: the map's soft-argmax regressed to the click. ``"auto"`` picks
        ``"regression"`` for pooled heads and ``"heatmap"`` for the attention head.
    sigma : float, default=0.1
        Width of the click Gaussian, as a fraction of the image side.
    grid_shape : tuple of int, optional
        ``(grid_h, grid_w)`` of the token grid (attention); None infers a square grid from L.
    n_heads : int, default=1
        Learned queries of the attention head (their maps are averaged into the byproduct map).
    glimpse : float, optional
        Attention head: pool through a Gaussian window of this width (fraction of the image side)
        around each map's peak token, in training and prediction (see
        :class:`~luab_sk.nn.AttentionHead`). It keeps background shortcuts out of the pooled vector
        once the clicks have taught the map where the object is.
    n_components : int or None, default=64
        Attention head: reduce the token width once with a PCA (whitened when ``standardize``) fitted on
        the training tokens, keeping fits fast; None keeps the full width.
    alpha : float, default=1e-4
        L2 penalty: ``alpha / 2`` times the squared norm of every weight matrix, added to the mean loss (the
        one meaning in luab_sk, defined in :mod:`luab_sk.nn.engine`).
    solver : {"auto", "lbfgs", "adamw", "minibatch"}, default="auto"
        ``"lbfgs"``: full-batch :class:`torch.optim.LBFGS` (strong Wolfe line search), for small and
        medium problems. ``"adamw"``: mini-batch AdamW. ``"minibatch"`` (the linear head only): the
        streaming solver :func:`~luab_sk.nn.solvers.fit_linear_probe_minibatch`, for probes too large
        for full-batch solvers: X (for example a ``numpy.memmap`` of cached embeddings) is read in
        contiguous blocks of ``batch_size`` rows and standardised per block, never copied whole; Adam at
        ``learning_rate`` with a warm-up and a cosine decay over ``max_iter`` epochs, the nuclear-norm
        penalty applied by periodic singular-value shrinkage; it stops early when the epoch objective has
        not fallen by ``tol`` (relative) for ``n_iter_no_change`` epochs, or with ``early_stopping``
        as below (the validation rows are copied, the training rows still streamed). Memory: one batch
        plus the parameters and Adam's moments (and the validation rows). ``"auto"``: L-BFGS up to 1e8
        input elements (samples x width), above that ``"minibatch"`` for the linear head (without
        ``impute_byproducts``) and ``"adamw"`` otherwise. For large probes set ``max_iter`` to the
        epochs you can afford (5-20), ``batch_size`` to a few thousand and ``learning_rate`` to about
        1e-2 (what ``benchmarks/large_probe.py`` measured), and ``hidden_size`` to at least the number
        of classes (a smaller bottleneck truncates the map's rank).
        The linear head with ``"lbfgs"`` (and no ``early_stopping``) is trained by its convex form
        instead (:func:`~luab_sk.nn.solvers.fit_linear_head`): the ``alpha / 2`` penalty on both factors
        equals ``alpha`` times the nuclear norm of their product ``M = W2 @ W1`` at the optimum, so the
        same objective is minimised over ``M`` (label and byproduct rows) by L-BFGS with a smoothed
        nuclear norm, in whitened coordinates where that pays (the byproduct rows, and the label rows when
        the feature variance is concentrated and the covariance cheap; see
        :func:`~luab_sk.nn.solvers.fit_linear_probe`) from a ridge start, finished by exact proximal steps
        when it stalls; the balanced factors of ``M`` are loaded into the head. Convex and
        deterministic: no spurious stationary points, and the seed does not matter. When
        ``hidden_size`` caps the rank below ``min(n_features, n_outputs + n_byproducts)`` the problem
        is rank constrained (not convex) and rank-capped proximal gradient steps finish the solve.
        Otherwise (AdamW, or L-BFGS with ``early_stopping``, which monitors every iteration) the linear
        head starts from reduced-rank ridge regression of the labels and byproducts on X
        (:func:`~luab_sk.nn.reduced_rank_init_`, deterministic), and L-BFGS optimises its trunk in
        whitened coordinates (:func:`~luab_sk.nn.whitened`; same objective, better conditioned).
    max_iter : int, default=200
        Maximum L-BFGS iterations or AdamW epochs (see :mod:`luab_sk.nn.engine`).
    tol : float, default=1e-4
        Stopping tolerance, as defined once in :mod:`luab_sk.nn.engine`: L-BFGS stops when the largest
        absolute gradient entry of the training objective (mean loss plus the L2 term, including the byproduct
        loss) with respect to the optimised parameters (the linear head's trunk in whitened coordinates, see
        ``solver``) is at most ``tol`` (scikit-learn's ``gtol``), with a stall guard; AdamW stops when the
        epoch loss has not fallen by ``tol`` for ``n_iter_no_change`` epochs, and with ``early_stopping`` a
        validation score must improve by more than ``tol`` to reset the patience. The convex solver of the
        linear head (see ``solver``) uses the prox-gradient optimality rule, ``gtol`` carried over to the
        non-smooth objective: it stops when the largest entry of ``M - prox(M - grad f(M))`` (unit step,
        the prox of ``alpha ||.||_*``; zero exactly at the optimum) and of the bias gradient is at most
        ``tol`` and the quasi-Newton estimate of the remaining decrease is at most ``tol`` (see
        :func:`~luab_sk.nn.solvers.fit_linear_probe`); ``tol=0`` is raised to 1e-10 there.
    batch_size : int, default=256
        AdamW mini-batch size.
    learning_rate : float, default=1e-3
        AdamW learning rate.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the training data (stratified when possible), stop when the
        validation label loss has not improved for ``n_iter_no_change`` iterations/epochs, and keep the
        best parameters.
    validation_fraction : float, default=0.1
    n_iter_no_change : int, default=10
    standardize : bool, default=True
        Standardise X (per feature or token channel) and regression byproducts (per column) inside the
        estimator; ``predict_byproducts`` returns Z's units.
    impute_byproducts : {None, "knn"}, default=None
        ``"knn"``: fill the all-missing rows of Z in ``fit`` with
        :class:`~luab_sk.estimators.knn.KNNByproductImputer` (tokens are mean-pooled for the search).
    n_impute_neighbors : int, default=5
        Neighbours of the kNN imputer.
    warm_start : bool, default=False
        Continue training the fitted head for up to ``max_iter`` more iterations (a new optimiser), with
        the input scaling of the first fit. The classes and Z's columns must match the first fit.
    device : str, default="auto"
        ``"auto"`` uses CUDA when available.
    random_state : int, RandomState instance or None, default=None
        Seeds initialisation, shuffling, the validation split and the PCA; an int gives identical
        predictions on every fit, in any thread or process (the fit draws from local generators, never
        from torch's global one).
    verbose : int, default=0
        Print the objective every iteration/epoch.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels (``arange(n_labels)`` for multi-label y).
    task_ : {"binary", "multiclass", "multilabel"}
    module_ : torch.nn.Module
        The trained head (a :class:`~luab_sk.nn.PooledHead` or :class:`~luab_sk.nn.AttentionHead`).
    n_iter_ : int
        Iterations (L-BFGS, or the convex solver's L-BFGS and proximal steps) or epochs (AdamW) run.
    epoch_times_, epoch_cpu_times_ : list of float
        Wall-clock and CPU seconds of every iteration/epoch (the engine's :class:`~luab_sk.nn.Timer` hook);
        one entry, the whole solve, for the convex solver of the linear head.
    loss_curve_ : list of float
        Training objective per iteration/epoch. The convex solver's curve starts with the objective at
        its starting point and holds ``f + alpha ||M||_*`` (smoothed during its L-BFGS phase; see
        :class:`~luab_sk.nn.solvers.LinearProbeFit`).
    validation_scores_ : list of float
        Negative validation label loss per iteration/epoch (with ``early_stopping``).
    n_byproducts_ : int
        Columns of the Z used in training (0 when trained without byproducts).
    byproduct_target_ : str
        The resolved ``byproduct_target``.
    grid_shape_ : tuple of int
        Token grid (attention head only).
    token_pca_ : PCA or None
        Width reduction of the tokens (attention head only).
    n_features_in_ : int
        Features of X (tokens per sample, L, for the attention head).

    Examples
    --------
    >>> from luab_sk.datasets.synthetic import make_embedding_classification
    >>> X, y, Z = make_embedding_classification(300, 32, n_classes=3, random_state=0)
    >>> clf = LUABClassifier(head="linear", hidden_size=16, byproduct_weight=1.0, random_state=0)
    >>> clf.fit(X, y, Z=Z).predict(X[:3]).shape
    (3,)
    >>> clf.predict_byproducts(X[:3]).shape == (3, Z.shape[1])
    True
    """

    def __init__(
        self,
        head="mlp",
        *,
        hidden_size=128,
        n_layers=1,
        byproduct_weight=1.0,
        byproduct_loss="smooth_l1",
        byproduct_target="auto",
        sigma=0.1,
        grid_shape=None,
        n_heads=1,
        glimpse=None,
        n_components=64,
        alpha=1e-4,
        solver="auto",
        max_iter=200,
        tol=1e-4,
        batch_size=256,
        learning_rate=1e-3,
        early_stopping=False,
        validation_fraction=0.1,
        n_iter_no_change=10,
        standardize=True,
        impute_byproducts=None,
        n_impute_neighbors=5,
        warm_start=False,
        device="auto",
        random_state=None,
        verbose=0,
    ):
        self.head = head
        self.hidden_size = hidden_size
        self.n_layers = n_layers
        self.byproduct_weight = byproduct_weight
        self.byproduct_loss = byproduct_loss
        self.byproduct_target = byproduct_target
        self.sigma = sigma
        self.grid_shape = grid_shape
        self.n_heads = n_heads
        self.glimpse = glimpse
        self.n_components = n_components
        self.alpha = alpha
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.standardize = standardize
        self.impute_byproducts = impute_byproducts
        self.n_impute_neighbors = n_impute_neighbors
        self.warm_start = warm_start
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    _parameter_constraints: dict = {
        **LUABClassifierMixin._parameter_constraints,
        "n_layers": [Interval(Integral, 1, None, closed="left")],
        "byproduct_target": [StrOptions({"auto", *BYPRODUCT_TARGETS})],
        "grid_shape": [tuple, list, None],
        "glimpse": [Interval(Real, 0, None, closed="neither"), None],
        "n_components": [Interval(Integral, 1, None, closed="left"), None],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "solver": [StrOptions({"auto", "lbfgs", "adamw", "minibatch"})],
        "standardize": ["boolean"],
        "impute_byproducts": [StrOptions({"knn"}), None],
        "n_impute_neighbors": [Interval(Integral, 1, None, closed="left")],
    }

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, Z=None, sample_weight=None):
        """Train on features X, labels y and (optionally) byproducts Z.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), or (n_samples, L, C) for ``head="attention"``
            Finite features or tokens.
        y : array-like of shape (n_samples,) or (n_samples, n_labels)
            Class labels of any type, or a 0/1 indicator matrix for multi-label problems.
        Z : array-like of shape (n_samples, n_byproducts), optional
            Byproducts, NaN for missing elements (masked out of the loss). Must be an array with one
            row per sample so that cross-validation and pipelines split it with X.
        sample_weight : array-like of shape (n_samples,), optional
            Finite, non-negative weights, not all zero.

        Returns
        -------
        self : LUABClassifier

        Raises
        ------
        luab_sk.nn.NonFiniteObjectiveError
            When the training objective becomes NaN or infinite; the estimator is then left unfitted (or,
            with ``warm_start``, as the previous fit left it).
        """
        byproduct_target = self._resolve_byproduct_target()
        spatial = head_spec(self.head).spatial
        warm = self.warm_start and hasattr(self, "module_")
        if warm:
            check_warm_head(self, self.module_.kind)
        X, y = validate_data(
            self,
            X,
            y,
            reset=not warm,
            allow_nd=spatial,
            dtype=np.float32,
            multi_output=True,
            ensure_min_samples=2,
        )
        self._check_x_rank(X)
        labels, n_outputs, Z, device, _ = self._fit_preamble(
            y, Z, X.shape[0], click_points=spatial, warm=warm
        )
        sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float32, ensure_non_negative=True)
        if Z is not None and self.impute_byproducts == "knn":
            _check_impute_neighbors(Z, self.n_impute_neighbors)
        seed = seed_from(self.random_state)
        solver = self._resolve_solver(X)
        streaming = solver == "minibatch"
        if streaming:
            self._check_minibatch()

        if warm:
            X = X if streaming else self._transform_input(self._check_tokens(X))
        else:
            # A fresh fit forgets the previous model first: should it fail, the estimator is unfitted.
            vars(self).pop("module_", None)
            self.classes_, self.task_ = labels.classes, labels.task
            if streaming:  # X (a memmap, say) is read block by block and standardised per batch
                self.token_pca_ = None
                if self.standardize:
                    self.x_mean_, self.x_scale_ = (a.astype(np.float32) for a in streaming_standardization(X))
            else:
                X = self._fit_input_transform(X, seed)
        self.byproduct_target_ = byproduct_target
        if Z is not None and self.impute_byproducts == "knn":
            Z = self._impute(X, Z)
        if not warm:
            self.n_byproducts_ = 0 if Z is None else Z.shape[1]
            if Z is not None and not spatial and self.standardize:
                self.z_mean_, self.z_scale_ = (a.astype(np.float32) for a in nan_standardization(Z))
            else:
                self.z_mean_ = self.z_scale_ = None
        if Z is not None and self.z_scale_ is not None:
            Z = (Z - self.z_mean_) / self.z_scale_

        # Trained as a local module (a copy, when warm-starting) and kept only when training succeeds.
        if warm:
            module = copy.deepcopy(self.module_).to(device)
        else:
            module = self._build(X.shape[-1], n_outputs, seed, device)
        timer = Timer(device)
        if streaming:
            result = self._fit_minibatch(module, X, labels, Z, sample_weight, device, warm, seed, timer)
            return self._finish_fit(module, result, solver, timer, None)

        data = [
            _tensor(X, device),
            torch.as_tensor(labels.y, device=device),
            None,
            _tensor(sample_weight, device),
        ]
        if Z is not None:
            data[2] = _tensor(Z, device)
        validation = None
        if self.early_stopping:
            split = validation_split(labels, self.validation_fraction, seed)
            train_index, val_index = (torch.as_tensor(i, device=device) for i in split)
            x_all, y_all, _, w_all = data
            validation = ([x_all[val_index], y_all[val_index], w_all[val_index]], self._validation_score)
            data = [None if t is None else t[train_index] for t in data]
        if head_spec(self.head).convex_solver and solver == "lbfgs" and validation is None:
            result = self._fit_convex(module, data, device=device, warm=warm, timer=timer)
        else:
            precondition = self._closed_form_start(module, data, solver=solver, warm=warm)
            generator = torch.Generator().manual_seed(seed)
            with precondition:
                result = train_module(
                    module,
                    self._objective,
                    data,
                    solver=solver,
                    max_iter=self.max_iter,
                    tol=self.tol,
                    alpha=self.alpha,
                    batch_size=self.batch_size,
                    learning_rate=self.learning_rate,
                    n_iter_no_change=self.n_iter_no_change,
                    validation=validation,
                    generator=generator,
                    verbose=self.verbose,
                    callbacks=[timer],
                )
        return self._finish_fit(module, result, solver, timer, (data, n_outputs))

    def _finish_fit(self, module, result, solver, timer, prior_check):
        """Keep the trained module and its record; warn on no convergence (and, given the training data,
        when the fit is worse than predicting the class frequencies)."""
        self.module_ = module
        self.n_iter_ = result.n_iter
        self.loss_curve_ = result.loss_curve
        self.validation_scores_ = result.validation_scores
        self.epoch_times_, self.epoch_cpu_times_ = timer.wall, timer.cpu
        if not result.converged:
            if result.n_iter < self.max_iter:  # the solver could not lower the objective any further
                why = (
                    f"stopped after {result.n_iter} of max_iter={self.max_iter} iterations, short of "
                    f"tol={self.tol} (no further decrease at this precision); increase tol."
                )
            else:
                why = f"did not converge in max_iter={self.max_iter} iterations; increase max_iter or tol."
            warnings.warn(f"LUABClassifier ({solver}) {why}", ConvergenceWarning, stacklevel=3)
        if prior_check is not None:
            self._warn_if_worse_than_prior(*prior_check, solver)
        return self

    def _check_minibatch(self):
        if not head_spec(self.head).convex_solver:
            raise ValueError(
                f"solver='minibatch' trains the linear head only, got head={self.head!r}; use 'adamw'."
            )
        if self.impute_byproducts is not None:
            raise ValueError(
                "impute_byproducts='knn' needs all of X in memory, which solver='minibatch' avoids; impute Z "
                "beforehand (KNNByproductImputer) or use solver='lbfgs' or 'adamw'."
            )

    def _fit_minibatch(self, module, X, labels, Z, sample_weight, device, warm, seed, timer):
        """Train the linear head by :func:`~luab_sk.nn.solvers.fit_linear_probe_minibatch`, in place.

        X is read in contiguous blocks of ``batch_size`` rows and standardised per block (a memmap is
        never copied); the map ``M`` (label rows over byproduct rows) is trained with Adam under the
        nuclear-norm penalty of the head's objective, and its balanced factors are loaded into the head.
        With ``early_stopping`` the validation rows are copied (only they), get weight 0 in the stream,
        and the engine's :class:`~luab_sk.nn.engine.EarlyStopping` scores the head after every epoch and
        restores the best one.
        """
        use_z = Z is not None and module.byproduct_head is not None and self.byproduct_weight > 0
        init = head_map(module, use_z) if warm else None  # continue from the head's current map
        K = module.label_head.out_features
        tracker, callback = None, None
        if self.early_stopping:
            _, val_index = validation_split(labels, self.validation_fraction, seed)
            x_val = np.asarray(X[val_index], dtype=np.float32)
            weights = np.ones(X.shape[0], np.float32) if sample_weight is None else sample_weight.copy()
            data = [
                _tensor(self._transform_input(x_val), device),
                torch.as_tensor(labels.y[val_index], device=device),
                _tensor(weights[val_index], device),
            ]
            weights[val_index] = 0.0
            sample_weight = weights
            tracker = EarlyStopping(module, (data, self._validation_score), self.tol, self.n_iter_no_change)

            def callback(epoch, M, b):
                LinearProbeFit(M, b, K, epoch, False, math.nan, math.nan).load_into(module)
                return tracker.update()

        timer.on_epoch_begin(None)
        fit = fit_linear_probe_minibatch(
            X,
            labels.y,
            Z if use_z else None,
            sample_weight,
            mean=self.x_mean_ if self.standardize else None,
            scale=self.x_scale_ if self.standardize else None,
            task=self.task_,
            n_outputs=K,
            alpha=float(self.alpha),
            byproduct_weight=float(self.byproduct_weight) if use_z else 0.0,
            byproduct_loss=self.byproduct_loss,
            penalty="nuclear",
            batch_size=int(self.batch_size),
            max_epochs=int(self.max_iter),
            learning_rate=float(self.learning_rate),
            device=device,
            seed=seed,
            tol=None if tracker is not None else float(self.tol),
            n_iter_no_change=int(self.n_iter_no_change),
            init=init,
            callback=callback,
        )
        timer.on_epoch_end(None)
        name = "minibatch"
        for i, value in enumerate(fit.loss_curve):
            check_finite_objective(float(value), i, solver=name)
        if tracker is None:
            fit.load_into(module)
        else:
            tracker.restore_best()
        check_finite_parameters(module, fit.n_iter, solver=name)
        scores = [] if tracker is None else tracker.scores
        return TrainResult(fit.n_iter, [float(v) for v in fit.loss_curve], scores, bool(fit.converged))

    def _fit_convex(self, module, data, *, device, warm, timer):
        """Train a head with ``HeadSpec.convex_solver`` (the linear head) by its convex form, in place.

        :func:`~luab_sk.nn.solvers.fit_linear_head` minimises ``f + alpha ||W2 W1||_*`` (the factored
        objective's minimum over factorisations of the same map) and loads the balanced factors, whose
        ``alpha / 2`` L2 term equals ``alpha ||W2 W1||_*``. Deterministic: no random numbers are drawn.
        ``timer`` gets one entry, the whole solve. Raises :class:`~luab_sk.nn.NonFiniteObjectiveError`
        when the solution or its objective is not finite.
        """
        x_fit, y_fit, z_fit, w_fit = data
        name = "lbfgs, convex"
        timer.on_epoch_begin(None)
        fit = fit_linear_head(
            module,
            x_fit,
            y_fit,
            z_fit,
            w_fit,
            task=self.task_,
            alpha=float(self.alpha),
            byproduct_weight=float(self.byproduct_weight),
            byproduct_loss=self.byproduct_loss,
            tol=max(float(self.tol), _CONVEX_MIN_TOL),
            max_iter=int(self.max_iter),
            device=device,
            warm_start=warm,
            verbose=self.verbose,
        )
        timer.on_epoch_end(None)
        for i, value in enumerate(fit.loss_curve):
            check_finite_objective(float(value), i, solver=name)
        check_finite_objective(float(fit.objective), fit.n_iter, solver=name)
        check_finite_parameters(module, fit.n_iter, solver=name)
        return TrainResult(fit.n_iter, [float(v) for v in fit.loss_curve], [], bool(fit.converged))

    def _closed_form_start(self, module, data, *, solver, warm):
        """The hook for heads with a closed-form start (``HeadSpec.closed_form_init``: the linear head),
        on the iterative path (AdamW, or L-BFGS with early stopping; otherwise :meth:`_fit_convex`).

        Fit the head in closed form on the training data and load the weights into ``module`` (a fresh
        fit only; a warm start continues from the fitted weights), then return the context that L-BFGS
        trains in (the whitening preconditioner of :func:`~luab_sk.nn.whitened`; same objective). Other
        heads: no start, a null context.
        """
        if not head_spec(self.head).closed_form_init or (warm and solver != "lbfgs"):
            return contextlib.nullcontext()
        x_fit, y_fit, z_fit, w_fit = data
        moments = feature_moments(x_fit, w_fit)
        if not warm:
            reduced_rank_init_(
                module,
                x_fit,
                y_fit,
                z_fit,
                task=self.task_,
                byproduct_weight=float(self.byproduct_weight),
                alpha=float(self.alpha),
                sample_weight=w_fit,
                moments=moments,
            )
        if solver == "lbfgs":
            return whitened(module.trunk, moments, float(self.alpha))
        return contextlib.nullcontext()

    def _build(self, width, n_outputs, seed, device):
        spec = head_spec(self.head)
        hidden_size = self.hidden_size
        if spec.rank_bottleneck:  # a larger rank represents no other map and has the same optimum
            hidden_size = min(hidden_size, width, n_outputs + self.n_byproducts_)
        return build_head(
            self.head,
            width,
            n_outputs,
            0 if spec.spatial else self.n_byproducts_,
            hidden_size=hidden_size,
            n_layers=self.n_layers,
            grid_shape=self.grid_shape_ if spec.spatial else None,
            n_heads=self.n_heads,
            per_class_maps=spec.spatial and self.n_byproducts_ > 2,
            glimpse=self.glimpse,
            generator=torch.Generator().manual_seed(seed),  # local: the same weights in any thread
        ).to(device)

    def _warn_if_worse_than_prior(self, data, n_outputs, solver):
        """Warn when the fitted labels are predicted worse than by the class frequencies alone."""
        x, y, _, w = data
        rows = slice(None, None, max(1, x.shape[0] // _PRIOR_CHECK_ROWS))
        with torch.inference_mode():
            logits = self.module_(x[rows]).logits
            fitted = float(label_loss(logits, y[rows], self.task_, sample_weight=w[rows]))
        prior = float(prior_label_loss(y[rows], self.task_, n_outputs, sample_weight=w[rows]))
        if fitted > prior * (1 + _PRIOR_MARGIN) + _PRIOR_MARGIN:
            scale = "" if self.standardize else " X is not standardized here: use standardize=True."
            warnings.warn(
                f"LUABClassifier ({solver}) ended with a training label loss of {fitted:.4g}, worse than "
                f"predicting the class frequencies ({prior:.4g}): the solver failed.{scale} Badly scaled "
                "features, too large a learning_rate, too few iterations or an overwhelming "
                "byproduct_weight can cause this.",
                ConvergenceWarning,
                stacklevel=3,
            )

    def _objective(self, module, x, y, z, w):
        return multitask_loss(
            module(x),
            y,
            z,
            task=self.task_,
            byproduct_weight=float(self.byproduct_weight),
            byproduct_target=self.byproduct_target_,
            byproduct_loss=self.byproduct_loss,
            grid_shape=getattr(self, "grid_shape_", None),
            sigma=float(self.sigma),
            sample_weight=w,
        ).total

    def _validation_score(self, module, x, y, w):
        return -float(label_loss(module(x).logits, y, self.task_, sample_weight=w))

    def _check_x_rank(self, X):
        if head_spec(self.head).spatial and X.ndim != 3:
            raise ValueError(
                f"head='attention' needs X of tokens with shape (n_samples, L, C), got shape {X.shape}."
            )

    def _check_tokens(self, X):
        if self._head_spec().spatial and X.shape[1:] != self.token_shape_:
            raise ValueError(
                f"X has tokens of shape {X.shape[1:]}, but LUABClassifier was fitted on {self.token_shape_}."
            )
        return X

    def _fit_input_transform(self, X, seed):
        """Learn and apply the input scaling (and, for tokens, the grid and PCA)."""
        if not head_spec(self.head).spatial:
            self.token_pca_ = None
            if self.standardize:
                self.x_mean_, self.x_scale_ = (a.astype(np.float32) for a in streaming_standardization(X))
            return self._transform_input(X)
        n, n_tokens, width = X.shape
        self.token_shape_ = (n_tokens, width)
        self.grid_shape_ = infer_grid(n_tokens, self.grid_shape)
        rows = X.reshape(-1, width)
        self.token_pca_ = None
        if self.n_components is not None and self.n_components < width:
            rng = np.random.default_rng(seed)
            sample = (
                rows if rows.shape[0] <= _PCA_MAX_ROWS else rows[rng.choice(rows.shape[0], _PCA_MAX_ROWS)]
            )
            n_components = min(self.n_components, sample.shape[0])
            self.token_pca_ = PCA(n_components, whiten=self.standardize, svd_solver="covariance_eigh").fit(
                sample
            )
        elif self.standardize:
            self.x_mean_, self.x_scale_ = (a.astype(np.float32) for a in streaming_standardization(rows))
        return self._transform_input(X)

    def _transform_input(self, X):
        if self._head_spec().spatial and self.token_pca_ is not None:
            n, n_tokens, width = X.shape
            return self.token_pca_.transform(X.reshape(-1, width)).astype(np.float32).reshape(n, n_tokens, -1)
        if self.standardize:
            out = X - self.x_mean_  # one float32 temporary (X is validated as float32), scaled in place
            out /= self.x_scale_
            return out.astype(np.float32, copy=False)
        return X

    def _impute(self, X, Z):
        from .knn import KNNByproductImputer  # a sibling estimator, imported only when asked for

        pooled = X.mean(axis=1) if X.ndim == 3 else X
        imputer = KNNByproductImputer(n_neighbors=self.n_impute_neighbors, random_state=self.random_state)
        return imputer.fit(pooled, Z).transform(pooled, Z).astype(np.float32)

    def _resolve_solver(self, X):
        if self.solver != "auto":
            return self.solver
        if X.size <= _LBFGS_MAX_ELEMENTS:
            return "lbfgs"
        spec = head_spec(self.head)
        streamable = spec.convex_solver and self.impute_byproducts is None
        return "minibatch" if streamable else "adamw"

    # -------------------------------------------------------------- predict
    def _outputs(self, X):
        """Validate X, transform it, and run the head in chunks; yields HeadOutput per chunk."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, allow_nd=self._head_spec().spatial, dtype=np.float32)
        self._check_x_rank(X)
        X = self._transform_input(self._check_tokens(X))
        device = resolve_device(self.device)
        module = self.module_.to(device).eval()
        with torch.inference_mode():
            for start in range(0, X.shape[0], _PREDICT_CHUNK):
                yield module(_tensor(X[start : start + _PREDICT_CHUNK], device))

    def _label_scores(self, X):
        return np.concatenate([out.logits.float().cpu().numpy() for out in self._outputs(X)])

    def _byproducts_in_z_units(self, Z):
        """Pooled heads regress standardised Z: back to Z's units (``predict_byproducts``, in the base)."""
        if self.z_scale_ is not None:
            Z = Z * self.z_scale_ + self.z_mean_
        return Z

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = head_spec(self.head).spatial
        return tags


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(array), device=device)


def _check_impute_neighbors(Z: np.ndarray, n_neighbors: int) -> None:
    n_annotated = int((~np.isnan(Z).all(axis=1)).sum())
    if n_neighbors > n_annotated:
        raise ValueError(
            f"impute_byproducts='knn' needs n_impute_neighbors <= the number of annotated rows of Z; got "
            f"n_impute_neighbors={n_neighbors} with {n_annotated} annotated rows of {Z.shape[0]}."
        )
