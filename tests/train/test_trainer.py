"""The trainer and CLI on tiny configs: resume is bit-exact (also after Ctrl-C mid-epoch), the CLI
runs end to end, bad inputs give clear errors, and nothing a user has is overwritten."""
import json
import signal

import pytest
import torch
from conftest import tiny_config

from concept_kernels.train import CheckpointError, run
from concept_kernels.train.__main__ import main
from concept_kernels.train.trainer import CHECKPOINT, load_checkpoint


def _assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("stop_at", [1, 2], ids=["mid-epoch", "epoch-end"])
def test_resume_is_bit_exact(tmp_path, stop_at):
    """4 steps straight == `stop_at` steps, Ctrl-C (saves), --resume, the rest: identical state."""
    straight = tiny_config(tmp_path / "a", epochs=2)
    run(straight)

    def ctrl_c(step, model):
        if step == stop_at:
            signal.raise_signal(signal.SIGINT)

    split = tiny_config(tmp_path / "b", epochs=2)
    run(split, on_step=ctrl_c)
    assert load_checkpoint(tmp_path / "b" / "run" / CHECKPOINT)["state"]["global_step"] == stop_at
    split.resume = True
    run(split)
    a, b = (load_checkpoint(tmp_path / d / "run" / CHECKPOINT) for d in "ab")
    assert a["state"]["global_step"] == 4
    for key in ("model", "optimizer", "scheduler", "state"):
        _assert_same_tensors(a[key], b[key], key)
    for ra, rb in zip(a["history"], b["history"]):
        assert {k: v for k, v in ra.items() if "sec" not in k} == {k: v for k, v in rb.items() if "sec" not in k}


def test_cli_end_to_end_and_guards(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--no-pretrained", "--image-size", "32", "--batch-size", "4", "--shots-per-class", "2", "--epochs", "1",
            "--iters-per-epoch", "1", "--num-patches", "4", "--num-confusing", "3", "--queue-len", "4",
            "--patch-pixels", "16", "--test-limit", "40", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and {"acc_main", "acc_ib", "acc", "sec_per_step", "train_con"} <= set(rows[0])
    assert (out / CHECKPOINT).exists() and not list(out.glob("*.tmp"))
    before = (out / CHECKPOINT).read_bytes()
    capsys.readouterr()
    assert main(args) == 2  # non-empty output dir, no --resume/--overwrite: refused, nothing touched
    assert "not empty" in capsys.readouterr().err and (out / CHECKPOINT).read_bytes() == before
    assert main(args + ["--resume", "--epochs", "1"]) == 0  # already done: nothing to do
    assert main(args + ["--resume", "--seed", "3"]) == 2  # different configuration
    assert "different configuration" in capsys.readouterr().err
    (out / CHECKPOINT).write_bytes(before[: len(before) // 2])  # truncated
    assert main(args + ["--resume"]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_bad_data_and_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/"):
        run(tiny_config(tmp_path, data=str(tmp_path / "missing")))
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    (tmp_path / "imgs" / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="ImageFolder"):
        run(tiny_config(tmp_path, data=str(tmp_path / "imgs"), out=str(tmp_path / "r2")))
    with pytest.raises(ValueError, match="unknown timm model"):
        run(tiny_config(tmp_path, model="not_a_model_xyz", out=str(tmp_path / "r3")))
    with pytest.raises(ValueError, match="'mixer_s32_224'.*num_prefix_tokens"):  # tokens, no patch-grid contract
        run(tiny_config(tmp_path, model="mixer_s32_224", image_size=224, out=str(tmp_path / "r4")))
    with pytest.raises(ValueError, match="cannot run on"):  # 8 px: less than one 16-px ViT patch
        run(tiny_config(tmp_path, model="vit_tiny_patch16_224", image_size=8, out=str(tmp_path / "r7")))
    with pytest.raises(ValueError, match="GPU"):
        run(tiny_config(tmp_path, amp=True, out=str(tmp_path / "r5")))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run(tiny_config(tmp_path, resume=True, out=str(tmp_path / "r6")))


def test_image_folder_end_to_end(tmp_path):
    """--data with train/ and val/ class folders (4 classes of random PNGs), concept method, 1 step."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 2), ("val", 1)):
        for c in "abcd":
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(n):
                px = torch.randint(0, 255, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(tmp_path / "imgs" / split / c / f"{i}.png")
    hist = run(tiny_config(tmp_path, data=str(tmp_path / "imgs"), iters_per_epoch=1, shots_per_class=0))
    assert len(hist) == 1 and 0.0 <= hist[0]["acc_main"] <= 1.0 and "acc_ib" in hist[0]


def test_demo_refuses_foreign_output_dir(tmp_path):
    from concept_kernels.train.demo import main as demo_main

    (tmp_path / "notes.txt").write_text("mine")
    assert demo_main(["--out", str(tmp_path)]) == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_demo_table_has_the_ood_column_and_its_paired_difference(capsys):
    from concept_kernels.train import demo

    def hist(main, ood, ib=None):
        row = dict(epoch=1, acc_main=main, acc=max(main, ib or 0.0), ood_acc_main=ood, sec_per_step=0.1)
        return [dict(row, acc_ib=ib) if ib is not None else row]

    results = {"vanilla": dict(hists=[hist(0.5, 0.3), hist(0.6, 0.4)], wall=1.0, sec_per_step=0.1),
               "concept": dict(hists=[hist(0.7, 0.2, 0.6), hist(0.6, 0.5, 0.6)], wall=1.0, sec_per_step=0.1)}
    for r in results.values():
        r.update(demo.summarize(r["hists"]))
    demo._print_table(results, 2)
    out = capsys.readouterr().out
    assert "OOD main" in out.splitlines()[1]
    vanilla = next(line for line in out.splitlines() if line.startswith("vanilla "))
    assert "0.350 ± 0.071" in vanilla  # OOD: mean of 0.3, 0.4; sample std 0.0707
    assert "OOD main 0.000 ± 0.141" in out  # paired by seed: 0.2 - 0.3, 0.5 - 0.4
