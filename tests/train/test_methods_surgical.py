"""Surgical fine-tuning by block name on two timm architectures: "first" / "middle" / "last" resolve to the
stem + first stage, the middle stage and the last stage (the blocks written out here from the
architectures), exactly the parameters under them (and the head) get gradients, and nothing else moves
in an SGD step."""
import pytest
import torch

from concept_kernels.train import ConceptTuner
from concept_kernels.train.__main__ import parse_args
from concept_kernels.train.backbones import create_backbone

EXPECTED = {  # lite0: 7 stages blocks.0..6 (+ conv_head, bn2); resnet18: 4 stages layer1..4
    "tf_efficientnet_lite0": dict(first=("conv_stem", "bn1", "blocks.0"), middle=("blocks.3",),
                                  last=("blocks.6", "conv_head", "bn2")),
    "resnet18": dict(first=("conv1", "bn1", "layer1"), middle=("layer3",), last=("layer4",)),
}


def _inside(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("model", sorted(EXPECTED))
def test_named_blocks_resolve_and_only_they_train(model):
    torch.manual_seed(0)
    backbone = create_backbone(model, pretrained=False)
    for block, prefixes in EXPECTED[model].items():
        torch.manual_seed(0)
        net = ConceptTuner(backbone, 5, (32, 32), method="surgical", method_options=dict(block=block))
        assert net.train_blocks == prefixes
        names = [n for n, _ in net.backbone.named_parameters()]
        assert all(any(_inside(n, (p,)) for n in names) for p in prefixes)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        opt = torch.optim.SGD(net.param_groups(0.1, 1.0), lr=0.1, weight_decay=1e-3)
        g = torch.Generator().manual_seed(1)
        net.train().step(torch.randn(1, 4, 3, 32, 32, generator=g), torch.randint(5, (4,), generator=g))["loss"] \
            .backward()
        opt.step()
        moved = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
        with_grad = {n for n, p in net.named_parameters() if p.grad is not None}
        want = {f"backbone.{n}" for n in names if _inside(n, prefixes)} | {"head.weight", "head.bias"}
        assert with_grad == want, block  # exactly these train
        assert moved <= want and {n for n in moved if n.startswith("backbone.")}, block  # (zero-init ones may not)
        backbone.requires_grad_(True).zero_grad(set_to_none=True)  # the next block starts afresh


def test_block_choices_and_errors(tiny_net):
    assert parse_args(["--method", "surgical", "--surgical-block", "last"]).surgical_block == "last"
    with pytest.raises(ValueError, match="surgical_block must be one of"):
        ConceptTuner(tiny_net(), 5, (32, 32), method="surgical", method_options=dict(block="top"))
    with pytest.raises(ValueError, match="not both"):
        ConceptTuner(tiny_net(), 5, (32, 32), method="surgical", train_blocks=("blocks.0",),
                     method_options=dict(block="first"))
    with pytest.raises(ValueError, match="group_matcher"):  # a plain nn.Module: no stages to name
        ConceptTuner(tiny_net(), 5, (32, 32), method="surgical", method_options=dict(block="first"))
    net = ConceptTuner(tiny_net(), 5, (32, 32), method="surgical", train_blocks=("blocks.6",))  # prefixes still work
    assert [n for n, p in net.backbone.named_parameters() if p.requires_grad] == ["blocks.6.weight"]
