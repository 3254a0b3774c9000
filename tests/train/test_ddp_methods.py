"""The epoch-hook methods under DDP on CPU (gloo, 2 processes via torchrun): autorgn averages its measured
gradients over the ranks, so both ranks set the same per-tensor lrs and their weights stay equal although
each rank measures on its own batches; lpft is refused with a clear error (its backbone becomes trainable
after DDP set up its gradient all-reduce)."""
import textwrap

from ddp_harness import run_two_ranks

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    from concept_kernels.train import Config, run

    seen = {}

    def check(step, model, into=seen):
        mine = torch.cat([p.detach().flatten() for p in model.parameters()])
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        into[step] = dict(equal=torch.equal(parts[0], parts[1]), finite=bool(torch.isfinite(mine).all()))

    def config(method, out, **kw):
        return Config(model="tf_efficientnet_lite0", pretrained=False, image_size=32, batch_size=4, shots_per_class=4,
                      epochs=2, iters_per_epoch=2, lr=1e-2, test_limit=20, progress=False, method=method, out=out, **kw)

    run(config("autorgn", sys.argv[1] + "/autorgn"), on_step=check)
    try:
        run(config("lpft", sys.argv[1] + "/lpft", lpft_probe="sgd", lpft_probe_epochs=1))
        seen["lpft"] = "ran"
    except ValueError as e:
        seen["lpft"] = str(e)
    seen["lpft_lbfgs"] = {}
    run(config("lpft", sys.argv[1] + "/lpft_lbfgs"), on_step=lambda step, model: check(step, model, seen["lpft_lbfgs"]))
    if dist.get_rank() == 0:
        json.dump(seen, open(sys.argv[2], "w"))
    dist.destroy_process_group()
""")


def test_autorgn_ranks_agree_and_lpft_is_refused(tmp_path):
    seen = run_two_ranks(SCRIPT, tmp_path, tmp_path)
    assert sorted(seen) == ["1", "2", "3", "4", "lpft", "lpft_lbfgs"]
    lbfgs = seen.pop("lpft_lbfgs")  # the default (L-BFGS probe, no probe epochs) runs under DDP, ranks equal
    assert sorted(lbfgs) == ["1", "2", "3", "4"] and all(s["equal"] and s["finite"] for s in lbfgs.values())
    for step in "1234":
        assert seen[step]["finite"] and seen[step]["equal"], (step, seen[step])
    assert "--lpft-probe-epochs > 0 does not run under DDP" in seen["lpft"]
