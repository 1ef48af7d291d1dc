"""The one training engine of luab_sk: full-batch L-BFGS or mini-batch epochs, with hooks.

Every model luab_sk trains goes through :class:`Trainer`: :class:`~luab_sk.estimators.LUABClassifier`
(both solvers), :class:`~luab_sk.estimators.LUABFineTuner` (DataLoader epochs) and the student of
:class:`~luab_sk.estimators.distill.GeneralizedDistillationClassifier` (full batch). The engine is plain
torch (no scikit-learn), so it lives in :mod:`luab_sk.nn` and modules below the estimators may use it too.

Two modes
---------
- :meth:`Trainer.fit_full_batch`: :class:`torch.optim.LBFGS` (strong Wolfe line search) on the whole data,
  one monitored iteration per step.
- :meth:`Trainer.fit_epochs`: an epoch loop; each epoch is one call of ``run_epoch(epoch)``, usually
  :meth:`Trainer.train_epoch` over mini-batches (any iterable of batches: a DataLoader, or index slices of
  tensors) with any optimiser (AdamW in luab_sk), an optional per-batch learning-rate schedule, gradient
  clipping and an autocast (AMP) context.

Hooks (:class:`Callback`, in the spirit of skorch's callbacks): ``on_train_begin``, ``on_epoch_begin``,
``on_batch_end``, ``on_epoch_end`` (set ``trainer.stop = True`` to stop), ``on_train_end``, and
``state_dict`` / ``load_state_dict`` so that a checkpoint holds every hook's state. Provided:
:class:`EarlyStopping`, :class:`LossPlateau`, :class:`LRScheduler`, :class:`Checkpoint`,
:class:`ProgressLogger` (tqdm bars and one line per epoch when verbose), :class:`Timer`. An "epoch" is one
L-BFGS iteration in full-batch mode: every hook works in both modes.

Meaning of ``alpha``, ``tol`` and ``max_iter`` (the one definition; every estimator refers here)
-----------------------------------------------------------------------------------------------
``alpha``
    L2 strength: the engine minimises the mean (sample-weighted) loss plus ``alpha / 2 * sum ||W||^2`` over
    the weight matrices (parameters with two or more dimensions, as the module sees them, see
    :func:`l2_penalty`); biases and normalisation parameters are not penalised. The same objective in
    both modes, so ``alpha`` means what scikit-learn's ``MLPClassifier(alpha=...)`` means per sample.
    (An optimiser's decoupled weight decay, such as the fine-tuner's ``weight_decay``, is a separate
    parameter.)
``tol``
    Full-batch (L-BFGS): scikit-learn's ``gtol`` (as in ``LogisticRegression(solver="lbfgs")``): stop after
    the first iteration at which the largest absolute entry of the objective's gradient with respect to the
    optimised parameters is at most ``tol`` (the gradient of the last line search: no extra evaluation).
    A stall guard also stops after 3 consecutive iterations that each lower the objective by at most
    ``16 * eps * max(|f|, 1)``. Epoch mode: the minimum improvement that counts as progress for the
    monitored quantity: a validation score must rise by more than ``tol`` to reset the patience of
    :class:`EarlyStopping`, and the epoch training loss must fall by at least ``tol`` to reset the patience
    of :class:`LossPlateau`; a fit stops after ``n_iter_no_change`` epochs without progress.
``max_iter``
    The most L-BFGS iterations (full batch) or epochs (epoch mode) of one fit (a resumed fit counts the
    epochs done before the interruption).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

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

Batch = Sequence[Tensor | None]

# L-BFGS stall guard: this many consecutive iterations, each lowering the objective by at most
# _STALL_EPS_FACTOR machine epsilons (relative), end the fit.
_STALL_ITERATIONS = 3
_STALL_EPS_FACTOR = 16


# ----------------------------------------------------------------------------------- finite guards
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

    The engine calls it on the objective after each iteration or epoch, so that no fit ever returns a
    model whose predictions are NaN.

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
    luab_sk.nn.engine.NonFiniteObjectiveError: The training objective became nan at ...
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

    The last optimiser step can break the weights after the last loss was computed, so the engine checks
    the parameters too (see :func:`check_finite_objective` for the arguments).
    """
    if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
        check_finite_objective(
            float("nan"), iteration, solver=solver, learning_rate=learning_rate, what="A model parameter"
        )


def l2_penalty(module: nn.Module) -> Tensor:
    """Sum of squares of the module's weight matrices (parameters with two or more dimensions).

    The engine adds ``alpha / 2`` times this to the objective (see the module docstring). A weight under a
    :mod:`torch.nn.utils.parametrize` parametrisation is penalised as the module sees it (the parametrised
    value), not as the optimiser stores it, so a reparametrisation (such as the preconditioner
    :func:`luab_sk.nn.whitened`) leaves the objective unchanged.

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


# ----------------------------------------------------------------------------------------- hooks
class Callback:
    """A training hook; override the methods you need (every one receives the :class:`Trainer`).

    ``on_epoch_end`` runs after every epoch (every L-BFGS iteration in full-batch mode), once the epoch's
    loss is in ``trainer.loss_curve``; a hook stops training by setting ``trainer.stop = True``. Hooks run
    in the order given to the trainer. ``state_dict`` / ``load_state_dict`` make a hook resumable from a
    checkpoint (:meth:`Trainer.state_dict`).
    """

    #: Key of this hook's state in :meth:`Trainer.state_dict` (None: stateless).
    state_key: str | None = None

    def on_train_begin(self, trainer: Trainer) -> None:
        """Before the first epoch (also when resuming)."""

    def on_epoch_begin(self, trainer: Trainer) -> None:
        """Before every epoch; ``trainer.epoch`` is the 0-based epoch about to run."""

    def on_batch_end(self, trainer: Trainer, loss: float, n_samples: int) -> None:
        """After every optimiser step of :meth:`Trainer.train_epoch`."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        """After every epoch; ``trainer.epoch`` counts the epochs done."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last epoch (not when an exception ends training)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


class EarlyStopping(Callback):
    """Score the model after every epoch, keep the best parameters, stop when patience runs out.

    Parameters
    ----------
    module : torch.nn.Module or None
        The model to score and restore (None: the trainer's module).
    validation : (data, score) or None
        ``score(module, *data) -> float``, higher is better, evaluated in eval mode without gradients.
        None disables the hook (it records nothing and never stops).
    tol : float
        A score must exceed the best by more than ``tol`` to count as an improvement (see the module
        docstring).
    patience : int
        Epochs without improvement before stopping (``n_iter_no_change``).

    Attributes
    ----------
    scores : list of float
    best_score : float
    best_state : dict or None
        A copy of the best ``state_dict``.
    stale : int
        Epochs since the last improvement.
    """

    state_key = "tracker"

    def __init__(self, module: nn.Module | None, validation, tol: float, patience: int) -> None:
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
        """Load the best parameters seen (no-op before any improvement)."""
        if self.best_state is not None:
            self.module.load_state_dict(self.best_state)

    def on_train_begin(self, trainer):
        if self.module is None:
            self.module = trainer.module

    def on_epoch_end(self, trainer):
        if self.update():
            trainer.stop = True

    def on_train_end(self, trainer):
        self.restore_best()

    def state_dict(self) -> dict:
        return {
            "scores": list(self.scores),
            "best_score": float(self.best_score),
            "stale": int(self.stale),
            "best_state": self.best_state,
        }

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        self.scores = list(state["scores"])
        self.best_score, self.stale = float(state["best_score"]), int(state["stale"])
        best = state["best_state"]
        self.best_state = None if best is None else {k: v.to(device) for k, v in best.items()}


class LossPlateau(Callback):
    """Stop when the epoch training loss has not fallen by ``tol`` for ``patience`` epochs.

    Parameters
    ----------
    tol : float
        Minimum decrease of the loss below the best so far that counts as progress.
    patience : int
        ``n_iter_no_change``.
    """

    state_key = "plateau"

    def __init__(self, tol: float, patience: int) -> None:
        self.tol, self.patience = tol, patience
        self.best, self.stale = float("inf"), 0

    def on_epoch_end(self, trainer):
        current = trainer.loss_curve[-1]
        self.stale = self.stale + 1 if current > self.best - self.tol else 0
        self.best = min(self.best, current)
        if self.stale >= self.patience:
            trainer.stop = True

    def state_dict(self):
        return {"best": self.best, "stale": self.stale}

    def load_state_dict(self, state):
        self.best, self.stale = float(state["best"]), int(state["stale"])


class LRScheduler(Callback):
    """Step a :mod:`torch.optim.lr_scheduler` scheduler after every batch (or every epoch).

    Parameters
    ----------
    scheduler : torch.optim.lr_scheduler.LRScheduler
    every : {"batch", "epoch"}, default="batch"
    """

    state_key = "scheduler"

    def __init__(self, scheduler, every: str = "batch") -> None:
        if every not in ("batch", "epoch"):
            raise ValueError(f"every must be 'batch' or 'epoch', got {every!r}.")
        self.scheduler, self.every = scheduler, every

    def on_batch_end(self, trainer, loss, n_samples):
        if self.every == "batch":
            self.scheduler.step()

    def on_epoch_end(self, trainer):
        if self.every == "epoch":
            self.scheduler.step()

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state)


class Checkpoint(Callback):
    """Call ``save(trainer)`` after every epoch, once the other hooks have run (list it last).

    ``save`` typically writes ``trainer.state_dict()`` (module, optimiser and every hook's state) to disk;
    resuming loads it back with :meth:`Trainer.load_state_dict` before :meth:`Trainer.fit_epochs`.
    """

    def __init__(self, save: Callable[[Trainer], None]) -> None:
        self.save = save

    def on_epoch_end(self, trainer):
        self.save(trainer)


class ProgressLogger(Callback):
    """Progress when verbose: a tqdm bar over the batches of every epoch and one line per epoch.

    Parameters
    ----------
    verbose : int
        Nothing when 0.
    line : str, default="Epoch {epoch}: loss {loss:.5f}{extra}"
        Format of the epoch line (``epoch`` 1-based; ``extra`` names the last validation score).
    bar : bool, default=True
        Show a tqdm bar in :meth:`Trainer.train_epoch`.
    """

    def __init__(self, verbose: int, line: str = "Epoch {epoch}: loss {loss:.5f}{extra}", bar: bool = True):
        self.verbose, self.line, self.bar = verbose, line, bar

    def wrap(self, batches: Iterable, trainer: Trainer) -> Iterable:
        """``batches`` under a tqdm bar when verbose (used by :meth:`Trainer.train_epoch`)."""
        if self.verbose < 1 or not self.bar:
            return batches
        from tqdm import tqdm  # not tqdm.auto: its asyncio class opens an extra DataLoader iterator

        total = f"/{trainer.max_iter}" if trainer.max_iter else ""
        return tqdm(batches, desc=f"epoch {trainer.epoch + 1}{total}", leave=False)

    def on_epoch_end(self, trainer):
        if self.verbose > 0:
            scores = trainer.validation_scores
            extra = f", validation score {scores[-1]:.5f}" if scores else ""
            print(self.line.format(epoch=trainer.epoch, loss=trainer.loss_curve[-1], extra=extra), flush=True)


class Timer(Callback):
    """Wall-clock and CPU seconds of every epoch (CUDA is synchronised at both ends).

    Attributes
    ----------
    wall, cpu : list of float
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = None if device is None else torch.device(device)
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def _sync(self):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_epoch_begin(self, trainer):
        self._sync()
        self._start = (time.perf_counter(), time.process_time())

    def on_epoch_end(self, trainer):
        self._sync()
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


# ---------------------------------------------------------------------------------------- engine
class TrainResult(NamedTuple):
    """Outcome of a fit.

    Attributes
    ----------
    n_iter : int
        L-BFGS iterations or epochs run (counting resumed ones).
    loss_curve : list of float
        Objective after every iteration (L-BFGS) or mean loss over every epoch.
    validation_scores : list of float
        Validation score after every iteration/epoch (empty without early stopping).
    converged : bool
        Whether a stopping criterion fired before ``max_iter``.
    """

    n_iter: int
    loss_curve: list[float]
    validation_scores: list[float]
    converged: bool


class Trainer:
    """Train one module in place through hooks; see the module docstring for both modes and the meaning
    of ``alpha``, ``tol`` and ``max_iter``.

    Parameters
    ----------
    module : torch.nn.Module
        The model; its parameters with ``requires_grad`` are optimised.
    callbacks : sequence of Callback, default=()
        Hooks, run in this order.
    solver : str, default="L-BFGS"
        Name of the optimiser, for error messages.
    learning_rate : float, optional
        Step size of a first-order optimiser, for error messages.

    Attributes
    ----------
    epoch : int
        Epochs (iterations) done.
    loss_curve : list of float
    stop : bool
        Set by a hook to end training after the current epoch.
    max_iter : int
        Of the running fit.
    """

    def __init__(
        self,
        module: nn.Module,
        callbacks: Sequence[Callback] = (),
        *,
        solver: str = "L-BFGS",
        learning_rate: float | None = None,
    ) -> None:
        self.module, self.callbacks = module, list(callbacks)
        self.solver, self.learning_rate = solver, learning_rate
        self.epoch, self.loss_curve, self.stop, self.max_iter = 0, [], False, 0
        self.optimizer: torch.optim.Optimizer | None = None

    # -------------------------------------------------------------- hooks
    def _call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def callback(self, kind: type) -> Any:
        """The first hook of type ``kind``, or None."""
        return next((c for c in self.callbacks if isinstance(c, kind)), None)

    @property
    def validation_scores(self) -> list[float]:
        """The scores of the :class:`EarlyStopping` hook (empty without one)."""
        tracker = self.callback(EarlyStopping)
        return list(tracker.scores) if tracker is not None else []

    def state_dict(self) -> dict:
        """Everything needed to resume: epoch, loss curve, stop flag, module, optimiser, hooks' states."""
        state = {
            "epoch": self.epoch,
            "stopped": bool(self.stop),
            "loss_curve": list(self.loss_curve),
            "model": self.module.state_dict(),
        }
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        for callback in self.callbacks:
            if callback.state_key is not None:
                state[callback.state_key] = callback.state_dict()
        return state

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        """Resume from :meth:`state_dict` (hooks' states are matched by their ``state_key``)."""
        self.module.load_state_dict(state["model"])
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        for callback in self.callbacks:
            if callback.state_key is not None and callback.state_key in state:
                if isinstance(callback, EarlyStopping):
                    callback.load_state_dict(state[callback.state_key], device)
                else:
                    callback.load_state_dict(state[callback.state_key])
        self.epoch = int(state["epoch"])
        self.loss_curve = list(state["loss_curve"])
        self.stop = self.epoch > 0 and bool(state.get("stopped", False))

    def _result(self, max_iter: int) -> TrainResult:
        converged = self.stop or self.epoch < max_iter
        return TrainResult(self.epoch, list(self.loss_curve), self.validation_scores, converged)

    # --------------------------------------------------------- full batch
    def fit_full_batch(
        self,
        objective: Callable[..., Tensor],
        data: Batch,
        *,
        max_iter: int = 100,
        tol: float = 1e-5,
        alpha: float = 0.0,
    ) -> TrainResult:
        """Minimise ``objective(module, *data) + alpha / 2 * l2_penalty(module)`` with L-BFGS.

        Parameters
        ----------
        objective : callable
            ``objective(module, *data) -> Tensor``: the scalar mean data loss.
        data : sequence of Tensor or None
            Passed to ``objective`` whole.
        max_iter, tol, alpha
            See the module docstring.

        Returns
        -------
        TrainResult
        """
        module = self.module
        params = [p for p in module.parameters() if p.requires_grad]
        self.max_iter = max_iter

        def total() -> Tensor:
            loss = objective(module, *data)
            return loss + 0.5 * alpha * l2_penalty(module) if alpha else loss

        module.train()
        # One iteration per step() so every iteration can be monitored; max_eval must be set explicitly,
        # its default (max_iter * 5 // 4 = 1) would leave the line search no evaluations. torch's own
        # tests are switched off (they are absolute: tolerance_change=1e-9 refuses any step whose
        # directional derivative is above -1e-9, which near the optimum stalls the fit well before
        # tol); the stopping rules below replace them.
        self.optimizer = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=1,
            max_eval=26,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=0.0,
            tolerance_change=0.0,
        )
        closure = _CachedClosure(params, self.optimizer, total)
        self._call("on_train_begin")
        first = closure()
        check_finite_objective(float(first), 0, solver=self.solver)
        stall_tol = _STALL_EPS_FACTOR * torch.finfo(first.dtype).eps
        previous, stalled, converged = float(first), 0, False
        while self.epoch < max_iter:
            self._call("on_epoch_begin")
            self.optimizer.step(closure)
            current = float(closure())  # cached: evaluated by the line search
            check_finite_objective(current, self.epoch + 1, solver=self.solver)
            self.loss_curve.append(current)
            self.epoch += 1
            self._call("on_epoch_end")
            stalled = stalled + 1 if previous - current <= stall_tol * max(abs(current), 1.0) else 0
            if self.stop or closure.max_abs_grad() <= tol or stalled >= _STALL_ITERATIONS:
                converged = True
                break
            previous = current
        self._call("on_train_end")
        check_finite_parameters(module, self.epoch, solver=self.solver)
        module.eval()
        return TrainResult(self.epoch, list(self.loss_curve), self.validation_scores, converged)

    # ------------------------------------------------------------- epochs
    def fit_epochs(self, run_epoch: Callable[[int], float], *, max_iter: int) -> TrainResult:
        """Run epochs ``trainer.epoch, ..., max_iter - 1`` until a hook stops training.

        Parameters
        ----------
        run_epoch : callable
            ``run_epoch(epoch) -> float``: trains one epoch (0-based index) and returns its mean loss;
            usually a call of :meth:`train_epoch`.
        max_iter : int
            Epochs in all (a resumed trainer continues from ``trainer.epoch``).

        Returns
        -------
        TrainResult
        """
        self.max_iter = max_iter
        self._call("on_train_begin")
        while self.epoch < max_iter and not self.stop:
            self._call("on_epoch_begin")
            loss = float(run_epoch(self.epoch))
            check_finite_objective(loss, self.epoch + 1, solver=self.solver, learning_rate=self.learning_rate)
            check_finite_parameters(
                self.module, self.epoch + 1, solver=self.solver, learning_rate=self.learning_rate
            )
            self.loss_curve.append(loss)
            self.epoch += 1
            self._call("on_epoch_end")
        self._call("on_train_end")
        self.module.eval()
        return self._result(max_iter)

    def train_epoch(
        self,
        batches: Iterable[Batch],
        loss_fn: Callable[..., Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        alpha: float = 0.0,
        clip_grad_norm: float | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> float:
        """One pass of mini-batch steps; returns the sample-weighted mean loss.

        Parameters
        ----------
        batches : iterable of sequences of Tensor
            A DataLoader, or any iterable of batches; a batch's size is the length of its first tensor.
        loss_fn : callable
            ``loss_fn(module, *batch) -> Tensor``: the scalar mean loss of a batch (it moves the batch to
            the device and runs the forward pass).
        optimizer : torch.optim.Optimizer
        alpha : float, default=0.0
            L2 strength (the module docstring); 0 for optimisers with decoupled weight decay.
        clip_grad_norm : float, optional
            Clip the global gradient norm of the optimised parameters.
        autocast : callable, optional
            A context-manager factory around ``loss_fn`` (mixed precision, AMP).
        """
        self.optimizer = optimizer
        module = self.module
        module.train()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        logger = self.callback(ProgressLogger)
        batches = logger.wrap(batches, self) if logger is not None else batches
        running, seen = 0.0, 0
        for batch in batches:
            n = int(batch[0].shape[0])
            with autocast() if autocast is not None else contextlib.nullcontext():
                loss = loss_fn(module, *batch)
            if alpha:
                loss = loss + 0.5 * alpha * l2_penalty(module)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, float(clip_grad_norm))
            optimizer.step()
            value = float(loss.detach())
            self._call("on_batch_end", value, n)
            running += value * n
            seen += n
            if hasattr(batches, "set_postfix"):
                batches.set_postfix(loss=f"{running / seen:.4f}")
        return running / max(seen, 1)


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


# ------------------------------------------------------------------------------ tensor convenience
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
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train ``module`` in place on in-memory tensors through a :class:`Trainer`.

    Parameters
    ----------
    module : torch.nn.Module
    objective : callable
        ``objective(module, *batch) -> Tensor``: the scalar mean data loss on a batch.
    data : sequence of Tensor or None
        Training tensors sharing their first dimension (None entries are passed through unsliced).
    solver : {"lbfgs", "adamw"}, default="lbfgs"
        ``"lbfgs"``: :meth:`Trainer.fit_full_batch`. ``"adamw"``: :meth:`Trainer.fit_epochs` over shuffled
        mini-batches with :class:`torch.optim.AdamW` (``weight_decay=0``: the L2 term is in the objective)
        and :class:`LossPlateau`.
    max_iter, tol, alpha
        See :mod:`luab_sk.nn.engine` (one meaning everywhere).
    batch_size : int, default=256
        Mini-batch size (AdamW only).
    learning_rate : float, default=1e-3
        AdamW learning rate.
    n_iter_no_change : int, default=10
        Patience of :class:`EarlyStopping` and :class:`LossPlateau`.
    validation : (data, score) or None
        :class:`EarlyStopping` on ``score(module, *data)`` (higher is better); the best parameters are
        restored at the end.
    generator : torch.Generator, optional
        Drives the mini-batch shuffling (CPU generator).
    verbose : int, default=0
        Print the objective every iteration/epoch when > 0 (:class:`ProgressLogger`, no bars).
    callbacks : sequence of Callback, default=()
        More hooks, run after the built-in ones (a :class:`Timer`, for instance).

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
    hooks: list[Callback] = [EarlyStopping(module, validation, tol, n_iter_no_change)]
    line = "Iteration {epoch}: objective {loss:.6f}{extra}"
    if solver == "lbfgs":
        hooks += [ProgressLogger(verbose, line, bar=False), *callbacks]
        return Trainer(module, hooks, solver="L-BFGS").fit_full_batch(
            objective, data, max_iter=max_iter, tol=tol, alpha=alpha
        )
    hooks += [ProgressLogger(verbose, line, bar=False), LossPlateau(tol, n_iter_no_change), *callbacks]
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    trainer = Trainer(module, hooks, solver="AdamW", learning_rate=learning_rate)
    first = next(t for t in data if t is not None)
    n_samples, device = first.shape[0], first.device

    def batches():
        order = torch.randperm(n_samples, generator=generator).to(device)
        for start in range(0, n_samples, batch_size):
            index = order[start : start + batch_size]
            yield [None if t is None else t[index] for t in data]

    return trainer.fit_epochs(
        lambda epoch: trainer.train_epoch(batches(), objective, optimizer, alpha=alpha), max_iter=max_iter
    )
