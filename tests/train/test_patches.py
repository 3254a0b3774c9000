"""roi_align against a direct per-bin implementation; one grouped pass == P separate BN passes (outputs,
gradients, running stats, counters); fixed_batch_norm."""
import copy
import math

import pytest
import torch

from concept_kernels.train import roi_align
from concept_kernels.train.backbones import create_backbone
from concept_kernels.method import fixed_batch_norm, grouped_batch_norm


def _bilinear(img, y, x):
    C, H, W = img.shape
    if y < -1 or y > H or x < -1 or x > W:
        return torch.zeros(C, dtype=img.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= H - 1:
        y0 = y1 = H - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= W - 1:
        x0 = x1 = W - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * img[:, y0, x0] + (1 - ly) * lx * img[:, y0, x1]
            + ly * (1 - lx) * img[:, y1, x0] + ly * lx * img[:, y1, x1])


def _roi_align_loops(x, boxes, out, scale):
    """torchvision roi_align(aligned=True, sampling_ratio=-1), written out per bin and sample."""
    R = boxes.shape[0]
    res = torch.zeros(R, x.shape[1], out, out, dtype=x.dtype)
    for r in range(R):
        b, x1, y1, x2, y2 = boxes[r].tolist()
        x1, y1, x2, y2 = x1 * scale - 0.5, y1 * scale - 0.5, x2 * scale - 0.5, y2 * scale - 0.5
        bh, bw = (y2 - y1) / out, (x2 - x1) / out
        gh, gw = max(1, math.ceil((y2 - y1) / out)), max(1, math.ceil((x2 - x1) / out))
        for i in range(out):
            for j in range(out):
                acc = 0
                for iy in range(gh):
                    for ix in range(gw):
                        acc = acc + _bilinear(x[int(b)], y1 + i * bh + (iy + 0.5) * bh / gh,
                                              x1 + j * bw + (ix + 0.5) * bw / gw)
                res[r, :, i, j] = acc / (gh * gw)
    return res


def test_roi_align_matches_loops_and_exact_crops():
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    boxes = torch.tensor([[0, 0, 0, 8, 8], [1, 4, 2, 12, 10], [1, 0, 4, 4, 12],  # integer boxes
                          [0, 1.3, 2.7, 9.1, 7.2], [1, -0.8, 3.0, 12.6, 11.9]], dtype=torch.float64)  # fractional
    for out in (2, 4, 8):
        torch.testing.assert_close(roi_align(x, boxes, (out, out)), _roi_align_loops(x, boxes, out, 1.0))
    torch.testing.assert_close(roi_align(x, boxes[:, :], (3, 3), 0.5), _roi_align_loops(x, boxes, 3, 0.5))
    crop = roi_align(x, boxes[1:2], (8, 8))  # 8-px box, output 8: the exact pixels
    torch.testing.assert_close(crop[0], x[1, :, 2:10, 4:12])


def _batch_norms(net):
    return [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _assert_buffers_equal(actual, expected, rtol=1e-12, atol=1e-12):
    """All buffers (running stats close, counters exactly equal) of two copies of one network."""
    theirs = dict(expected.named_buffers())
    assert set(theirs) == {n for n, _ in actual.named_buffers()}
    for n, b in actual.named_buffers():
        if b.is_floating_point():
            torch.testing.assert_close(b, theirs[n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"buffer {n}: {m}")
        else:
            assert torch.equal(b, theirs[n]), f"buffer {n}: {b} != {theirs[n]}"


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_grouped_bn_one_pass_equals_separate_passes(layout):
    """The published P patch passes (train mode) == one (P*B) pass, per-position stats: features,
    gradients, and every BN buffer (running stats at the modules' momentum 0.1, counters)."""
    torch.manual_seed(0)
    # float64: 40-odd BN layers normalising 4 values each amplify fp32 reordering noise to ~1e-2
    net = create_backbone("tf_efficientnet_lite0", pretrained=False).double().to(memory_format=layout)
    net.train()
    ref = copy.deepcopy(net)
    assert {m.momentum for m in _batch_norms(net)} == {0.1}
    B, P = 4, 3
    # position-major, as ConceptTuner._patches orders them
    crops = torch.randn(P * B, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=layout)
    w = torch.randn(B, P, 1280, dtype=torch.float64)
    before = {k: v.clone() for k, v in net.state_dict().items() if "running_mean" in k}
    with grouped_batch_norm(P, net):
        one = net.forward_features(crops).mean((2, 3)).view(P, B, -1).transpose(0, 1)
    (one * w).sum().backward()
    sep = torch.stack([ref.forward_features(crops[p * B:(p + 1) * B]).mean((2, 3)) for p in range(P)], 1)
    (sep * w).sum().backward()
    torch.testing.assert_close(one, sep, atol=1e-9, rtol=1e-9)
    grads = dict(ref.named_parameters())
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-6, rtol=1e-6, msg=lambda m, n=n: f"grad {n}: {m}")
    _assert_buffers_equal(net, ref, rtol=1e-9, atol=1e-9)
    assert all(not torch.equal(v, before[k]) for k, v in net.state_dict().items() if k in before)  # they moved


class _BNNet(torch.nn.Module):
    """conv + BN + ReLU, conv + BN (no affine) + ReLU, conv + BN without running stats: real
    nn.BatchNorm2d modules, the second one's input depends on the first one's batch statistics."""

    def __init__(self, momentum):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.BatchNorm2d(5, momentum=momentum), torch.nn.ReLU(),
            torch.nn.Conv2d(5, 6, 1), torch.nn.BatchNorm2d(6, momentum=momentum, affine=False), torch.nn.ReLU(),
            torch.nn.Conv2d(6, 4, 1), torch.nn.BatchNorm2d(4, track_running_stats=False))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("momentum", [0.1, 0.0, None])
def test_grouped_bn_buffers_as_separate_train_passes(momentum, layout):
    """G=3 groups of B=2: after each of two grouped passes, running mean/var (EMA with each group's
    unbiased variance at momentum 0.1; unchanged at 0; the cumulative average for None) and
    num_batches_tracked (+G) equal those of G separate train-mode passes of the same nn.BatchNorm2d
    modules (float64); outputs and input gradients too."""
    torch.manual_seed(1)
    G, B = 3, 2
    net = _BNNet(momentum).double().to(memory_format=layout).train()
    with torch.no_grad():  # non-trivial starting buffers; a counter > 0 makes the cumulative average non-trivial
        for m in _batch_norms(net)[:2]:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(4)
    ref = copy.deepcopy(net)
    initial = copy.deepcopy(net)
    for _ in range(2):
        x = (3 * torch.randn(G * B, 3, 5, 5, dtype=torch.float64) + 1).contiguous(memory_format=layout)
        x.requires_grad_(True)
        xr = x.detach().clone().requires_grad_(True)
        dy = torch.randn(G * B, 4, 5, 5, dtype=torch.float64)
        with grouped_batch_norm(G, net):
            y = net(x)
        (y * dy).sum().backward()
        yr = torch.cat([ref(xr[g * B:(g + 1) * B]) for g in range(G)])
        (yr * dy).sum().backward()
        torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
        _assert_buffers_equal(net, ref)
    for bn, bn0 in zip(_batch_norms(net)[:2], _batch_norms(initial)[:2]):
        assert int(bn.num_batches_tracked) == 4 + 2 * G
        assert torch.equal(bn.running_mean, bn0.running_mean) == (momentum == 0.0)  # moved unless momentum 0


def test_grouped_bn_eval_mode_uses_running_stats():
    """Eval mode: batch norms with running stats use them and leave them alone; the one without
    running stats still normalises each group with its own batch statistics."""
    net = _BNNet(0.1).double().eval()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    before = copy.deepcopy(net)
    with grouped_batch_norm(3, net):
        y = net(x)
    torch.testing.assert_close(y, torch.cat([before(x[g * 2:(g + 1) * 2]) for g in range(3)]), rtol=0, atol=0)
    _assert_buffers_equal(net, before, rtol=0, atol=0)


def test_grouped_bn_rejects_uneven_batch_foreign_and_repeated_batch_norms():
    bn = torch.nn.BatchNorm2d(4).train()
    with grouped_batch_norm(3, bn), pytest.raises(ValueError, match="multiple"):
        bn(torch.randn(4, 4, 2, 2))
    other = torch.nn.BatchNorm2d(4).train()
    with grouped_batch_norm(2, bn), pytest.raises(ValueError, match="not part of network"):
        other(torch.randn(4, 4, 2, 2))
    with grouped_batch_norm(2, bn), pytest.raises(ValueError, match="ran twice"):
        bn(bn(torch.randn(4, 4, 2, 2)))
    with pytest.raises(ValueError, match="groups must be an int >= 1, got 0"):
        with grouped_batch_norm(0, bn):
            pass
    with pytest.raises(TypeError, match="network must be an nn.Module, got int"):
        with grouped_batch_norm(2, 3):
            pass
    assert torch.nn.functional.batch_norm is batch_norm_before  # restored after every block


batch_norm_before = torch.nn.functional.batch_norm


def test_fixed_batch_norm_momentum_0_inside_restored_after():
    """The published fix_bn: momentum 0 in the block (running stats unchanged, the counter counts),
    each module's own momentum (None included) back afterwards, also after an exception."""
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.3), torch.nn.BatchNorm2d(3, momentum=None)).train()
    before = copy.deepcopy(net)
    with pytest.raises(RuntimeError, match="inside"):
        with fixed_batch_norm(net):
            assert [m.momentum for m in net] == [0.0, 0.0]
            net(torch.randn(4, 3, 2, 2))
            raise RuntimeError("inside")
    assert [m.momentum for m in net] == [0.3, None]
    for m, m0 in zip(net, before):
        assert torch.equal(m.running_mean, m0.running_mean) and torch.equal(m.running_var, m0.running_var)
        assert int(m.num_batches_tracked) == 1
