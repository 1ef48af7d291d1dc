"""LUABFineTuner on several GPUs: torch DistributedDataParallel, one process per GPU (``torchrun``).

The design (and why DDP under ``torchrun`` rather than Ray Train) is in ``docs/scale_out.md``. In short:

* every process builds the same model (seeded; DDP also broadcasts rank 0's weights when wrapping) and
  trains on its shard of each global batch; DDP averages the gradients, so one step equals a
  single-process step on the concatenated batch (exactly when every loss term is a mean over equally many
  samples on each rank: the label loss always; the click loss when the ranks see equally many clicks);
* ``estimator.batch_size`` stays the *global* batch: each rank loads ``batch_size // world_size``;
* the Z-aware augmentation carries over unchanged: sample i of epoch e is augmented with the generator
  ``(seed, e, i)`` (:func:`~luab_sk.estimators._augment.sample_generator`) whatever rank loads it, its
  click points moving with its crop and flip; a :class:`~torch.utils.data.DistributedSampler` seeded with
  the fit's seed (``set_epoch`` every epoch) deals the samples out; dropout is seeded per rank and epoch;
* validation (early stopping) is sharded too and the losses are summed over ranks with ``all_reduce``, so
  every rank takes the same stopping decision without a broadcast;
* checkpoints: rank 0 writes them (the fine-tuner's own ``_write_checkpoint``: atomic file plus checksum
  record), every rank reads them with ``weights_only=True`` after rank 0 has verified the file.

Usage (``torchrun --nproc_per_node=8 train.py``)::

    from luab_sk.estimators import LUABFineTuner
    from luab_sk.estimators._ddp import fit_distributed, init_from_env

    init_from_env()                     # NCCL on GPUs, gloo on CPUs
    ft = LUABFineTuner(..., batch_size=256, random_state=0)
    fit_distributed(ft, paths, y, Z)    # every rank ends with the same ft.model_
"""

from __future__ import annotations

import inspect
import os
from datetime import timedelta
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_consistent_length
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ..nn import label_loss, multitask_loss
from ._base import (
    check_byproducts,
    check_click_points,
    check_warm_start,
    drop_unusable_byproducts,
    encode_labels,
    seed_from,
    torch_seeded,
    validation_split,
)
from ._training import EarlyStopping
from .finetune import _as_float, _check_images, _epoch_seed, _warmup_cosine

__all__ = ["ddp_train_step", "fit_distributed", "finetune_loss", "init_from_env", "wrap_model"]


# ------------------------------------------------------------------------------------------ process group
def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Initialise the default process group from ``torchrun``'s environment (RANK, WORLD_SIZE, MASTER_*).

    Parameters
    ----------
    backend : str or None
        None: ``"nccl"`` when CUDA is available, else ``"gloo"``.
    timeout_s : float
        Collective timeout (a rank that dies makes the others fail after it instead of hanging forever).

    Returns
    -------
    (rank, world_size)
    """
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _rank_device(estimator) -> torch.device:
    """This rank's device: its local GPU under NCCL (or when CUDA is asked for), else the CPU."""
    wants_cuda = estimator.device in ("auto", None) or str(estimator.device).startswith("cuda")
    if wants_cuda and torch.cuda.is_available() and dist.get_backend() == "nccl":
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
        return torch.device("cuda", local)
    if str(estimator.device).startswith("cuda"):
        raise ValueError(
            f"device={estimator.device!r} under the {dist.get_backend()!r} backend: distributed GPU training "
            "needs the 'nccl' backend (init_from_env() picks it when CUDA is available)."
        )
    return torch.device("cpu")


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_int(value: int) -> int:
    t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
    dist.broadcast(t, src=0)
    return int(t.item())


def _sum_over_ranks(*values: float) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# -------------------------------------------------------------------------------------------- one step
def finetune_loss(estimator, output, y, z) -> torch.Tensor:
    """The fine-tuner's training objective on one batch (the same call as ``LUABFineTuner._train_epoch``)."""
    return multitask_loss(
        _as_float(output),
        y,
        z,
        task=estimator.task_,
        byproduct_weight=float(estimator.byproduct_weight),
        byproduct_target=estimator.byproduct_target_,
        byproduct_loss=estimator.byproduct_loss,
        grid_shape=estimator.grid_shape_,
        sigma=float(estimator.sigma),
    ).total


def wrap_model(model, device: torch.device, *, sync_batchnorm: bool = False, find_unused_parameters=False):
    """Wrap a ``_FineTuneNet`` in :class:`~torch.nn.parallel.DistributedDataParallel` on ``device``.

    ``sync_batchnorm=True`` converts batch norms to :class:`torch.nn.SyncBatchNorm` (statistics over the
    global batch, as on one GPU; costs a collective per layer). Frozen batch norms stay in eval mode either
    way (``_FineTuneNet.train``). DDP broadcasts rank 0's parameters and buffers here.
    """
    model = model.to(device)
    if sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        model,
        device_ids=ids,
        output_device=ids[0] if ids else None,
        find_unused_parameters=find_unused_parameters,
    )


def ddp_train_step(estimator, model, optimizer, batch, device, scheduler=None) -> torch.Tensor:
    """One optimisation step of LUABFineTuner's objective on this rank's share of a global batch.

    Parameters
    ----------
    estimator : LUABFineTuner
        Prepared (``task_``, ``byproduct_target_``, ``grid_shape_`` set, as :func:`fit_distributed` does).
    model : DistributedDataParallel
        From :func:`wrap_model`; ``loss.backward()`` all-reduces (averages) the gradients.
    optimizer : torch.optim.Optimizer
        Over the wrapped module's parameters (``estimator._optimizer(model.module)``).
    batch : tuple
        ``(images, y, z)`` as the fine-tuner's DataLoader yields them.
    device : torch.device
    scheduler : LR scheduler, optional
        Stepped after the optimizer.

    Returns
    -------
    torch.Tensor
        This rank's (detached) loss.
    """
    images, y, z = estimator._to_device(*batch, device)
    with estimator._autocast(device):
        output = model(images)
    loss = finetune_loss(estimator, output, y, z)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if estimator.clip_grad_norm is not None:  # on the averaged gradients: the same on every rank
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, float(estimator.clip_grad_norm))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach()


# --------------------------------------------------------------------------------------------- the fit
def prepare(estimator, X, y, Z=None):
    """Validate the data as ``LUABFineTuner.fit`` does and set the fitted attributes that need no model.

    Returns
    -------
    (X, labels, Z, n_outputs)
    """
    if hasattr(estimator, "_parameter_constraints"):  # what fit's @_fit_context checks
        estimator._validate_params()
    target = estimator._check_params()  # the checks the constraints cannot express
    if target is not None:  # (older fine-tuners set byproduct_target_ themselves)
        estimator.byproduct_target_ = target
    X = _check_images(X)
    check_consistent_length(X, y)
    check_classification_targets(y)
    labels = encode_labels(y)
    n_outputs = 1 if labels.task == "binary" else labels.classes.size
    Z = check_byproducts(Z, len(X))
    if Z is not None:
        check_click_points(Z, n_outputs)
    Z = drop_unusable_byproducts(Z, estimator.byproduct_weight)
    estimator.classes_, estimator.task_ = labels.classes, labels.task
    estimator.n_byproducts_ = 0 if Z is None else Z.shape[1]
    return X, labels, Z, n_outputs


def build_model(estimator, n_outputs: int, seed: int):
    """The fine-tuner's network (``_FineTuneNet``), built identically on every rank."""
    with torch_seeded(seed):
        per_class = estimator.head == "attention" and estimator.n_byproducts_ > 2
        return estimator._build_model(n_outputs, estimator.pretrained, per_class_maps=per_class)


def _train_loader(estimator, X, labels, Z, index, seed, rank, world):
    dataset = estimator._loader(X, labels.y, Z, index, seed, train=True).dataset
    local_batch = int(estimator.batch_size) // world
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    n_local = len(sampler)
    return DataLoader(
        dataset,
        batch_size=local_batch,
        sampler=sampler,
        drop_last=n_local > local_batch and n_local % local_batch == 1,  # batch norm needs 2 samples
        num_workers=int(estimator.num_workers),
        pin_memory=torch.cuda.is_available(),
    )


def _validation_loader(estimator, X, labels, index, seed, rank, world):
    dataset = estimator._loader(X, labels.y, None, index, seed, train=False).dataset
    shard = Subset(dataset, range(rank, len(dataset), world))  # no padding: every sample counted once
    return DataLoader(shard, batch_size=max(1, int(estimator.batch_size) // world), num_workers=0)


def _validation_score(estimator, model, loader, device):
    total, seen = 0.0, 0
    for images, y, _ in loader:
        images, y, _ = estimator._to_device(images, y, None, device)
        with estimator._autocast(device):
            logits = model(images).logits.float()
        total += float(label_loss(logits, y, estimator.task_)) * images.shape[0]
        seen += images.shape[0]
    total, seen = _sum_over_ranks(total, seen)
    return -total / seen


def fit_distributed(estimator, X, y, Z=None, *, sync_batchnorm: bool = False, find_unused_parameters=False):
    """Run ``estimator.fit(X, y, Z)`` with DDP across the processes of the default process group.

    Call it in every process (same arguments; the data may be paths that every node can read). Each rank
    ends with the same ``estimator.model_`` (unwrapped), ``loss_curve_`` (mean over all ranks' samples),
    ``validation_scores_`` and ``n_iter_``. Checkpoints in ``checkpoint_dir`` are written by rank 0 only
    and can be resumed by a distributed or a single-process fit with the same world size.

    Parameters
    ----------
    estimator : LUABFineTuner
        ``batch_size`` is the global batch and must be divisible by the world size.
    X, y, Z
        As for :meth:`LUABFineTuner.fit`.
    sync_batchnorm, find_unused_parameters : bool
        Passed to :func:`wrap_model`.

    Returns
    -------
    estimator
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "fit_distributed needs a process group: call init_from_env() under torchrun first."
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    if int(estimator.batch_size) % world:
        raise ValueError(
            f"batch_size={estimator.batch_size} (the global batch) must be divisible by the {world} "
            "processes."
        )
    X, labels, Z, n_outputs = prepare(estimator, X, y, Z)
    continuing = estimator.warm_start and hasattr(estimator, "model_")
    if continuing:
        extra = (
            (estimator.model_.head.kind,) if len(inspect.signature(check_warm_start).parameters) > 3 else ()
        )
        check_warm_start(estimator, labels, Z, *extra)
    device = _rank_device(estimator)

    checkpoint = None
    if rank == 0:  # verifies the checksum (and sets a damaged file aside) before anyone loads it
        checkpoint = estimator._read_checkpoint(X, labels, Z, continuing)
    dist.barrier()
    if rank != 0:
        checkpoint = estimator._read_checkpoint(X, labels, Z, continuing)
    if (checkpoint is None) != (_broadcast_int(checkpoint is None) == 1):
        raise RuntimeError("the ranks disagree about the checkpoint (was it replaced during start-up?).")
    seed = checkpoint["seed"] if checkpoint is not None else _broadcast_int(seed_from(estimator.random_state))

    module = estimator.model_ if continuing else build_model(estimator, n_outputs, seed)
    estimator.model_ = module
    model = wrap_model(
        module, device, sync_batchnorm=sync_batchnorm, find_unused_parameters=find_unused_parameters
    )
    module = model.module
    if estimator.channels_last:
        module.to(memory_format=torch.channels_last)
    train_index, val_index = np.arange(len(labels.y)), None
    if estimator.early_stopping:
        train_index, val_index = validation_split(labels, estimator.validation_fraction, seed)
    loader = _train_loader(estimator, X, labels, Z, train_index, seed, rank, world)
    steps = len(loader)
    optimizer = estimator._optimizer(module)
    warmup = round(float(estimator.warmup_epochs) * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(_warmup_cosine, warmup=warmup, total=estimator.max_iter * steps)
    )
    validation = None
    if val_index is not None:
        val_loader = _validation_loader(estimator, X, labels, val_index, seed, rank, world)
        validation = ((), partial(_validation_score, estimator, loader=val_loader, device=device))
    tracker = EarlyStopping(module, validation, float(estimator.tol), estimator.n_iter_no_change)
    start, estimator.loss_curve_ = 0, []
    if checkpoint is not None:
        start = estimator._restore(checkpoint, module, optimizer, scheduler, tracker, device)
        if scheduler.last_epoch != start * steps:
            raise ValueError(
                f"The checkpoint was written by a fit with another number of steps per epoch "
                f"({scheduler.last_epoch // max(start, 1)} against {steps} here): resume it with the same "
                "number of processes, or pass resume=False."
            )
    stop = start > 0 and checkpoint["stopped"]
    epoch = start
    while epoch < estimator.max_iter and not stop:
        loader.sampler.set_epoch(epoch)
        loader.dataset.epoch = epoch  # the augmentation generators (seed, epoch, sample index)
        torch.manual_seed(_epoch_seed(seed, epoch * world + rank))  # dropout: per rank and epoch
        model.train()
        running, seen = 0.0, 0
        for batch in loader:
            loss = ddp_train_step(estimator, model, optimizer, batch, device, scheduler)
            running += float(loss) * batch[0].shape[0]
            seen += batch[0].shape[0]
        running, seen = _sum_over_ranks(running, seen)
        estimator.loss_curve_.append(running / max(seen, 1))
        stop = tracker.update()  # the all-reduced validation score: the same decision on every rank
        epoch += 1
        if estimator.verbose > 0 and rank == 0:
            extra = f", validation score {tracker.scores[-1]:.5f}" if tracker.scores else ""
            print(f"Epoch {epoch}: loss {estimator.loss_curve_[-1]:.5f}{extra}", flush=True)
        if estimator.checkpoint_dir is not None and rank == 0:
            estimator._write_checkpoint(epoch, stop, seed, module, optimizer, scheduler, tracker)
        dist.barrier()  # nobody reads or overwrites a checkpoint while rank 0 writes it
    tracker.restore_best()
    module.eval()
    estimator.model_ = module
    estimator.n_iter_ = epoch
    estimator.validation_scores_ = tracker.scores
    return estimator
