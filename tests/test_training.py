"""Every entry point end to end on tiny generated data (CPU), plus the failure paths."""
import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from qkformer import evaluate, train
from qkformer.checkpoint import CheckpointMismatchError, read_checkpoint
from qkformer.config import ConfigError
from qkformer.data.synthetic_images import write_png_image_folder

REPO = Path(__file__).resolve().parents[1]
TINY = ["--embed-dims", "16", "32", "64", "--depths", "1", "1", "1", "--num-heads", "2",
        "--T", "2", "--workers", "0", "--no-progress", "--no-amp"]


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    return write_png_image_folder(tmp_path_factory.mktemp("pngs"), classes=3, per_class_train=6,
                                  per_class_val=3, size=(36, 40))


def _cifar_args(data, out, *extra):
    return ["--data-dir", str(data), "--output-dir", str(out), "--input-size", "16",
            "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "1", "--cooldown-epochs", "0",
            *TINY, *extra]


def _state(path):
    return read_checkpoint(path)


def test_imagenet_train_then_test(pngs, tmp_path, capsys):
    out = tmp_path / "run"
    stats = train.main(["--data-dir", str(pngs), "--output-dir", str(out), "--input-size", "32",
                        "--batch-size", "4", "--accum-iter", "2", "--epochs", "2",
                        "--warmup-epochs", "1", "--max-iters", "3", *TINY], default_config="imagenet")
    printed = capsys.readouterr().out
    assert "effective batch 8 = 4 per process x 2 accumulation x 1 processes; lr 1.87e-05" in printed
    assert stats["epoch"] == 1 and stats["test_images"] == 9
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and all(math.isfinite(r["train_loss"]) for r in log)
    assert list((out / "tb").iterdir())  # tensorboard events written
    ckpt = _state(out / "checkpoint-last.pth")
    assert {"model", "optimizer", "epoch", "scaler", "args", "rng"} <= set(ckpt)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["epoch"] == 1
    res = evaluate.main(["--checkpoint", str(out / "checkpoint-last.pth"), "--data-dir", str(pngs),
                         "--batch-size", "4", "--workers", "0", "--no-progress"])
    printed = capsys.readouterr().out
    assert "eval batch size 4" in printed and "imagenet preprocessing" in printed
    assert res["images"] == 9 and 0 <= res["acc1"] <= 100 and res["acc5"] == 100.0


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_train(pngs, tmp_path, dataset):
    out = tmp_path / dataset
    stats = train.main(_cifar_args(pngs, out, "--max-iters", "2"), default_config=dataset)
    assert stats["epoch"] == 1 and math.isfinite(stats["train_loss"])
    args = _state(out / "checkpoint-last.pth")["args"]
    assert args.dataset == dataset and args.mixup == 0.5 and args.sched_on == "epoch"


def test_released_layout_checkpoint_is_evaluated(pngs, tmp_path, capsys):
    # what the authors' MAE script wrote: args is an argparse.Namespace with *their* names
    model = timm.create_model("qkformer_10_384", embed_dims=64, depths=(1, 1, 1), num_heads=2,
                              num_classes=3, T=2)
    path = tmp_path / "checkpoint-199.pth"
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 199,
                "scaler": {"scale": 65536.0},
                "args": argparse.Namespace(model="QKFormer_10_384", time_step=2, input_size=32,
                                           batch_size=32, accum_iter=2)}, path)
    # the released files hold full-size variants; here the tiny one needs its architecture
    with pytest.raises(CheckpointMismatchError, match="mis-shaped keys"):
        evaluate.main(["--checkpoint", str(path), "--data-dir", str(pngs), "--batch-size", "3",
                       "--workers", "0", "--no-progress"])
    ns = read_checkpoint(path)
    ns["args"].embed_dims, ns["args"].depths, ns["args"].num_heads = [64], [1, 1, 1], [2]
    torch.save(ns, path)
    res = evaluate.main(["--checkpoint", str(path), "--data-dir", str(pngs), "--batch-size", "3",
                         "--workers", "0", "--no-progress", "--fixed-ssa", "--no-amp"])
    assert "model qkformer_10_384 (T=2, input 32" in capsys.readouterr().out
    assert res["images"] == 9


def _train_subprocess(args, env_extra=None, script="cifar10/train.py"):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--grad-checkpointing"]], ids=["plain", "grad-checkpointing"])
def test_kill_then_resume_reaches_the_uninterrupted_state(pngs, tmp_path, extra):
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = ["--epochs", "3", "--max-iters", "3", *extra]
    train.main(_cifar_args(pngs, full, *common), default_config="cifar10")
    # SIGKILL in the middle of epoch 2 (global step 7 of 3 x 3)
    r = _train_subprocess(_cifar_args(pngs, cut, *common), {"QKFORMER_FAULT": "kill@7"})
    assert r.returncode == -9, r.stderr
    assert _state(cut / "checkpoint-last.pth")["epoch"] == 1  # epochs 0-1 kept, epoch 2 lost
    train.main(_cifar_args(pngs, cut, *common, "--resume", "auto"), default_config="cifar10")
    a, b = _state(full / "checkpoint-last.pth"), _state(cut / "checkpoint-last.pth")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]


def test_non_finite_loss_stops_and_keeps_checkpoint(pngs, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    monkeypatch.setenv("QKFORMER_FAULT", "nan@4")  # epoch 1, after epoch 0's checkpoint
    with pytest.raises(SystemExit, match=r"loss is nan at epoch 1.*last good checkpoint is kept"):
        train.main(_cifar_args(pngs, out, "--max-iters", "3"), default_config="cifar10")
    assert _state(out / "checkpoint-last.pth")["epoch"] == 0


def test_bad_data_and_config(pngs, tmp_path):
    with pytest.raises(FileNotFoundError, match="expected"):
        train.main(_cifar_args(tmp_path / "missing", tmp_path / "o"), default_config="cifar10")
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    with pytest.raises((ValueError, FileNotFoundError)):
        train.main(_cifar_args(empty, tmp_path / "o"), default_config="imagenet")
    holed = write_png_image_folder(tmp_path / "holed", classes=2, per_class_train=2, per_class_val=1)
    for f in (holed / "train" / "class_1").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match="class_1"):
        train.main(_cifar_args(holed, tmp_path / "o"), default_config="imagenet")
    bad = tmp_path / "bad.yml"
    bad.write_text("lr: 1e-3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key.*learning_rate"):
        train.main(["-c", str(bad), *_cifar_args(pngs, tmp_path / "o")])


def test_wrong_and_truncated_checkpoints_in_test_py(pngs, tmp_path):
    m = timm.create_model("qkformer_cifar100")
    path = tmp_path / "c100.pth"
    torch.save({"model": m.state_dict()}, path)
    with pytest.raises(ValueError, match="100 outputs"):  # data has 3 classes
        evaluate.main(["--checkpoint", str(path), "--data-dir", str(pngs), "--workers", "0"])
    with pytest.raises(CheckpointMismatchError, match="fits the variant qkformer_cifar100"):
        evaluate.main(["--checkpoint", str(path), "--data-dir", str(pngs), "--workers", "0",
                       "--model", "qkformer_10_384"])
    path.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        evaluate.main(["--checkpoint", str(path), "--data-dir", str(pngs), "--workers", "0"])


def test_schedules_match_the_recipes():
    from timm.scheduler import create_scheduler_v2

    p = torch.nn.Parameter(torch.zeros(1))
    # CIFAR (docs/original.md §6.2 log): per-epoch cosine, warmup 20 from 1e-5, 400 + 10 cooldown epochs
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched, total = create_scheduler_v2(opt, "cosine", num_epochs=400, cooldown_epochs=10,
                                       min_lr=1e-5, warmup_lr=1e-5, warmup_epochs=20)
    assert total == 410
    for epoch, lr in {1: 5.950e-5, 19: 9.505e-4, 20: 9.939e-4, 200: 5.050e-4, 400: 1.0e-5}.items():
        sched.step(epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=2e-3), epoch
    # ImageNet (docs/original.md §6.1): per-iteration, linear warmup from 0 over 5 epochs, cosine to 1e-6
    opt = torch.optim.AdamW([p], lr=1.35e-3)
    iters = 10
    sched, total = create_scheduler_v2(opt, "cosine", num_epochs=195, min_lr=1e-6, warmup_lr=0.0,
                                       warmup_epochs=5, warmup_prefix=True, step_on_epochs=False,
                                       updates_per_epoch=iters)
    assert total == 200
    for step in (0, 3, 49, 50, 1000, 1999):
        e = step / iters
        ref = 1.35e-3 * e / 5 if e < 5 else 1e-6 + (1.35e-3 - 1e-6) * 0.5 * (
            1 + math.cos(math.pi * (e - 5) / 195))
        sched.step_update(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(ref, rel=1e-9, abs=1e-15), step


DVS_TINY = ["--embed-dims", "16", "32", "--num-heads", "2", "--batch-size", "2", "--epochs", "1",
            "--warmup-epochs", "0", "--cooldown-epochs", "0", "--max-iters", "2", "--workers", "0",
            "--no-progress", "--no-amp"]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["cifar10_dvs", "dvs128_gesture"])
def test_dvs_scripts_on_synthetic_raw_events(tmp_path, dataset):
    from qkformer.data import synthetic_events

    root = tmp_path / "raw"
    if dataset == "cifar10_dvs":  # 10 recordings per class: 9 train / 1 test (docs/original.md §6.3 split)
        synthetic_events.make_synthetic_cifar10_dvs(root, per_class=10, n_events=(300, 600))
    else:
        synthetic_events.make_synthetic_dvs128_gesture(root)
    r = _train_subprocess(["--data-dir", str(root), "--output-dir", str(tmp_path / "out"),
                           *DVS_TINY], script=f"{dataset}/train.py")
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads((tmp_path / "out" / "log.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(log["train_loss"]) and log["train_images"] == 4
    assert log["test_images"] == (10 if dataset == "cifar10_dvs" else 11)
    args = _state(tmp_path / "out" / "checkpoint-last.pth")["args"]
    assert args.T == 16 and args.mixup_off_epoch == 75 and args.amp_eval is False


def test_missing_dvs_data_explains_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="extract"):
        train.main(["--data-dir", str(tmp_path / "nothing"), *DVS_TINY],
                   default_config="cifar10_dvs")


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_torchrun_two_processes_match_single_process(tmp_path, checkpointing):
    """DDP over gloo: both ranks end with identical weights, equal to one process that sees the
    same global batch as two accumulated micro-batches (per-rank BN statistics, as in DDP; the
    accumulation runs under no_sync), with and without gradient checkpointing."""
    port = "29534" if checkpointing else "29533"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={port}", str(REPO / "tests" / "ddp_worker.py"), str(tmp_path),
                        *(["checkpointing"] if checkpointing else [])],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))
    sys.path.insert(0, str(REPO / "tests"))
    from ddp_worker import single_process_reference

    ref = single_process_reference(checkpointing)
    for name, p in rank0.items():
        assert torch.equal(p, rank1[name]), name
        torch.testing.assert_close(p, ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(ref.values(), _initial().values()))


def _initial():
    from ddp_worker import make_model

    return {k: v.detach().clone() for k, v in make_model().named_parameters()}


@pytest.mark.slow
def test_torchrun_imagenet_scripts(pngs, tmp_path):
    """imagenet/train.py and imagenet/test.py themselves under torchrun (2 processes, gloo)."""
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
              "--master_port=29534"]
    r = subprocess.run([*launch, str(REPO / "imagenet" / "train.py"), "--data-dir", str(pngs),
                        "--output-dir", str(out), "--input-size", "32", "--batch-size", "2",
                        "--accum-iter", "1", "--epochs", "1", "--warmup-epochs", "0", "--max-iters", "2",
                        *TINY],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "effective batch 4 = 2 per process x 1 accumulation x 2 processes" in r.stdout
    log = json.loads((out / "log.jsonl").read_text())
    assert log["train_images"] == 8 and log["test_images"] == 9  # 9 val images, none twice
    r = subprocess.run([*launch, str(REPO / "imagenet" / "test.py"), "--checkpoint",
                        str(out / "checkpoint-last.pth"), "--data-dir", str(pngs), "--batch-size",
                        "2", "--workers", "0", "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval batch size 2 per process x 2" in r.stdout and "on 9 images" in r.stdout
