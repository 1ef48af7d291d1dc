"""LUABFineTuner under DistributedDataParallel: 2 CPU processes with the gloo backend.

One spawn runs both checks (the processes' start-up is most of the cost): a single DDP training step must
leave both ranks with identical parameters and gradients, equal to one single-process step on the
concatenated batch; and a short ``fit_distributed`` (early stopping, checkpoints written by rank 0) must
end with the same model on both ranks.
"""

from __future__ import annotations

import os
import pickle
import socket
import time

import numpy as np
import pytest
import torch

from luab_sk.estimators import LUABFineTuner

BACKBONE = "timm:test_vit"  # layer norms only: no batch statistics that differ between ranks
WORLD = 2
GLOBAL_BATCH = 8


def _estimator(**kwargs):
    params = dict(
        pretrained=None,
        image_size=32,
        batch_size=GLOBAL_BATCH,
        device="cpu",
        random_state=0,
        learning_rate=1e-3,
        head_learning_rate=1e-2,
    )
    params.update(kwargs)
    return LUABFineTuner(BACKBONE, **params)


def _data(n=24):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 255, size=(n, 40, 40, 3), dtype=np.uint8)
    y = np.array([0, 1, 2] * (n // 3))
    Z = rng.uniform(0.2, 0.8, size=(n, 2))
    return X, y, Z


def _batch():
    """A fixed global batch as the fine-tuner's loader yields it: normalised images, labels, points."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=gen)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    z = torch.rand(GLOBAL_BATCH, 2, generator=gen) * 0.6 + 0.2
    return images, y, z


def _setup_step():
    """An estimator prepared as a 3-class fit with click points prepares it, its network and optimiser."""
    from luab_sk.estimators._base import torch_seeded

    est = _estimator()
    est.task_, est.byproduct_target_, est.n_byproducts_ = "multiclass", "heatmap", 2
    with torch_seeded(0):
        module = est._build_model(3, None)
    return est, module, est._optimizer(module)


def _state(module):
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return params, grads


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    from luab_sk.estimators._ddp import ddp_train_step, fit_distributed, wrap_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # 1. one step on this rank's half of the global batch
        est, module, optimizer = _setup_step()
        model = wrap_model(module, torch.device("cpu"))
        images, y, z = _batch()
        share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        ddp_train_step(est, model, optimizer, (images[share], y[share], z[share]), torch.device("cpu"))
        step = _state(model.module)

        # 2. a short distributed fit with early stopping and checkpoints
        X, y_all, Z = _data()
        ckpt = os.path.join(out_dir, "ckpt")
        ft = _estimator(max_iter=2, early_stopping=True, validation_fraction=0.25, checkpoint_dir=ckpt)
        fit_distributed(ft, X, y_all, Z)
        fitted = {k: v.clone() for k, v in ft.model_.state_dict().items()}
        result = {
            "step": step,
            "fit": fitted,
            "loss_curve": ft.loss_curve_,
            "validation_scores": ft.validation_scores_,
            "n_iter": ft.n_iter_,
            "predict": ft.predict_proba(X[:4]),
        }
        # 3. resuming the finished checkpoint trains nothing and gives the same weights on every rank
        again = _estimator(max_iter=2, early_stopping=True, validation_fraction=0.25, checkpoint_dir=ckpt)
        fit_distributed(again, X, y_all, Z)
        result["resumed"] = {k: v.clone() for k, v in again.model_.state_dict().items()}
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
            pickle.dump(result, fh)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("ddp")
    # "fork" (where available) spares each process re-importing torch, sklearn and timm, most of the cost
    # of a spawn (5-35 s on a busy 2-core machine); LUAB_DDP_TEST_START=spawn tests the spawn start-up.
    default = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    method = os.environ.get("LUAB_DDP_TEST_START", default)
    args = (WORLD, _free_port(), str(out_dir))
    ctx = mp.start_processes(_worker, args=args, nprocs=WORLD, join=False, start_method=method)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the DDP processes did not finish within 180 s")
    results = []
    for r in range(WORLD):
        with open(out_dir / f"rank{r}.pkl", "rb") as fh:
            results.append(pickle.load(fh))
    return results, out_dir


def _assert_same(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


def test_one_ddp_step_equals_single_process_step(ranks):
    results, _ = ranks
    (p0, g0), (p1, g1) = results[0]["step"], results[1]["step"]
    _assert_same(p0, p1, rtol=0, atol=0)  # DDP keeps the replicas bitwise identical
    _assert_same(g0, g1, rtol=0, atol=0)
    est, module, optimizer = _setup_step()
    from luab_sk.estimators._ddp import ddp_train_step

    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    ddp_train_step(est, module, optimizer, _batch(), torch.device("cpu"))
    params, grads = _state(module)
    assert grads.keys() == g0.keys() and len(grads) > 10
    _assert_same(g0, grads, rtol=1e-4, atol=1e-6)  # averaged gradients == gradient of the global mean
    # AdamW's first step is lr * g / (|g| + eps): where |g| is near the gradients' round-off (atol above)
    # the round-off decides that step's size (up to lr, on any CPU), so the steps are compared exactly
    # where the gradient is well above it, and bounded by the largest learning rate elsewhere (parameters
    # without a gradient do not move).
    for name in params:
        clear = grads[name].abs() > 1e-4 if name in grads else torch.ones_like(params[name], dtype=torch.bool)
        torch.testing.assert_close(p0[name][clear], params[name][clear], rtol=1e-5, atol=1e-6)
        assert float((p0[name] - params[name]).abs().max()) <= 2 * 1e-2, name
    assert any(not torch.equal(before[n], params[n]) for n in params)  # the step did move the weights


def test_fit_distributed_ranks_agree(ranks):
    results, out_dir = ranks
    r0, r1 = results
    _assert_same(r0["fit"], r1["fit"], rtol=0, atol=0)
    assert r0["loss_curve"] == r1["loss_curve"] and len(r0["loss_curve"]) == 2
    assert r0["validation_scores"] == r1["validation_scores"] and len(r0["validation_scores"]) == 2
    assert r0["n_iter"] == r1["n_iter"] == 2
    np.testing.assert_allclose(r0["predict"], r1["predict"])
    assert np.isfinite(r0["loss_curve"]).all()
    assert (out_dir / "ckpt" / "last.pt").is_file()
    _assert_same(r0["resumed"], r0["fit"], rtol=0, atol=0)
    _assert_same(r1["resumed"], r0["fit"], rtol=0, atol=0)


def test_fit_distributed_needs_a_process_group():
    from luab_sk.estimators._ddp import fit_distributed

    X, y, Z = _data(6)
    with pytest.raises(RuntimeError, match="process group"):
        fit_distributed(_estimator(), X, y, Z)
