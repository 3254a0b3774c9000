"""The trainer's settings: :class:`Config` (each field is a flag of ``python -m concept_kernels.train``) and
the values derived from it that the published recipe fixes (the key encoder's momentum, the backbone's lr)."""
from __future__ import annotations

import dataclasses

# the published recipe: m = 0.999 over 40 epochs x 500 steps, so the EMA's time constant 1/(1-m) is 5% of the run
PUBLISHED_KEY_LAG = (1 / (1 - 0.999)) / (40 * 500)
KEY_MOMENTUM_RANGE = (0.5, 0.9999)


def resolve_key_momentum(value: float | str, total_steps: int) -> float:
    """The key encoder's EMA momentum m for a run of ``total_steps`` optimizer steps.

    A number in [0, 1] is used as given. ``"auto"`` keeps the published lag as a fraction of training:
    the EMA's time constant 1/(1-m) steps is 5% of the run as in the published recipe (m = 0.999 over
    20,000 steps), i.e. m = 1 - 1 / (0.05 * total_steps) = 1 - 20 / total_steps, clamped to
    [0.5, 0.9999] (20,000 steps -> 0.999; 400 -> 0.95; 40 or fewer -> 0.5).
    """
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            m = 1.0 - 1.0 / (PUBLISHED_KEY_LAG * max(total_steps, 1))
            return min(max(m, KEY_MOMENTUM_RANGE[0]), KEY_MOMENTUM_RANGE[1])
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"key_momentum must be a number in [0, 1] or 'auto', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"key_momentum must be a number in [0, 1] or 'auto', got {value!r}")
    return float(value)


def backbone_lr_mult(cfg: Config) -> float:
    """The backbone's lr / lr: ``cfg.backbone_lr_mult``, else as published (0.1; 1.0 with the cosine option)."""
    if cfg.backbone_lr_mult is not None:
        return cfg.backbone_lr_mult
    return 1.0 if cfg.schedule == "cos" else 0.1


def _doc(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Config:
    """A run's settings; each field is a flag of ``python -m concept_kernels.train``."""
    model: str = _doc("tf_efficientnet_lite0", "timm model name (needs a 4-D feature map)")
    pretrained: bool = _doc(True, "ImageNet weights (offline for (tf_)efficientnet_lite0/1/2)")
    data: str | None = _doc(None, "ImageFolder root with train/ and val/, or a built-in offline task: "
                                  "builtin:digits (sklearn digits, the default) or builtin:animals (animal-mnist)")
    shots_per_class: int | None = _doc(None, "training images per class (<=0: all; default: 10 for the built-in "
                                             "few-shot tasks, all for an ImageFolder)")
    image_size: int = 96
    method: str = "concept"
    patch_mode: str = "image"
    epochs: int = 10
    batch_size: int = 32
    iters_per_epoch: int = _doc(0, "0: one pass over the training set")  # (drop_last)
    lr: float = _doc(0.01, "learning rate of the heads (and the backbone x --backbone-lr-mult)")
    backbone_lr_mult: float | None = _doc(None, "backbone lr / lr (default as published, method_spec §6: 0.1 "
                                                "with --schedule multistep, 1.0 with cos)")
    schedule: str = _doc("multistep", "multistep (MultiStepLR at --milestones) or cos (CosineAnnealingLR over "
                                      "the epochs), stepped per epoch")
    milestones: tuple[int, ...] = _doc((12, 24), "multistep epochs (x0.1 each)")
    momentum: float = _doc(0.9, "SGD momentum (the key encoder's EMA momentum is --key-momentum)")
    weight_decay: float = 5e-4
    nesterov: bool = True
    seed: int = 0
    amp: bool = _doc(False, "bfloat16 autocast (GPU only)")
    out: str = _doc("runs/concept", "output dir (metrics.jsonl, checkpoint.pt)")
    resume: bool = _doc(False, "continue from <out>/checkpoint.pt")
    overwrite: bool = _doc(False, "allow a non-empty output dir without --resume")
    num_patches: int = 9
    num_confusing: int | None = _doc(None, "N_conf (default min(100, classes-1))")
    queue_len: int = 40
    key_momentum: float | str = _doc(0.999, "EMA momentum m of the key encoder (published 0.999, made for ~20,000 "
                                            "steps); 'auto': m from the run's length, see resolve_key_momentum")
    temperature: float = _doc(0.07, "contrastive temperature T (published 0.07)")
    sinkhorn_stop: str = _doc("published", "published: one mean Sinkhorn error per call, as published; problem: "
                                           "each OT problem stops on its own (faster, NOT equivalent)")
    patch_pixels: int | None = _doc(None, "image-mode crop side (default 2x stride: exact crops)")
    train_blocks: tuple[str, ...] = _doc((), "surgical: backbone prefixes, e.g. blocks.0,blocks.1")
    w_img: float = 1.0
    w_con: float = 1.0
    w_ce_ib: float = 1.0
    w_kl: float = 5e-3
    l2sp_alpha: float = _doc(0.01, "l2sp: weight a of a/2 ||w - w0||^2 over the backbone (w0: pretrained)")
    l2sp_beta: float = _doc(0.01, "l2sp: weight b of b/2 ||w_head||^2 (l2sp runs without weight decay)")
    bss_eta: float = _doc(1e-3, "bss: weight of the k smallest squared singular values of the batch features")
    bss_k: int = _doc(1, "bss: how many of the smallest singular values are shrunk")
    stochnorm_p: float = _doc(0.5, "stochnorm: probability that a BN channel uses batch (not moving) statistics")
    wise_alphas: tuple[float, ...] = _doc((0.0, 0.25, 0.5, 0.75, 1.0), "wiseft: interpolation weights evaluated "
                                          "at the end (<out>/wise_ft.json)")
    wise_probe_l2: float = _doc(1e-3, "wiseft: L2 weight of the linear probe that gives theta_0's head")
    # counterfactual
    cf_weight: float = _doc(30.0, "counterfactual: weight of the MSE of the features on the masked-and-refilled "
                                  "images to the frozen pretrained backbone's (published 30)")
    cf_threshold: float = _doc(0.3, "counterfactual: a patch is class-relevant when its CAM (max-normalised) >= this, "
                                    "in (0, 1]")
    cf_region: str = _doc("object", "counterfactual: patches to mask: object (CAM >= threshold), context (the "
                                    "others) or either (a coin per image)")
    cf_fill: str = _doc("single", "counterfactual: refill from one other image per image (single) or another "
                                  "image per patch (multi)")
    cf_grid: int = _doc(7, "counterfactual: patches per image side (published 7: ViT-B/32 at 224 px)")
    cf_teacher_bn: str = _doc("batch", "counterfactual: the frozen teacher's batch norms use the counterfactual "
                                       "batch's statistics (batch: equal to the student at the start) or its "
                                       "pretrained running ones (running)")
    # levi
    levi_layers: tuple[str, ...] = _doc((), "levi: backbone modules ensembled with the small CNN's stages, e.g. "
                                            "blocks.2,blocks.4,blocks.6 (default: the last 3 of timm's feature_info)")
    levi_width: int = _doc(32, "levi: channels of the small CNN's first stage (doubling per stage)")
    # feature_distill, l1sp, aft (the frozen pretrained backbone as anchor or teacher)
    feature_distill_weight: float = _doc(1.0, "feature_distill: weight of the MSE between the pooled features and "
                                              "those of the frozen pretrained backbone")
    l1sp_alpha: float = _doc(1e-4, "l1sp: weight a of a ||w - w0||_1 over the backbone (w0: pretrained)")
    l1sp_beta: float = _doc(0.01, "l1sp: weight b of b/2 ||w_head||^2 (l1sp runs without weight decay)")
    aft_beta: float = _doc(10.0, "aft: weight of the RMSE between the batch kernels of the features and of the "
                                 "frozen pretrained features x sigmoid(s) (s learned at --lr)")
    # surgical (by name)
    surgical_block: str | None = _doc(None, "surgical: first|middle|last (input-/feature-/output-level shifts) = "
                                            "the backbone's stem + first stage / middle stage / last stage "
                                            "(default: none, --train-blocks gives the prefixes)")
    # autorgn
    rgn_batches: int = _doc(2, "autorgn: training batches on which each epoch's gradient norms are measured")
    # lpft
    lpft_probe: str = _doc("lbfgs", "lpft: lbfgs (as published: an L2-regularised logistic regression on the frozen "
                                    "features before the first step) or sgd (probe with SGD for "
                                    "--lpft-probe-epochs)")
    lpft_probe_epochs: int = _doc(0, "lpft: epochs of SGD linear probing (frozen backbone) before fine-tuning all "
                                     "(after the L-BFGS fit with --lpft-probe lbfgs; >= 1 with sgd)")
    lpft_probe_l2: float = _doc(1e-3, "lpft: L2 weight of the L-BFGS probe")
    lpft_ft_lr_mult: float = _doc(0.1, "lpft: after the probe, every group's lr x this (published style: "
                                       "fine-tune at a smaller lr)")
    # delta
    lpft_ft_bn: str = _doc("frozen", "lpft: the backbone's batch norms after the probe: frozen (running statistics, "
                                     "so fine-tuning starts from the features the probe saw) or train (batch "
                                     "statistics, as plain fine-tuning)")
    delta_alpha: float = _doc(0.01, "delta: weight a of the attention-weighted feature-map distance to the frozen "
                                    "pretrained backbone (delta runs without weight decay)")
    delta_beta: float = _doc(0.01, "delta: weight b of b/2 ||w_head||^2")
    delta_layers: tuple[str, ...] = _doc((), "delta: backbone modules whose outputs are regularised, e.g. "
                                             "layer1,layer2 (default: the timm model's feature_info stages)")
    delta_attention_images: int = _doc(128, "delta: training images on which each channel is zeroed to measure "
                                            "its attention, once before training (0: all; cached in --out)")
    # cotuning
    cotuning_lambda: float = _doc(2.3, "cotuning: weight of the soft CE of the kept source (ImageNet) head to "
                                       "p(y_s | y_t) (needs a pretrained backbone with its classifier)")
    bn_momentum: float | None = _doc(0.1, "backbone BN momentum (<0: keep the model's)")  # None: keep it
    test_limit: int = _doc(0, "evaluate on the first N test images (0: all)")
    ood_corruptions: str = _doc("all", "shifted (OOD) test sets: corruptions of the test images, comma-separated "
                                       "from gaussian_noise, blur, contrast, affine; 'all' or 'none'. Evaluated "
                                       "on the final model (<out>/ood.json, ood_* metrics); an ImageFolder's ood/ "
                                       "folder, when present, is one more shifted set")
    ood_severities: tuple[int, ...] = _doc((3,), "corruption severities, 1..5 (CIFAR-10-C's scale)")
    ood_limit: int = _doc(200, "test images per shifted set, evenly spaced over the test split (0: all)")
    ood_every_epoch: bool = _doc(False, "evaluate the shifted sets after every epoch, not only the last")
    min_crop: float | None = _doc(None, "min crop area of views 0/1 (default 0.2; built-in tasks 0.6)")
    hflip: bool | None = _doc(None, "default: off for digits, on otherwise")
    progress: bool = True
    cache_dir: str | None = None
    # how the process uses the machine (concept_kernels/train/runtime.py); not part of the run's identity
    threads: int | None = _doc(None, "torch threads per process; 0: auto (the physical cores of this process's "
                                     "CPU affinity per local rank, 1 when the machine is busy: 1-min load >= CPUs); "
                                     "None: leave as set (the library default; the CLI's is 0)")
    workers: int | None = _doc(None, "DataLoader workers decoding ImageFolder images (default: auto, 0 on a busy "
                                     "machine; built-in tasks are in-memory tensors and take none)")
