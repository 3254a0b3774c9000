"""roi_align against a direct per-bin implementation; one grouped pass == P separate BN passes."""
import math

import pytest
import torch

from concept_kernels.train import roi_align
from concept_kernels.train.backbones import create_backbone
from concept_kernels.method import grouped_batch_norm


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


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_grouped_bn_one_pass_equals_separate_passes(layout):
    """The published P patch passes (train mode, BN momentum 0) == one (P*B) pass, per-position stats."""
    torch.manual_seed(0)
    # float64: 40-odd BN layers normalising 4 values each amplify fp32 reordering noise to ~1e-2
    net = create_backbone("tf_efficientnet_lite0", pretrained=False).double().to(memory_format=layout)
    net.train()
    B, P = 4, 3
    # position-major, as ConceptTuner._image_patches orders them
    crops = torch.randn(P * B, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=layout)
    w = torch.randn(B, P, 1280, dtype=torch.float64)
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    with grouped_batch_norm(P):
        one = net.forward_features(crops).mean((2, 3)).view(P, B, -1).transpose(0, 1)
    (one * w).sum().backward()
    g_one = {n: p.grad.clone() for n, p in net.named_parameters()}
    for k, v in net.state_dict().items():
        if "running" in k:
            assert torch.equal(v, before[k]), k  # running stats untouched
    net.zero_grad()
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    sep = torch.stack([net.forward_features(crops[p * B:(p + 1) * B]).mean((2, 3)) for p in range(P)], 1)
    (sep * w).sum().backward()
    torch.testing.assert_close(one, sep, atol=1e-9, rtol=1e-9)
    for n, p in net.named_parameters():
        torch.testing.assert_close(g_one[n], p.grad, atol=1e-6, rtol=1e-6, msg=lambda m, n=n: f"grad {n}: {m}")


def test_grouped_bn_rejects_uneven_batch():
    bn = torch.nn.BatchNorm2d(4).train()
    with grouped_batch_norm(3), pytest.raises(ValueError, match="multiple"):
        bn(torch.randn(4, 4, 2, 2))
