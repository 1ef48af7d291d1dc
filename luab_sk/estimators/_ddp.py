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
  record), every rank reads them with ``weights_only=True`` after rank 0 has verified the file;
* the fit itself is :meth:`LUABFineTuner._fit <luab_sk.estimators.LUABFineTuner>`, the fine-tuner's one
  code path on the training engine (:class:`luab_sk.nn.engine.Trainer`: ``fit_epochs`` over
  ``train_epoch``, the same hooks). Only how a rank takes part differs (:class:`_DDPRank`: its device, the
  checkpoint protocol, the seed broadcast, the DDP wrapper, the sharded loaders and the sums over ranks).

Usage (``torchrun --nproc_per_node=8 train.py``)::

    from luab_sk.estimators import LUABFineTuner
    from luab_sk.estimators._ddp import fit_distributed, init_from_env

    init_from_env()                     # NCCL on GPUs, gloo on CPUs
    ft = LUABFineTuner(..., batch_size=256, random_state=0)
    fit_distributed(ft, paths, y, Z)    # every rank ends with the same ft.model_
"""

from __future__ import annotations

import os
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ..nn.engine import LRScheduler, Trainer
from ._base import seed_from
from .finetune import _epoch_seed, _SingleProcess

__all__ = ["ddp_train_step", "fit_distributed", "init_from_env", "wrap_model"]


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


def ddp_train_step(estimator, model, optimizer, batch, device, scheduler=None) -> float:
    """One optimisation step of LUABFineTuner's objective on this rank's share of a global batch.

    The step of the fit's own loop: :meth:`luab_sk.nn.Trainer.train_epoch` over one batch with the
    fine-tuner's batch loss (``LUABFineTuner._batch_loss``) and gradient clipping (on the all-reduced
    gradients: the same on every rank).

    Parameters
    ----------
    estimator : LUABFineTuner
        Prepared (``task_``, ``byproduct_target_``, ``grid_shape_`` set, as a fit does).
    model : DistributedDataParallel or torch.nn.Module
        From :func:`wrap_model`, where ``loss.backward()`` all-reduces (averages) the gradients; or the
        plain network, for the single-process step.
    optimizer : torch.optim.Optimizer
        Over the network's parameters (``estimator._optimizer(network)``).
    batch : tuple
        ``(images, y, z)`` as the fine-tuner's DataLoader yields them.
    device : torch.device
    scheduler : LR scheduler, optional
        Stepped after the optimizer.

    Returns
    -------
    float
        This rank's loss.
    """
    hooks = [] if scheduler is None else [LRScheduler(scheduler)]
    trainer = Trainer(model, hooks, solver="AdamW", learning_rate=estimator.learning_rate)
    loss = partial(estimator._batch_loss, device=device)
    return trainer.train_epoch([batch], loss, optimizer, clip_grad_norm=estimator.clip_grad_norm)


# --------------------------------------------------------------------------------------------- the fit
class _DDPRank(_SingleProcess):
    """How one rank takes part in :meth:`LUABFineTuner._fit` (see the module docstring)."""

    def __init__(self, sync_batchnorm: bool, find_unused_parameters: bool) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.sync_batchnorm, self.find_unused_parameters = sync_batchnorm, find_unused_parameters

    def device(self, estimator):
        return _rank_device(estimator)

    def read_checkpoint(self, estimator, X, labels, Z, continuing):
        """Rank 0 verifies the checkpoint (and sets a damaged file aside) before anyone else loads it."""
        checkpoint = None
        if self.rank == 0:
            checkpoint = estimator._read_checkpoint(X, labels, Z, continuing)
        dist.barrier()
        if self.rank != 0:
            checkpoint = estimator._read_checkpoint(X, labels, Z, continuing)
        if (checkpoint is None) != (_broadcast_int(checkpoint is None) == 1):
            raise RuntimeError("the ranks disagree about the checkpoint (was it replaced during start-up?).")
        return checkpoint

    def seed(self, estimator, checkpoint):
        """Rank 0's seed (with ``random_state=None`` every rank would draw its own)."""
        if checkpoint is not None:
            return checkpoint["seed"]
        return _broadcast_int(seed_from(estimator.random_state))

    def wrap(self, module, device):
        model = wrap_model(
            module,
            device,
            sync_batchnorm=self.sync_batchnorm,
            find_unused_parameters=self.find_unused_parameters,
        )
        return model, model.module

    def train_loader(self, estimator, X, y, Z, index, seed, label_clicks):
        """This rank's share of every global batch: ``batch_size // world`` samples, dealt out by a
        :class:`~torch.utils.data.DistributedSampler` seeded with the fit's seed."""
        dataset = estimator._dataset(X, y, Z, index, seed, train=True, label_clicks=label_clicks)
        local_batch = int(estimator.batch_size) // self.world
        sampler = DistributedSampler(
            dataset, num_replicas=self.world, rank=self.rank, shuffle=True, seed=seed
        )
        n_local = len(sampler)
        return DataLoader(
            dataset,
            batch_size=local_batch,
            sampler=sampler,
            drop_last=n_local > local_batch and n_local % local_batch == 1,  # batch norm needs 2 samples
            num_workers=int(estimator.num_workers),
            pin_memory=torch.cuda.is_available(),
        )

    def validation_loader(self, estimator, X, y, index, seed):
        """A strided shard of the validation samples (no padding: every sample counted once)."""
        dataset = estimator._dataset(X, y, None, index, seed, train=False)
        shard = Subset(dataset, range(self.rank, len(dataset), self.world))
        return DataLoader(shard, batch_size=max(1, int(estimator.batch_size) // self.world), num_workers=0)

    def start_epoch(self, loader, epoch, seed):
        loader.sampler.set_epoch(epoch)  # the data order of this epoch
        loader.dataset.epoch = epoch  # the augmentation generators (seed, epoch, sample index)
        torch.manual_seed(_epoch_seed(seed, epoch * self.world + self.rank))  # dropout: per rank and epoch

    def sum(self, *values):
        return _sum_over_ranks(*values)

    def verbose(self, estimator):
        return estimator.verbose if self.rank == 0 else 0

    def write_checkpoint(self, write):
        if self.rank == 0:
            write()
        dist.barrier()  # nobody reads or overwrites a checkpoint while rank 0 writes it


def fit_distributed(estimator, X, y, Z=None, *, sync_batchnorm: bool = False, find_unused_parameters=False):
    """Run ``estimator.fit(X, y, Z)`` with DDP across the processes of the default process group.

    Call it in every process (same arguments; the data may be paths that every node can read). Each rank
    ends with the same ``estimator.model_`` (unwrapped), ``loss_curve_`` (mean over all ranks' samples),
    ``validation_scores_`` and ``n_iter_``. Checkpoints in ``checkpoint_dir`` are written by rank 0 only
    and can be resumed by a distributed or a single-process fit with the same number of optimiser steps
    per epoch (the same world size). A fit that fails (a non-finite objective: every rank sees the same
    all-reduced loss and raises) leaves the estimator as :meth:`LUABFineTuner.fit` does.

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
    estimator._validate_params()  # what fit's @_fit_context checks
    world = dist.get_world_size()
    if int(estimator.batch_size) % world:
        raise ValueError(
            f"batch_size={estimator.batch_size} (the global batch) must be divisible by the {world} "
            "processes."
        )
    return estimator._fit(X, y, Z, _DDPRank(sync_batchnorm, find_unused_parameters))
