"""Multitask heads: a shared trainable part feeding a label head and a byproduct head.

Every head maps its input to one :class:`HeadOutput`. The heads do not care where their input comes
from (cached embeddings, a frozen backbone, a backbone being fine-tuned): pooled heads take ``(B, d)``
features, the attention head takes ``(B, L, C)`` tokens laid out row-major on a ``grid_shape`` grid.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .._grid import cell_centers

__all__ = [
    "HEADS",
    "HeadOutput",
    "HeadSpec",
    "PooledHead",
    "AttentionHead",
    "build_head",
    "head_spec",
    "token_centers",
]


class HeadOutput(NamedTuple):
    """What every head returns.

    Attributes
    ----------
    logits : Tensor of shape (B, n_outputs)
        Label scores (one column for a binary task).
    byproducts : Tensor of shape (B, k) or None
        Predicted byproducts. For pooled heads, the regression output (``None`` when the head has no
        byproduct outputs). For the attention head, the soft-argmax point of every map, columns
        ``[x_0, y_0, x_1, y_1, ...]`` in [0, 1] image coordinates.
    attention : Tensor of shape (B, n_maps, L) or None
        Attention maps over the L tokens (each row sums to 1); ``None`` for pooled heads.
    """

    logits: Tensor
    byproducts: Tensor | None
    attention: Tensor | None


class HeadSpec(NamedTuple):
    """What a kind of head can do; estimators ask the spec (:data:`HEADS`), never compare names.

    Attributes
    ----------
    name : str
        The ``head`` parameter value.
    input : {"pooled", "tokens"}
        ``"pooled"``: ``(B, d)`` features; ``"tokens"``: ``(B, L, C)`` tokens on a grid.
    targets : tuple of str
        The ``byproduct_target`` values of :func:`~luab_sk.nn.multitask_loss` it supports; the first is the
        default. ``"regression"`` reads ``HeadOutput.byproducts`` as free outputs; ``"heatmap"`` and
        ``"point"`` supervise the attention maps with click points.
    closed_form_init : bool
        A deterministic closed-form (or convex) start exists (:func:`~luab_sk.nn.reduced_rank_init_`),
        loaded into the module before iterative training.
    rank_bottleneck : bool
        ``hidden_size`` is the rank of a linear map: a rank above ``n_outputs + n_byproducts`` (or the input
        width) represents nothing new, so estimators cap it.
    convex_solver : bool
        Full-batch training has an equivalent convex problem and a solver for it
        (:func:`~luab_sk.nn.solvers.fit_linear_head`: the linear bottleneck, whose ``alpha / 2`` on both
        factors is ``alpha`` times the nuclear norm of their product at the optimum); estimators use it
        instead of L-BFGS on the factors.
    """

    name: str
    input: str
    targets: tuple[str, ...]
    closed_form_init: bool = False
    rank_bottleneck: bool = False
    convex_solver: bool = False

    @property
    def spatial(self) -> bool:
        """Reads tokens on a grid, has attention maps, and its byproducts are the maps' points."""
        return self.input == "tokens"


#: The head registry: one :class:`HeadSpec` per ``head`` value, in the estimators' documented order.
HEADS: dict[str, HeadSpec] = {
    "linear": HeadSpec(
        "linear", "pooled", ("regression",), closed_form_init=True, rank_bottleneck=True, convex_solver=True
    ),
    "mlp": HeadSpec("mlp", "pooled", ("regression",)),
    "attention": HeadSpec("attention", "tokens", ("heatmap", "point")),
}


def head_spec(kind: str) -> HeadSpec:
    """The :class:`HeadSpec` of ``kind``, or a ValueError naming the known heads.

    Examples
    --------
    >>> head_spec("attention").spatial, head_spec("linear").closed_form_init
    (True, True)
    """
    try:
        return HEADS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"kind must be one of {', '.join(map(repr, HEADS))}; got {kind!r}.") from None


class PooledHead(nn.Module):
    """Shared trunk, then a label head and a byproduct head, on pooled ``(B, d)`` features.

    Both heads read the trunk's output, so the byproduct loss shapes the representation the label head
    sees: this is what lets a byproduct weight change the classifier.

    Parameters
    ----------
    in_features : int
        Width d of the input features.
    n_outputs : int
        Number of label scores.
    n_byproducts : int, default=0
        Number of byproduct columns to regress (0: no byproduct head).
    kind : {"linear", "mlp"}, default="linear"
        ``"linear"``: the trunk is a linear bottleneck ``d -> hidden_size`` (a rank constraint shared by
        both heads). ``"mlp"``: ``n_layers`` hidden layers of width ``hidden_size`` with ReLU.
    hidden_size : int, default=128
        Rank of the linear bottleneck or width of the hidden layers.
    n_layers : int, default=1
        Number of hidden layers (``kind="mlp"`` only).
    generator : torch.Generator, optional
        CPU generator of the initial weights (PyTorch's default initialisation of ``nn.Linear``); None uses
        torch's global generator. A local generator makes the weights independent of other threads.

    Examples
    --------
    >>> import torch
    >>> head = PooledHead(16, n_outputs=3, n_byproducts=2, kind="mlp", hidden_size=8)
    >>> out = head(torch.randn(5, 16))
    >>> tuple(out.logits.shape), tuple(out.byproducts.shape), out.attention
    ((5, 3), (5, 2), None)
    """

    def __init__(
        self,
        in_features: int,
        n_outputs: int,
        n_byproducts: int = 0,
        *,
        kind: str = "linear",
        hidden_size: int = 128,
        n_layers: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _check_positive(in_features=in_features, n_outputs=n_outputs, hidden_size=hidden_size)
        if n_byproducts < 0:
            raise ValueError(f"n_byproducts must be >= 0, got {n_byproducts}.")
        if kind == "linear":
            self.trunk = _linear(in_features, hidden_size, generator, bias=False)
        elif kind == "mlp":
            _check_positive(n_layers=n_layers)
            layers: list[nn.Module] = []
            width = in_features
            for _ in range(n_layers):
                layers += [_linear(width, hidden_size, generator), nn.ReLU()]
                width = hidden_size
            self.trunk = nn.Sequential(*layers)
        else:
            raise ValueError(f"kind must be 'linear' or 'mlp', got {kind!r}.")
        self.kind = kind
        self.label_head = _linear(hidden_size, n_outputs, generator)
        self.byproduct_head = _linear(hidden_size, n_byproducts, generator) if n_byproducts else None

    def forward(self, x: Tensor) -> HeadOutput:
        h = self.trunk(x)
        z = self.byproduct_head(h) if self.byproduct_head is not None else None
        return HeadOutput(self.label_head(h), z, None)


class AttentionHead(nn.Module):
    """Attention pooling over tokens with learned queries; the byproducts are tied to the attention map.

    Tokens are projected to ``hidden_size`` (a trainable width reduction), every learned query attends
    over the L tokens, and the label head reads the pooled vectors. The attention map (the mean over
    queries, or one map per class with ``per_class_maps=True``) is exposed so that click supervision
    (a heatmap loss or a soft-argmax point loss) trains where the head looks.

    Parameters
    ----------
    in_features : int
        Token width C.
    n_outputs : int
        Number of label scores.
    grid_shape : tuple of int
        ``(grid_h, grid_w)``; the L = grid_h * grid_w tokens are laid out row-major.
    hidden_size : int, default=64
        Width of the projected tokens.
    n_heads : int, default=1
        Number of learned queries when ``per_class_maps=False``; their maps are averaged into the single
        byproduct map, their pooled vectors are concatenated for the label head.
    per_class_maps : bool, default=False
        One query per output (COCO-AB style): class k's score reads its own pooled vector, and map k is
        supervised by class k's click.
    glimpse : float, optional
        Pool through a glimpse: multiply each query's attention by a Gaussian window of this width (a
        fraction of the image side) centred on its peak token, and renormalise, in training and
        prediction alike. Soft attention alone keeps some weight on the background, which matters
        when background tokens carry a shortcut; the returned maps are the unnarrowed attention.
    generator : torch.Generator, optional
        CPU generator of the initial weights; None uses torch's global generator.

    Examples
    --------
    >>> import torch
    >>> head = AttentionHead(32, n_outputs=4, grid_shape=(7, 7), hidden_size=16, n_heads=2)
    >>> out = head(torch.randn(3, 49, 32))
    >>> tuple(out.logits.shape), tuple(out.byproducts.shape), tuple(out.attention.shape)
    ((3, 4), (3, 2), (3, 1, 49))
    >>> bool(torch.allclose(out.attention.sum(-1), torch.ones(3, 1)))
    True
    """

    kind = "attention"

    def __init__(
        self,
        in_features: int,
        n_outputs: int,
        grid_shape: tuple[int, int],
        *,
        hidden_size: int = 64,
        n_heads: int = 1,
        per_class_maps: bool = False,
        glimpse: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _check_positive(
            in_features=in_features, n_outputs=n_outputs, hidden_size=hidden_size, n_heads=n_heads
        )
        if glimpse is not None and not glimpse > 0:
            raise ValueError(f"glimpse must be None or a positive width, got {glimpse!r}.")
        self.glimpse = None if glimpse is None else float(glimpse)
        grid_h, grid_w = (int(s) for s in grid_shape)
        _check_positive(grid_h=grid_h, grid_w=grid_w)
        self.grid_shape = (grid_h, grid_w)
        self.per_class_maps = bool(per_class_maps)
        n_queries = n_outputs if self.per_class_maps else n_heads
        self.proj = _linear(in_features, hidden_size, generator)
        scale = 1.0 / math.sqrt(hidden_size)
        self.queries = nn.Parameter(torch.randn(n_queries, hidden_size, generator=generator) * scale)
        if self.per_class_maps:
            self.class_weight = nn.Parameter(torch.randn(n_outputs, hidden_size, generator=generator) * scale)
            self.class_bias = nn.Parameter(torch.zeros(n_outputs))
        else:
            self.label_head = _linear(n_heads * hidden_size, n_outputs, generator)
        self.register_buffer("centers", token_centers(self.grid_shape), persistent=False)

    def forward(self, x: Tensor) -> HeadOutput:
        if x.ndim != 3 or x.shape[1] != self.centers.shape[0]:
            raise ValueError(
                f"expected tokens of shape (B, {self.centers.shape[0]}, C) for grid {self.grid_shape}, "
                f"got {tuple(x.shape)}."
            )
        h = self.proj(x)  # (B, L, D)
        scores = torch.einsum("bld,qd->bql", h, self.queries) / math.sqrt(h.shape[-1])
        attn = scores.softmax(dim=-1)  # (B, Q, L)
        pooled = self._glimpse(attn) @ h  # (B, Q, D)
        if self.per_class_maps:
            logits = (pooled * self.class_weight).sum(-1) + self.class_bias
            maps = attn
        else:
            logits = self.label_head(pooled.flatten(1))
            maps = attn.mean(dim=1, keepdim=True)
        points = (maps @ self.centers).flatten(1)  # soft-argmax, (B, 2 * n_maps) as x0, y0, x1, y1, ...
        return HeadOutput(logits, points, maps)

    def _glimpse(self, attn: Tensor) -> Tensor:
        """Pooling weights: the attention, narrowed to a Gaussian window around its peak token."""
        if self.glimpse is None:
            return attn
        peak = self.centers[attn.argmax(dim=-1)]  # (B, Q, 2)
        d2 = ((self.centers - peak.unsqueeze(2)) ** 2).sum(-1)  # (B, Q, L)
        weights = attn * torch.exp(-d2 / (2.0 * self.glimpse**2))
        return weights / weights.sum(dim=-1, keepdim=True)


def _linear(
    in_features: int, out_features: int, generator: torch.Generator | None, bias: bool = True
) -> nn.Linear:
    """An ``nn.Linear`` with PyTorch's default initialisation drawn from ``generator``.

    The layer is created on the meta device (which draws no random numbers), so building a head with a
    local generator leaves torch's global generator untouched.
    """
    layer = nn.Linear(in_features, out_features, bias=bias, device="meta").to_empty(device="cpu")
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    if bias:
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


def token_centers(grid_shape: tuple[int, int]) -> Tensor:
    """The (x, y) centre of every token of a row-major grid, in [0, 1] image coordinates.

    Parameters
    ----------
    grid_shape : tuple of int
        ``(grid_h, grid_w)``.

    Returns
    -------
    Tensor of shape (grid_h * grid_w, 2)
        Columns x (to the right) and y (down).

    Examples
    --------
    >>> token_centers((1, 2))
    tensor([[0.2500, 0.5000],
            [0.7500, 0.5000]])
    """
    return cell_centers(grid_shape, dtype=torch.float32)  # the one implementation: luab_sk._grid


def build_head(
    kind: str,
    in_features: int,
    n_outputs: int,
    n_byproducts: int = 0,
    *,
    hidden_size: int = 128,
    n_layers: int = 1,
    grid_shape: tuple[int, int] | None = None,
    n_heads: int = 1,
    per_class_maps: bool = False,
    glimpse: float | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Build a multitask head by name.

    Parameters
    ----------
    kind : {"linear", "mlp", "attention"}
        ``"linear"`` and ``"mlp"`` build a :class:`PooledHead` on ``(B, d)`` features; ``"attention"``
        builds an :class:`AttentionHead` on ``(B, L, C)`` tokens (``grid_shape`` is then required and
        ``n_byproducts`` is ignored: the byproducts are the attention maps' points).
    in_features : int
        Feature width d, or token width C.
    n_outputs : int
        Number of label scores.
    n_byproducts : int, default=0
        Byproduct columns of a pooled head.
    hidden_size, n_layers, grid_shape, n_heads, per_class_maps, glimpse, generator
        Passed to the head class.

    Returns
    -------
    torch.nn.Module
        A module whose forward returns a :class:`HeadOutput`.

    Examples
    --------
    >>> head = build_head("linear", 10, 3, n_byproducts=2, hidden_size=4)
    >>> type(head).__name__, head.kind
    ('PooledHead', 'linear')
    """
    spec = head_spec(kind)
    if not spec.spatial:
        return PooledHead(
            in_features,
            n_outputs,
            n_byproducts,
            kind=kind,
            hidden_size=hidden_size,
            n_layers=n_layers,
            generator=generator,
        )
    if grid_shape is None:
        raise ValueError(f"grid_shape is required for kind={kind!r}.")
    return AttentionHead(
        in_features,
        n_outputs,
        grid_shape,
        hidden_size=hidden_size,
        n_heads=n_heads,
        per_class_maps=per_class_maps,
        glimpse=glimpse,
        generator=generator,
    )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
