"""Interleaved step timing at the demo config: vanilla vs Concept-Tuning (image, roi) in ONE process.

Rounds alternate the providers (vanilla, concept_image, concept_roi, ...), so load from other
processes hits all of them alike; medians of wall time and of process CPU time, ratios to vanilla.
One step = ``model(views, labels)`` + ``zero_grad`` + ``backward`` + ``SGD.step`` (as
``bench_train_step.py``), random views, pretrained lite0 at 96 px, B = 20, 10 classes.

    PYTHONPATH=. python bench/ab_train_step.py [--threads 1] [--rounds 11] [--patch-pixels 24]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--patch-pixels", type=int, default=24)
    p.add_argument("--providers", default="vanilla,concept_image,concept_roi")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from concept_kernels.train import ConceptTuner, create_backbone

    B, S, cls, providers = 20, 96, 10, args.providers.split(",")
    views, labels = torch.randn(4, B, 3, S, S, generator=torch.Generator().manual_seed(0)), torch.arange(B) % cls
    steps = {}
    for name in providers:
        method, mode = ("vanilla", "image") if name == "vanilla" else ("concept", name.split("_")[1])
        net = ConceptTuner(create_backbone("tf_efficientnet_lite0", True), cls, (S, S), method=method, patch_mode=mode,
                           num_patches=9, num_confusing=9, queue_len=10, patch_pixels=args.patch_pixels)
        opt = torch.optim.SGD(net.param_groups(1e-3), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)

        def step(net=net, opt=opt):
            out = net(views, labels)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
        steps[name] = step
        step(), step()  # warm-up
    wall = {n: [] for n in providers}
    cpu = {n: [] for n in providers}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    print(f"threads={args.threads} rounds={args.rounds} patch_pixels={args.patch_pixels} load={os.getloadavg()}")
    med = {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in providers}
    for n, (w, c) in med.items():
        print(f"{n:15s} wall {w * 1e3:7.0f} ms ({w / med[providers[0]][0]:4.2f}x)   "
              f"cpu {c * 1e3:7.0f} ms ({c / med[providers[0]][1]:4.2f}x)")


if __name__ == "__main__":
    main()
