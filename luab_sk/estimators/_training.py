"""The shared training loop: full-batch L-BFGS or mini-batch AdamW, with optional early stopping.

Both solvers minimise the same objective: the mean (sample-weighted) loss returned by ``objective``
plus ``alpha / 2`` times the squared norm of every weight matrix (biases are not penalised).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "EarlyStopping",
    "NonFiniteObjectiveError",
    "TrainResult",
    "check_finite_objective",
    "check_finite_parameters",
    "l2_penalty",
    "train_module",
]

Batch = Sequence[Tensor | None]

# L-BFGS stall guard: this many consecutive iterations, each lowering the objective by at most
# _STALL_EPS_FACTOR machine epsilons (relative), end the fit.
_STALL_ITERATIONS = 3
_STALL_EPS_FACTOR = 16


class NonFiniteObjectiveError(ValueError, FloatingPointError):
    """The training objective (or a parameter) became NaN or infinite; no model was produced.

    A ``ValueError`` and a ``FloatingPointError``, so either ``except`` clause catches it.
    """


def check_finite_objective(
    value: float,
    iteration: int,
    *,
    solver: str,
    learning_rate: float | None = None,
    what: str = "The training objective",
) -> None:
    """Raise :class:`NonFiniteObjectiveError` naming the likely causes when ``value`` is not finite.

    Every training loop calls it on the objective after each iteration or epoch, so that no fit ever
    returns a model whose predictions are NaN.

    Parameters
    ----------
    value : float
        The objective (or loss) just computed.
    iteration : int
        1-based iteration or epoch (0: the starting point), for the message.
    solver : str
        Name of the optimiser, for the message.
    learning_rate : float, optional
        The step size of a first-order optimiser; named as the first suspect when given.
    what : str, default="The training objective"
        What became non-finite, for the message.

    Raises
    ------
    NonFiniteObjectiveError

    Examples
    --------
    >>> check_finite_objective(0.7, 3, solver="lbfgs")
    >>> check_finite_objective(float("nan"), 3, solver="adamw", learning_rate=10.0)
    Traceback (most recent call last):
    ...
    luab_sk.estimators._training.NonFiniteObjectiveError: The training objective became nan at ...
    """
    if math.isfinite(value):
        return
    where = "at the starting point" if iteration == 0 else f"at iteration {iteration}"
    causes = []
    if learning_rate is not None:
        causes.append(f"a learning rate that is too high (learning_rate={learning_rate:g}; try 10x lower)")
    causes += [
        "features that are not standardized or have extreme values (scale X, or keep standardize=True)",
        "an extreme byproduct_weight, alpha or sample_weight",
    ]
    raise NonFiniteObjectiveError(
        f"{what} became {value} {where} ({solver}); the fit was stopped and no model was "
        f"kept. Likely causes: {'; '.join(causes)}."
    )


def check_finite_parameters(
    module: nn.Module, iteration: int, *, solver: str, learning_rate: float | None = None
) -> None:
    """Raise :class:`NonFiniteObjectiveError` when a parameter of ``module`` is NaN or infinite.

    The last optimiser step can break the weights after the last loss was computed, so training loops
    check the parameters once more at the end (see :func:`check_finite_objective` for the arguments).
    """
    if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
        check_finite_objective(
            float("nan"), iteration, solver=solver, learning_rate=learning_rate, what="A model parameter"
        )


class TrainResult(NamedTuple):
    """Outcome of :func:`train_module`.

    Attributes
    ----------
    n_iter : int
        L-BFGS iterations or AdamW epochs run.
    loss_curve : list of float
        Training objective after every iteration (L-BFGS) or mean over every epoch (AdamW).
    validation_scores : list of float
        Validation score after every iteration/epoch (empty without early stopping).
    converged : bool
        Whether a stopping criterion fired before ``max_iter``.
    """

    n_iter: int
    loss_curve: list[float]
    validation_scores: list[float]
    converged: bool


def l2_penalty(module: nn.Module) -> Tensor:
    """Sum of squares of the module's weight matrices (parameters with two or more dimensions).

    A weight under a :mod:`torch.nn.utils.parametrize` parametrisation is penalised as the module sees
    it (the parametrised value), not as the optimiser stores it, so a reparametrisation (such as the
    preconditioner :func:`luab_sk.nn.whitened`) leaves the objective unchanged.

    Examples
    --------
    >>> lin = nn.Linear(2, 1)
    >>> with torch.no_grad():
    ...     _ = lin.weight.fill_(2.0)
    >>> l2_penalty(lin)
    tensor(8., grad_fn=<AddBackward0>)
    """
    weights = []
    for sub in module.modules():
        if isinstance(sub, parametrize.ParametrizationList):
            continue  # its ``original`` is reached through the parametrised module below
        names = [name for name, _ in sub.named_parameters(recurse=False)]
        if parametrize.is_parametrized(sub):
            names += list(sub.parametrizations)
        weights += [w for w in (getattr(sub, name) for name in names) if w.ndim >= 2 and w.requires_grad]
    total = weights[0].new_zeros(()) if weights else torch.zeros(())
    for w in weights:
        total = total + w.pow(2).sum()
    return total


def _take(data: Batch, index: Tensor | None) -> list[Tensor | None]:
    if index is None:
        return list(data)
    return [None if t is None else t[index] for t in data]


def train_module(
    module: nn.Module,
    objective: Callable[..., Tensor],
    data: Batch,
    *,
    solver: str = "lbfgs",
    max_iter: int = 100,
    tol: float = 1e-5,
    alpha: float = 0.0,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    n_iter_no_change: int = 10,
    validation: tuple[Batch, Callable[..., float]] | None = None,
    generator: torch.Generator | None = None,
    verbose: int = 0,
) -> TrainResult:
    """Train ``module`` in place.

    Parameters
    ----------
    module : torch.nn.Module
        The model; its parameters with ``requires_grad`` are optimised.
    objective : callable
        ``objective(module, *batch) -> Tensor``: the scalar mean data loss on a batch.
    data : sequence of Tensor or None
        Training tensors sharing their first dimension (None entries are passed through unsliced).
    solver : {"lbfgs", "adamw"}, default="lbfgs"
        ``"lbfgs"``: full-batch :class:`torch.optim.LBFGS` with a strong Wolfe line search.
        ``"adamw"``: mini-batch :class:`torch.optim.AdamW` (the L2 term is in the objective, so
        ``weight_decay=0``). See ``tol`` for their stopping rules.
    max_iter : int, default=100
        Maximum L-BFGS iterations or AdamW epochs.
    tol : float, default=1e-5
        Stopping tolerance.

        - L-BFGS, like scikit-learn's ``LogisticRegression(solver="lbfgs")`` (which passes ``tol`` to SciPy's
          L-BFGS-B as ``gtol``): stop after the first iteration at which the largest absolute entry of the
          gradient of the objective (the mean loss plus the L2 term) with respect to the optimised parameters
          is at most ``tol`` (under a :mod:`~torch.nn.utils.parametrize` reparametrisation, such as
          :func:`luab_sk.nn.whitened`, the parameters the optimiser stores). The gradient is the one the last
          line search computed; checking costs no evaluation. As a safety net against stalls (a line search
          that can no longer make progress at the objective's floating-point resolution), it also stops after
          3 consecutive iterations that each lower the objective by at most ``16 * eps * max(|f|, 1)``,
          ``eps`` being the machine epsilon of the objective's dtype.
        - AdamW: stop when the epoch loss has not improved by ``tol`` for ``n_iter_no_change`` epochs.
        - Early stopping (``validation``): the improvement in validation score that resets the patience.
    alpha : float, default=0.0
        L2 strength: ``alpha / 2 * sum(W ** 2)`` over weight matrices.
    batch_size : int, default=256
        Mini-batch size (AdamW only).
    learning_rate : float, default=1e-3
        AdamW learning rate.
    n_iter_no_change : int, default=10
        Patience, in iterations/epochs, for AdamW's stopping rule and for early stopping.
    validation : (data, score) or None
        Early stopping: ``score(module, *data) -> float`` (higher is better) is evaluated after every
        iteration/epoch; training stops after ``n_iter_no_change`` of them without an improvement of
        ``tol`` and the best parameters are restored.
    generator : torch.Generator, optional
        Drives the mini-batch shuffling (CPU generator).
    verbose : int, default=0
        Print the objective every iteration/epoch when > 0.

    Returns
    -------
    TrainResult

    Examples
    --------
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> x = torch.randn(64, 3); y = x @ torch.tensor([1.0, -2.0, 0.5])
    >>> lin = torch.nn.Linear(3, 1)
    >>> res = train_module(lin, lambda m, x, y: (m(x)[:, 0] - y).pow(2).mean(), (x, y), max_iter=50)
    >>> res.converged, round(float(lin.weight.detach()[0, 1]), 3)
    (True, -2.0)
    """
    if solver not in ("lbfgs", "adamw"):
        raise ValueError(f"solver must be 'lbfgs' or 'adamw', got {solver!r}.")
    params = [p for p in module.parameters() if p.requires_grad]

    def total_loss(batch: Batch) -> Tensor:
        loss = objective(module, *batch)
        return loss + 0.5 * alpha * l2_penalty(module) if alpha else loss

    tracker = EarlyStopping(module, validation, tol, n_iter_no_change)
    loss_curve: list[float] = []
    converged = False
    module.train()
    if solver == "lbfgs":
        # One iteration per step() so every iteration can be monitored; max_eval must be set explicitly,
        # its default (max_iter * 5 // 4 = 1) would leave the line search no evaluations. torch's own
        # tests are switched off (they are absolute: tolerance_change=1e-9 refuses any step whose
        # directional derivative is above -1e-9, which near the optimum stalls the fit well before
        # tol); the stopping rules below replace them.
        optimizer = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=1,
            max_eval=26,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=0.0,
            tolerance_change=0.0,
        )
        closure = _CachedClosure(params, optimizer, lambda: total_loss(data))
        first = closure()
        check_finite_objective(float(first), 0, solver="L-BFGS")
        stall_tol = _STALL_EPS_FACTOR * torch.finfo(first.dtype).eps
        previous, stalled = float(first), 0
        for _ in range(max_iter):
            optimizer.step(closure)
            current = float(closure())  # cached: evaluated by the line search
            check_finite_objective(current, len(loss_curve) + 1, solver="L-BFGS")
            loss_curve.append(current)
            stop = tracker.update()
            _report(verbose, len(loss_curve), current, tracker)
            stalled = stalled + 1 if previous - current <= stall_tol * max(abs(current), 1.0) else 0
            if stop or closure.max_abs_grad() <= tol or stalled >= _STALL_ITERATIONS:
                converged = True
                break
            previous = current
    else:
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
        n_samples = next(t for t in data if t is not None).shape[0]
        device = next(t for t in data if t is not None).device
        best, stale = float("inf"), 0
        for _ in range(max_iter):
            order = torch.randperm(n_samples, generator=generator).to(device)
            running = 0.0
            for start in range(0, n_samples, batch_size):
                index = order[start : start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = total_loss(_take(data, index))
                loss.backward()
                optimizer.step()
                running += float(loss.detach()) * index.numel()
            current = running / n_samples
            check_finite_objective(current, len(loss_curve) + 1, solver="AdamW", learning_rate=learning_rate)
            loss_curve.append(current)
            stop = tracker.update()
            _report(verbose, len(loss_curve), current, tracker)
            if stop:
                converged = True
                break
            stale = stale + 1 if current > best - tol else 0
            best = min(best, current)
            if stale >= n_iter_no_change:
                converged = True
                break
    tracker.restore_best()
    check_finite_parameters(module, len(loss_curve), solver=solver)
    module.eval()
    return TrainResult(len(loss_curve), loss_curve, tracker.scores, converged)


class _CachedClosure:
    """L-BFGS closure that remembers its last few evaluations.

    ``LBFGS.step`` re-evaluates the objective at the point where the previous line search ended; with one
    iteration per ``step`` call (so that we can monitor every iteration) that would cost one extra
    forward/backward pass per iteration. The cache answers such repeated points from memory.
    """

    def __init__(self, params: list[Tensor], optimizer: torch.optim.Optimizer, fn: Callable[[], Tensor]):
        self.params, self.optimizer, self.fn = params, optimizer, fn
        self.cache: list[tuple[Tensor, Tensor, list[Tensor]]] = []
        self.last_grads: list[Tensor] = []

    def __call__(self) -> Tensor:
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        for key, loss, grads in self.cache:
            if torch.equal(key, flat):
                for p, g in zip(self.params, grads):
                    p.grad = g.clone()
                self.last_grads = grads
                return loss
        self.optimizer.zero_grad(set_to_none=False)
        with torch.enable_grad():
            loss = self.fn()
            loss.backward()
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.cache = [*self.cache[-3:], (flat, loss.detach(), grads)]
        self.last_grads = grads
        return loss.detach()

    def max_abs_grad(self) -> float:
        """Largest absolute gradient entry at the point of the last call (from memory, no evaluation)."""
        maxima = [g.abs().max() for g in self.last_grads if g.numel()]
        return float(torch.stack(maxima).max()) if maxima else 0.0


class EarlyStopping:
    """Track a validation score, keep the best parameters, and say when patience has run out."""

    def __init__(self, module: nn.Module, validation, tol: float, patience: int) -> None:
        self.module, self.validation, self.tol, self.patience = module, validation, tol, patience
        self.scores: list[float] = []
        self.best_score, self.best_state, self.stale = -float("inf"), None, 0

    def update(self) -> bool:
        """Score the current parameters; True when patience is exhausted."""
        if self.validation is None:
            return False
        data, score = self.validation
        self.module.eval()
        with torch.no_grad():
            value = float(score(self.module, *data))
        self.module.train()
        self.scores.append(value)
        if value > self.best_score + self.tol:
            self.best_score, self.stale = value, 0
            self.best_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        else:
            self.stale += 1
        return self.stale >= self.patience

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.module.load_state_dict(self.best_state)


def _report(verbose: int, iteration: int, loss: float, tracker: EarlyStopping) -> None:
    if verbose > 0:
        extra = f", validation score {tracker.scores[-1]:.5f}" if tracker.scores else ""
        print(f"Iteration {iteration}: objective {loss:.6f}{extra}", flush=True)
