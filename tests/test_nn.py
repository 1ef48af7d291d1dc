"""Tests for luab_sk.nn: heads and losses (plain torch)."""

import math

import pytest
import torch

from luab_sk.nn import (
    AttentionHead,
    HeadOutput,
    build_head,
    gaussian_heatmap,
    heatmap_loss,
    label_loss,
    masked_regression_loss,
    multitask_loss,
    point_loss,
    soft_argmax,
    token_centers,
)

NAN = float("nan")


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_pooled_heads_share_the_trunk(kind):
    torch.manual_seed(0)
    head = build_head(kind, 8, 3, n_byproducts=2, hidden_size=4, n_layers=2)
    out = head(torch.randn(6, 8))
    assert isinstance(out, HeadOutput)
    assert out.logits.shape == (6, 3) and out.byproducts.shape == (6, 2) and out.attention is None
    # The byproduct loss alone reaches the trunk, which the label head reads.
    out.byproducts.pow(2).sum().backward()
    trunk_grads = [p.grad for p in head.trunk.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in trunk_grads)
    assert head.label_head.weight.grad is None


def test_pooled_head_without_byproducts():
    out = build_head("linear", 5, 2)(torch.randn(3, 5))
    assert out.byproducts is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "conv"}, "kind must be one of"),
        ({"kind": "attention"}, "grid_shape is required"),
        ({"kind": "mlp", "hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"kind": "linear", "n_byproducts": -1}, "n_byproducts must be >= 0"),
    ],
)
def test_build_head_rejects_bad_arguments(kwargs, match):
    kind = kwargs.pop("kind")
    with pytest.raises(ValueError, match=match):
        build_head(kind, 4, 2, **kwargs)


def test_attention_head_shapes_and_maps():
    torch.manual_seed(0)
    head = AttentionHead(10, 5, (3, 4), hidden_size=6, n_heads=3)
    out = head(torch.randn(2, 12, 10))
    assert out.logits.shape == (2, 5) and out.attention.shape == (2, 1, 12) and out.byproducts.shape == (2, 2)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(2, 1))
    torch.testing.assert_close(out.byproducts, soft_argmax(out.attention, (3, 4)))
    with pytest.raises(ValueError, match=r"expected tokens of shape \(B, 12, C\)"):
        head(torch.randn(2, 9, 10))


def test_attention_head_per_class_maps():
    head = AttentionHead(10, 4, (2, 2), hidden_size=6, per_class_maps=True)
    out = head(torch.randn(3, 4, 10))
    assert out.logits.shape == (3, 4) and out.attention.shape == (3, 4, 4) and out.byproducts.shape == (3, 8)


def test_attention_head_moves_dtype_and_device():
    head = build_head("attention", 4, 2, grid_shape=(2, 2), hidden_size=3).double()
    out = head(torch.randn(1, 4, 4, dtype=torch.float64))
    assert out.logits.dtype == torch.float64 and out.byproducts.dtype == torch.float64


def test_token_centers_row_major():
    c = token_centers((2, 3))
    assert c.shape == (6, 2)
    torch.testing.assert_close(c[1], torch.tensor([0.5, 0.25]))  # row 0, column 1
    torch.testing.assert_close(c[3], torch.tensor([1 / 6, 0.75]))  # row 1, column 0


@pytest.mark.parametrize("kind", ["smooth_l1", "l2", "l1"])
def test_masked_regression_masks_per_element(kind):
    pred = torch.tensor([[0.0, 5.0], [1.0, 2.0]], requires_grad=True)
    target = torch.tensor([[0.5, NAN], [NAN, 1.0]])
    loss = masked_regression_loss(pred, target, kind)
    observed = masked_regression_loss(pred[[0, 1], [0, 1]].reshape(2, 1), torch.tensor([[0.5], [1.0]]), kind)
    torch.testing.assert_close(loss, observed)
    loss.backward()
    assert pred.grad[0, 1] == 0 and pred.grad[1, 0] == 0 and torch.isfinite(pred.grad).all()


def test_masked_regression_zero_when_nothing_observed():
    pred = torch.randn(3, 2, requires_grad=True)
    loss = masked_regression_loss(pred, torch.full((3, 2), NAN))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros(3, 2))


def test_masked_regression_sample_weight_and_errors():
    pred = torch.zeros(2, 1)
    target = torch.tensor([[1.0], [3.0]])
    loss = masked_regression_loss(pred, target, "l1", sample_weight=torch.tensor([3.0, 1.0]))
    assert loss.item() == pytest.approx((3 * 1 + 1 * 3) / 4)
    with pytest.raises(ValueError, match="byproduct_loss must be one of"):
        masked_regression_loss(pred, target, "huber")
    with pytest.raises(ValueError, match="same shape"):
        masked_regression_loss(pred, target.T, "l1")


def test_gaussian_heatmap_peaks_at_click_and_normalises():
    maps = gaussian_heatmap(torch.tensor([[0.9, 0.1, 0.1, 0.9]]), (4, 4), sigma=0.1)
    assert maps.shape == (1, 2, 16)
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 2))
    assert int(maps[0, 0].argmax()) == 3 and int(maps[0, 1].argmax()) == 12
    with pytest.raises(ValueError, match="sigma must be positive"):
        gaussian_heatmap(torch.zeros(1, 2), (2, 2), sigma=0)
    with pytest.raises(ValueError, match=r"points must have shape \(B, 2 \* P\)"):
        gaussian_heatmap(torch.zeros(1, 3), (2, 2))


def test_heatmap_loss_kl_ce_and_masking():
    grid = (3, 3)
    points = torch.tensor([[0.2, 0.2], [NAN, NAN]])
    uniform = torch.full((2, 1, 9), 1 / 9)
    target = gaussian_heatmap(points[:1], grid)
    kl = heatmap_loss(uniform, points, grid, kind="kl")
    ce = heatmap_loss(uniform, points, grid, kind="ce")
    entropy = -(target * target.log()).sum()
    torch.testing.assert_close(ce, torch.tensor(math.log(9)))
    torch.testing.assert_close(kl, ce - entropy)
    assert heatmap_loss(uniform, torch.full((2, 2), NAN), grid).item() == 0.0
    # Minimising the loss moves the map's peak to the click.
    logits = torch.zeros(1, 1, 9, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=5.0)
    for _ in range(50):
        opt.zero_grad()
        heatmap_loss(logits.softmax(-1), torch.tensor([[0.9, 0.9]]), grid).backward()
        opt.step()
    assert int(logits.argmax()) == 8
    with pytest.raises(ValueError, match="does not match points"):
        heatmap_loss(torch.full((2, 2, 9), 1 / 9), points, grid)


def test_point_loss_uses_soft_argmax():
    attn = torch.zeros(1, 1, 4)
    attn[0, 0, 3] = 1.0  # bottom-right token of a 2x2 grid
    torch.testing.assert_close(soft_argmax(attn, (2, 2)), torch.tensor([[0.75, 0.75]]))
    assert point_loss(attn, torch.tensor([[0.75, 0.75]]), (2, 2), kind="l2").item() == 0.0
    assert point_loss(attn, torch.tensor([[0.25, NAN]]), (2, 2), kind="l1").item() == pytest.approx(0.5)


def test_label_loss_tasks():
    logits = torch.tensor([[2.0, -1.0], [0.0, 0.5]])
    torch.testing.assert_close(
        label_loss(logits, torch.tensor([0, 1]), "multiclass"),
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])),
    )
    torch.testing.assert_close(
        label_loss(logits[:, :1], torch.tensor([1, 0]), "binary"),
        torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], torch.tensor([1.0, 0.0])),
    )
    y = torch.tensor([[1, 0], [1, 1]])
    torch.testing.assert_close(
        label_loss(logits, y, "multilabel"),
        torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float()),
    )
    weighted = label_loss(logits, torch.tensor([0, 1]), "multiclass", sample_weight=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(weighted, torch.nn.functional.cross_entropy(logits[:1], torch.tensor([0])))
    with pytest.raises(ValueError, match="task must be one of"):
        label_loss(logits, y, "ordinal")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_multiclass_label_gradient_has_no_subnormal_floats(dtype):
    """Confident logits give class probabilities that underflow to subnormal floats, whose arithmetic is many
    times slower on x86 CPUs; the gradient uses at least exp(-60) instead (the value stays exact), in the
    logits' dtype, and otherwise equals cross_entropy's."""
    logits = torch.tensor([[0.0, -200.0, 80.0], [1.0, 2.0, 3.0]], dtype=dtype, requires_grad=True)
    target = torch.tensor([2, 0])
    value = label_loss(logits, target, "multiclass", sample_weight=torch.tensor([1.0, 3.0]))
    value.backward()
    grad = logits.grad
    assert grad.dtype == dtype
    tiny = torch.finfo(torch.float32).tiny
    assert not bool(((grad != 0) & (grad.float().abs() < tiny)).any())
    reference = logits.detach().float().requires_grad_()
    expected = (
        torch.nn.functional.cross_entropy(reference, target, reduction="none") * torch.tensor([1.0, 3.0])
    ).sum() / 4
    expected.backward()
    torch.testing.assert_close(value.float(), expected.detach())
    torch.testing.assert_close(
        grad.float(), reference.grad, atol=1e-20 if dtype != torch.bfloat16 else 1e-2, rtol=1e-2
    )


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_sigmoid_label_gradient_has_no_subnormal_floats(task):
    """The sigmoid losses' gradient uses sigmoid(max(logit, -60)): no subnormal floats; the value is exact."""
    logits = torch.tensor([[-200.0, 3.0], [100.0, -1.0]], requires_grad=True)
    target = torch.tensor([[0, 1], [1, 0]])
    rows = logits[:, :1] if task == "binary" else logits
    y = target[:, 0] if task == "binary" else target
    value = label_loss(rows, y, task)
    value.backward()
    grad = logits.grad
    assert not bool(((grad != 0) & (grad.abs() < torch.finfo(torch.float32).tiny)).any())
    reference = logits.detach().clone().requires_grad_()
    ref_rows = reference[:, :1] if task == "binary" else reference
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = bce(ref_rows.reshape(-1), y.float()) if task == "binary" else bce(ref_rows, y.float())
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, reference.grad, atol=1e-20, rtol=1e-6)


def test_multitask_loss_combines_and_skips():
    torch.manual_seed(0)
    head = build_head("linear", 4, 3, n_byproducts=2, hidden_size=3)
    out = head(torch.randn(5, 4))
    y = torch.tensor([0, 1, 2, 0, 1])
    z = torch.randn(5, 2)
    parts = multitask_loss(out, y, z, byproduct_weight=2.0, byproduct_loss="l2")
    torch.testing.assert_close(parts.byproduct, masked_regression_loss(out.byproducts, z, "l2"))
    torch.testing.assert_close(parts.total, parts.label + 2.0 * parts.byproduct)
    assert multitask_loss(out, y, None).total.item() == pytest.approx(parts.label.item())
    assert multitask_loss(out, y, z, byproduct_weight=0).byproduct.item() == 0.0
    with pytest.raises(ValueError, match="byproduct_target must be one of"):
        multitask_loss(out, y, z, byproduct_target="trace")
    with pytest.raises(ValueError, match="needs an attention head"):
        multitask_loss(out, y, z, byproduct_target="heatmap")


@pytest.mark.parametrize("target", ["heatmap", "point"])
def test_multitask_loss_attention_targets_train_the_map(target):
    torch.manual_seed(0)
    head = build_head("attention", 3, 2, grid_shape=(2, 2), hidden_size=4)
    x = torch.randn(8, 4, 3)
    z = torch.tensor([[0.25, 0.25]]).repeat(8, 1)
    parts = multitask_loss(
        head(x), torch.zeros(8, dtype=torch.long), z, byproduct_target=target, grid_shape=(2, 2)
    )
    parts.byproduct.backward()
    assert head.queries.grad.abs().sum() > 0 and head.proj.weight.grad.abs().sum() > 0


def test_attention_glimpse_narrows_pooling_but_not_maps():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4)
    soft = AttentionHead(4, 2, (3, 3), hidden_size=4)
    narrow = AttentionHead(4, 2, (3, 3), hidden_size=4, glimpse=1e-3)
    narrow.load_state_dict(soft.state_dict())
    out_soft, out_narrow = soft(x), narrow(x)
    torch.testing.assert_close(out_soft.attention, out_narrow.attention)
    # A tiny window pools the peak token alone.
    peak = soft.proj(x)[torch.arange(2), out_soft.attention[:, 0].argmax(-1)]
    torch.testing.assert_close(out_narrow.logits, soft.label_head(peak))
    with pytest.raises(ValueError, match="glimpse must be None or a positive width"):
        AttentionHead(4, 2, (3, 3), glimpse=-1.0)
