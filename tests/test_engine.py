"""The one training engine (luab_sk.nn.engine), the head registry and the shared grid helpers."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from luab_sk import _grid
from luab_sk.byproducts import heatmap_to_points, points_to_heatmap
from luab_sk.estimators.distill import GeneralizedDistillationClassifier
from luab_sk.nn import (
    HEADS,
    Callback,
    Checkpoint,
    EarlyStopping,
    LossPlateau,
    LRScheduler,
    ProgressLogger,
    Timer,
    Trainer,
    build_head,
    gaussian_heatmap,
    head_spec,
    soft_argmax,
    token_centers,
)


def _regression(n=200, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.arange(1.0, d + 1, dtype=torch.float64) + 0.1 * torch.randn(
        n, generator=g, dtype=torch.float64
    )
    return x, y


def _half_mse(module, x, y):
    return 0.5 * (module(x)[:, 0] - y).pow(2).mean()


# ------------------------------------------------------------------------------------ meaning
def test_alpha_is_half_the_squared_norm_of_weight_matrices():
    """alpha / 2 ||W||^2: full-batch ridge equals the closed form (the bias is not penalised)."""
    x, y = _regression()
    alpha = 0.3
    lin = torch.nn.Linear(5, 1, dtype=torch.float64)
    Trainer(lin).fit_full_batch(_half_mse, (x, y), max_iter=200, tol=1e-10, alpha=alpha)
    xc, yc = x - x.mean(0), y - y.mean()
    expected = torch.linalg.solve(
        xc.T @ xc / len(x) + alpha * torch.eye(5, dtype=x.dtype), xc.T @ yc / len(x)
    )
    torch.testing.assert_close(lin.weight.detach()[0], expected, atol=1e-7, rtol=1e-7)


def test_tol_is_the_gradient_tolerance_of_lbfgs():
    x, y = _regression()
    lin = torch.nn.Linear(5, 1, dtype=torch.float64)
    result = Trainer(lin).fit_full_batch(_half_mse, (x, y), max_iter=500, tol=1e-6)
    assert result.converged
    lin.zero_grad()
    _half_mse(lin, x, y).backward()
    assert max(float(p.grad.abs().max()) for p in lin.parameters()) <= 1e-6


def test_distillation_alpha_has_the_engine_meaning():
    """imitation=0: the student is multinomial logistic regression with alpha = 1 / (C n)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, 4))
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5).astype(int)
    X = (X - X.mean(0)) / X.std(0)
    Z = rng.normal(size=(150, 1))
    C = 0.5
    student = GeneralizedDistillationClassifier(imitation=0.0, alpha=1.0 / (C * len(X)), tol=1e-10).fit(
        X, y, Z=Z
    )
    reference = LogisticRegression(C=C, tol=1e-10, max_iter=5000).fit(X, y)
    np.testing.assert_allclose(student.coef_, reference.coef_, atol=1e-5)
    # The default keeps the old objective (alpha * ||W||^2 with alpha=1e-3).
    assert GeneralizedDistillationClassifier().get_params()["alpha"] == 2e-3


# -------------------------------------------------------------------------------------- hooks
class _Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, trainer):
        self.events.append("begin")

    def on_epoch_begin(self, trainer):
        self.events.append(f"epoch{trainer.epoch}")

    def on_batch_end(self, trainer, loss, n_samples):
        self.events.append(n_samples)

    def on_epoch_end(self, trainer):
        self.events.append(len(trainer.loss_curve))

    def on_train_end(self, trainer):
        self.events.append("end")


def _epoch_setup(seed=0, hooks=()):
    torch.manual_seed(seed)
    x, y = _regression(64, 3)
    module = torch.nn.Linear(3, 1, dtype=torch.float64)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + 0.1 * step))
    val = ((x[:16], y[:16]), lambda m, x, y: -float(_half_mse(m, x, y)))
    trainer = Trainer(
        module,
        [EarlyStopping(module, val, 1e-4, 3), LRScheduler(scheduler), *hooks],
        solver="AdamW",
    )
    trainer.optimizer = optimizer  # so that load_state_dict restores it

    def run_epoch(epoch):
        g = torch.Generator().manual_seed(epoch)
        order = torch.randperm(48, generator=g) + 16
        batches = ((x[i], y[i]) for i in order.split(16))
        return trainer.train_epoch(batches, _half_mse, optimizer)

    return trainer, run_epoch


def test_hooks_run_in_order_in_epoch_mode():
    recorder = _Recorder()
    trainer, run_epoch = _epoch_setup(hooks=[recorder])
    result = trainer.fit_epochs(run_epoch, max_iter=2)
    assert recorder.events == ["begin", "epoch0", 16, 16, 16, 1, "epoch1", 16, 16, 16, 2, "end"]
    assert result.n_iter == 2 and len(result.validation_scores) == 2


def test_full_batch_mode_calls_the_same_hooks_per_iteration():
    recorder, timer = _Recorder(), Timer()
    x, y = _regression()
    lin = torch.nn.Linear(5, 1, dtype=torch.float64)
    result = Trainer(lin, [recorder, timer]).fit_full_batch(_half_mse, (x, y), max_iter=3, tol=0.0)
    assert result.n_iter == 3 and len(timer.wall) == len(timer.cpu) == 3
    assert recorder.events == ["begin", "epoch0", 1, "epoch1", 2, "epoch2", 3, "end"]


def test_resume_from_state_dict_matches_an_uninterrupted_run():
    saved = {}
    reference, run = _epoch_setup()
    expected = reference.fit_epochs(run, max_iter=6)

    interrupted, run = _epoch_setup(hooks=[Checkpoint(lambda t: saved.update(t.state_dict()))])
    interrupted.fit_epochs(run, max_iter=3)
    state = {k: v for k, v in saved.items()}  # what a checkpoint file would hold
    assert set(state) >= {"epoch", "stopped", "loss_curve", "model", "optimizer", "tracker", "scheduler"}

    resumed, run = _epoch_setup(seed=1)  # other initial weights: all must come from the state
    resumed.load_state_dict(state)
    result = resumed.fit_epochs(run, max_iter=6)
    assert result.loss_curve == expected.loss_curve
    assert result.validation_scores == expected.validation_scores


def test_loss_plateau_and_early_stopping_stop():
    trainer, run_epoch = _epoch_setup()
    trainer.callbacks.append(LossPlateau(tol=1e9, patience=2))  # only the first epoch counts as progress
    result = trainer.fit_epochs(run_epoch, max_iter=50)
    assert result.n_iter == 3 and result.converged


def test_progress_logger_prints_one_line_per_epoch(capsys):
    trainer, run_epoch = _epoch_setup(hooks=[ProgressLogger(1, bar=False)])
    trainer.fit_epochs(run_epoch, max_iter=2)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("Epoch 2: loss") and "validation score" in lines[1]


def test_non_finite_epoch_loss_raises():
    from luab_sk.nn import NonFiniteObjectiveError

    trainer = Trainer(torch.nn.Linear(2, 1), solver="AdamW", learning_rate=1.0)
    with pytest.raises(NonFiniteObjectiveError, match="learning_rate=1"):
        trainer.fit_epochs(lambda epoch: float("nan"), max_iter=3)


# ----------------------------------------------------------------------------- head registry
@pytest.mark.parametrize("kind", sorted(HEADS))
def test_head_specs_describe_what_the_heads_do(kind):
    spec = head_spec(kind)
    x = torch.randn(2, 4, 6) if spec.input == "tokens" else torch.randn(2, 6)
    head = build_head(kind, 6, 3, 0 if spec.spatial else 2, hidden_size=4, grid_shape=(2, 2))
    out = head(x)
    assert (out.attention is not None) == spec.spatial
    assert spec.closed_form_init == (kind == "linear")
    with pytest.raises(ValueError, match="kind must be one of"):
        head_spec("conv")


# -------------------------------------------------------------------------- one grid helper
def test_heatmap_and_soft_argmax_are_one_implementation():
    points = np.array([[0.3, 0.7], [0.9, 0.1]])
    grid = (3, 5)
    numpy_maps = points_to_heatmap(points, grid, sigma=0.15)
    torch_maps = gaussian_heatmap(torch.tensor(points, dtype=torch.float64), grid, sigma=0.15)[:, 0]
    np.testing.assert_allclose(numpy_maps, torch_maps.numpy(), rtol=1e-12)  # softmax kernels differ
    np.testing.assert_allclose(
        heatmap_to_points(numpy_maps, grid, method="mean"),
        soft_argmax(torch.tensor(numpy_maps)[:, None], grid).numpy(),
        rtol=1e-12,
    )
    np.testing.assert_array_equal(token_centers(grid).numpy(), _grid.cell_centers(grid, dtype=np.float32))


def test_infer_grid():
    assert _grid.infer_grid(49) == (7, 7) and _grid.infer_grid(6, (2, 3)) == (2, 3)
    with pytest.raises(ValueError, match="square grid"):
        _grid.infer_grid(6)
    with pytest.raises(ValueError, match="does not match"):
        _grid.infer_grid(6, (2, 2))
