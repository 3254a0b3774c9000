"""Concept-Tuning on a timm model zoo (random init, tiny inputs): one step + backward + predict per family,
the token/NHWC -> (B, C, h, w) adapter against hand-made layouts, and clear errors for what has no map."""
import pytest
import torch
from torch import nn

from concept_kernels.train import ConceptTuner, create_backbone
from concept_kernels.train.feature_maps import to_feature_map

# name -> (image size, timm kwargs shrinking the model, expected (C, h, w) of the map)
ZOO = {
    "resnet18": (64, {}, (512, 2, 2)),
    "efficientnet_b0": (64, {}, (1280, 2, 2)),
    "mobilenetv3_small_100": (64, {}, (576, 2, 2)),
    "convnext_atto": (64, {}, (320, 2, 2)),
    "regnetx_002": (64, {}, (368, 2, 2)),
    "vit_tiny_patch16_224": (64, dict(depth=2), (192, 4, 4)),
    "deit_tiny_patch16_224": (64, dict(depth=2), (192, 4, 4)),
    "swin_tiny_patch4_window7_224": (64, dict(depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 2, 2)),
                                     (192, 2, 2)),
}


def _backbone(name, **kw):
    torch.manual_seed(0)
    from concept_kernels._compat import import_timm

    timm = import_timm()
    if kw:  # a shallower copy of the same architecture (the adapter sees the same classes and layouts)
        try:
            return timm.create_model(name, pretrained=False, num_classes=0, global_pool="", dynamic_img_size=True, **kw)
        except TypeError:
            return timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kw)
    return create_backbone(name, pretrained=False)


@pytest.mark.parametrize("name", list(ZOO))
def test_concept_step_on_the_zoo(name):
    size, kw, (C, h, w) = ZOO[name]
    net = ConceptTuner(_backbone(name, **kw), 5, (size, size), num_patches=4, num_confusing=3, queue_len=4)
    assert net.feature_size == (h, w) and net.head.in_features == C
    assert net.patch_pixels == 2 * size // h  # exact crops of two cells
    views, labels = torch.randn(4, 6, 3, size, size), torch.tensor([0, 1, 2, 3, 4, 0])
    out = net.step(views, labels)
    for k in ("loss", "ce", "img", "con", "ce_ib", "kl"):
        assert out[k].shape == () and torch.isfinite(out[k]) and out[k] != 0, k
    assert out["logits"].shape == (6, 5)
    out["loss"].backward()
    # every parameter forward_features uses gets a finite gradient, the stem's (first parameter) included
    # (timm heads such as mobilenetv3's conv_head or convnext's head norm run after forward_features: unused)
    grads = [p.grad for p in net.backbone.parameters() if p.requires_grad]
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    assert sum(g is not None for g in grads) >= 0.9 * len(grads)
    ib = [p.grad for p in net.ib.parameters()]
    assert all(g is not None for g in ib) and all(torch.isfinite(g).all() for g in ib)  # DANet + IB on the map
    pred = net.eval().predict(torch.randn(3, 3, size, size))
    assert pred["main"].shape == (3, 5) and pred["ib"].shape == (3, 5)


def test_vit_patch_pass_uses_the_crop_grid():
    """The patch pass feeds 32-px crops to a ViT trained at 64 px: the map is the crop's 2x2 token grid."""
    size, kw, _ = ZOO["vit_tiny_patch16_224"]
    net = ConceptTuner(_backbone("vit_tiny_patch16_224", **kw), 5, (size, size), num_patches=4, num_confusing=3,
                       queue_len=4)
    f = net.features(net.backbone, torch.randn(2, 3, net.patch_pixels, net.patch_pixels))
    assert f.shape == (2, 192, 2, 2)


class _Tokens(nn.Module):
    """forward_features returns [prefix tokens | patch tokens]: token (i, j) holds value 100*i + j."""

    def __init__(self, prefix, grid=(3, 4), C=2):
        super().__init__()
        self.num_prefix_tokens, self.grid, self.C = prefix, grid, C
        self.patch_embed = type("PE", (), {"patch_size": (8, 8)})()

    def forward_features(self, x):
        h, w = self.grid
        pos = torch.arange(h)[:, None] * 100 + torch.arange(w)[None, :]
        tokens = pos.reshape(1, h * w, 1).expand(x.shape[0], h * w, self.C).float()
        return torch.cat([torch.full((x.shape[0], self.num_prefix_tokens, self.C), -1.0), tokens], 1)


@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_tokens_land_on_their_grid_cell(prefix):
    m = _Tokens(prefix)
    f = to_feature_map(m, m.forward_features(torch.zeros(2, 3, 24, 32)), (24, 32))
    assert f.shape == (2, 2, 3, 4)
    expect = torch.arange(3)[:, None] * 100 + torch.arange(4)[None, :]
    assert torch.equal(f[1, 0], expect.float())  # row-major, no prefix token left


def test_nhwc_maps_are_permuted():
    m = nn.Identity()
    m.output_fmt = "NHWC"
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(to_feature_map(m, x, (96, 128)), x.permute(0, 3, 1, 2))


def test_unsupported_outputs_name_the_model():
    class Pooled(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 64)

    class Sequence(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 10, 64)

    with pytest.raises(ValueError, match="'Pooled'.*spatial map"):
        ConceptTuner(Pooled(), 5, (32, 32))
    with pytest.raises(ValueError, match="'Sequence'.*num_prefix_tokens"):
        ConceptTuner(Sequence(), 5, (32, 32))
    with pytest.raises(ValueError, match="expected 1 prefix"):
        to_feature_map(_Tokens(1, grid=(3, 4)), torch.zeros(1, 1 + 11, 2), (24, 32))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_roi_mode_on_token_maps(name):
    """roi mode (RoIAlign of the view's map) on a transformer's token map: same losses and gradients exist."""
    size, kw, (C, h, w) = ZOO[name]
    net = ConceptTuner(_backbone(name, **kw), 5, (size, size), patch_mode="roi", num_patches=4, num_confusing=3,
                       queue_len=4)
    out = net.step(torch.randn(2, 6, 3, size, size), torch.tensor([0, 1, 2, 3, 4, 0]))
    assert all(torch.isfinite(out[k]) and out[k] != 0 for k in ("con", "img", "ce_ib"))
    out["loss"].backward()
    assert next(net.backbone.parameters()).grad.abs().sum() > 0


def test_cli_fine_tunes_a_vit_end_to_end(tmp_path):
    """`python -m concept_kernels.train --model vit_tiny_patch16_224` on the built-in digits: trains, evaluates
    both heads, checkpoints (random init: no offline ViT weights exist)."""
    import json

    from concept_kernels.train.__main__ import main

    out = tmp_path / "vit"
    args = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--image-size", "32", "--batch-size", "4",
            "--shots-per-class", "2", "--epochs", "1", "--iters-per-epoch", "1", "--num-patches", "4",
            "--num-confusing", "3", "--queue-len", "4", "--test-limit", "8", "--threads", "1", "--no-progress",
            "--out", str(out)]
    assert main(args) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"acc_main", "acc_ib", "train_con"} <= set(row) and row["train_con"] > 0
    assert (out / "checkpoint.pt").exists()
