"""DDP on CPU (gloo, 2 processes via torchrun): keys are all-gathered before enqueue, so every rank
holds the same queues although each rank sees different images."""
import textwrap

from ddp_harness import run_two_ranks

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    from concept_kernels.train import Config, run

    seen = {}

    def check(step, model):
        q = model.queues
        mine = torch.cat([q.queue_z.flatten(), q.queue_h.flatten(), q.ptr.float()])
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        head = [torch.empty_like(model.head.weight) for _ in range(2)]
        dist.all_gather(head, model.head.weight.detach().contiguous())
        seen[step] = dict(queues_equal=all(torch.equal(parts[0], p) for p in parts),
                          heads_equal=torch.equal(head[0], head[1]), ptr_sum=int(q.ptr.sum()),
                          finite=bool(torch.isfinite(mine).all() and torch.isfinite(head[0]).all()),
                          diff=float((head[0] - head[1]).abs().max()))

    cfg = Config(model="tf_efficientnet_lite0", pretrained=False, image_size=32, batch_size=4, shots_per_class=4,
                 epochs=1, iters_per_epoch=3, num_patches=4, num_confusing=3, queue_len=4, patch_pixels=32,
                 lr=1e-3, test_limit=40, progress=False, out=sys.argv[1])
    run(cfg, on_step=check)
    if dist.get_rank() == 0:
        json.dump(seen, open(sys.argv[2], "w"))
    dist.destroy_process_group()
""")


def test_ddp_queues_equal_across_ranks(tmp_path):
    seen = run_two_ranks(SCRIPT, tmp_path, tmp_path / "run")
    assert sorted(seen) == ["1", "2", "3"]
    for step, s in seen.items():
        assert s["finite"] and s["queues_equal"] and s["heads_equal"], (step, s)
    assert (tmp_path / "run" / "checkpoint.pt").exists()
