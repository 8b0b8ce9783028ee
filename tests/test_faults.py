"""Faults end cleanly and lose nothing: one run per output folder (a lock with pid and host, stale
locks taken over), no silent overwrite of an earlier run, a truncated or foreign newest checkpoint
skipped for the previous one, partial files removed, a full disk or read-only folder named with
the bytes needed (previous checkpoint intact), non-finite evaluation refused, and every error of a
command-line run one ``error:`` line (Ctrl-C: exit 130)."""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from qkformer import evaluate, train
from qkformer.checkpoint import read_checkpoint
from qkformer.config import run_cli
from qkformer.data.synthetic_images import write_png_image_folder
from qkformer.training_checkpoint import save_checkpoint
from qkformer.run_state import LOCK_NAME, CheckpointWriteError
from conftest import cli_error as _cli_error

REPO = Path(__file__).resolve().parents[1]
TINY = ["--embed-dims", "16", "32", "64", "--depths", "1", "1", "1", "--num-heads", "2",
        "--T", "2", "--workers", "0", "--no-progress", "--no-amp", "--input-size", "16",
        "--batch-size", "2", "--epochs", "2", "--warmup-epochs", "0", "--cooldown-epochs", "0",
        "--max-iters", "2", "--save-every-min", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    return write_png_image_folder(tmp_path_factory.mktemp("pngs"), classes=2, per_class_train=2,
                                  per_class_val=1, size=(16, 16))


def _args(data, out, *extra):
    return ["--data-dir", str(data), "--output-dir", str(out), *TINY, *extra]




def _popen(argv, **env):
    return subprocess.Popen([sys.executable, str(REPO / "cifar10" / "train.py"), *argv], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, p: subprocess.Popen, seconds: float = 300):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.05)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------------------------
# one run per folder
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_second_run_into_a_busy_folder_refuses_and_ctrl_c_is_one_line(monkeypatch, pngs,
                                                                       tmp_path):
    out, mark = tmp_path / "out", tmp_path / "busy"
    p = _popen(_args(pngs, out), QKFORMER_FAULT="slow@0", QKFORMER_FAULT_MARK=str(mark))
    try:
        _wait_for(mark, p)
        owner = json.loads((out / LOCK_NAME).read_text())
        assert owner["pid"] == p.pid and owner["host"] == socket.gethostname()
        msg = _cli_error(monkeypatch, train.main, _args(pngs, out), default_config="cifar10")
        assert msg == (f"error: {out} is in use by another run (pid {p.pid} on this host); give "
                       f"another --output-dir, or delete {out / LOCK_NAME} if that run is gone")
        p.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "error: interrupted (Ctrl-C)"
    assert "Traceback" not in stderr
    assert not (out / LOCK_NAME).exists()  # released on the way out


def test_stale_lock_is_taken_over_and_a_foreign_host_lock_is_not(monkeypatch, pngs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_NAME
    lock.write_text(json.dumps({"pid": 1 << 22 | 7, "host": "node-b"}))
    msg = _cli_error(monkeypatch, train.main, _args(pngs, out, "--epochs", "1"),
                     default_config="cifar10")
    assert "is in use by another run (pid 4194311 on host node-b)" in msg
    # a run SIGKILLed on this host left its lock behind: its pid is dead, the lock is stale
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    stats = train.main(_args(pngs, out, "--epochs", "1"), default_config="cifar10")
    assert stats["epoch"] == 0 and not lock.exists()


# --------------------------------------------------------------------------------------------
# an earlier run's checkpoints, truncated and foreign checkpoints, partial files
# --------------------------------------------------------------------------------------------
def test_new_run_into_a_finished_runs_folder_needs_resume_or_overwrite(monkeypatch, pngs,
                                                                        tmp_path):
    out = tmp_path / "out"
    train.main(_args(pngs, out, "--epochs", "1"), default_config="cifar10")
    before = (out / "checkpoint-last.pth").read_bytes()
    msg = _cli_error(monkeypatch, train.main, _args(pngs, out, "--epochs", "1"),
                     default_config="cifar10")
    assert msg.startswith(f"error: --output-dir {out} holds the checkpoints of an earlier run "
                          f"(checkpoint-best.pth, checkpoint-last.pth); continue it with "
                          f"--resume auto, or start over with --overwrite")
    assert (out / "checkpoint-last.pth").read_bytes() == before  # untouched
    train.main(_args(pngs, out, "--epochs", "1", "--overwrite"), default_config="cifar10")
    assert len((out / "log.jsonl").read_text().splitlines()) == 1  # the old log went too


@pytest.fixture
def interrupted(pngs, tmp_path):
    """A run stopped by a NaN loss in the middle of epoch 1: epoch 0's checkpoint and step
    checkpoints of epoch 0 (update 1) and epoch 1 (update 3) on disk."""
    out = tmp_path / "out"
    os.environ["QKFORMER_FAULT"] = "nan@3"
    try:
        with pytest.raises(SystemExit, match="loss is nan at epoch 1"):
            train.main(_args(pngs, out, "--save-every", "1"), default_config="cifar10")
    finally:
        del os.environ["QKFORMER_FAULT"]
    names = sorted(p.name for p in out.glob("checkpoint-*.pth"))
    assert names == ["checkpoint-best.pth", "checkpoint-last.pth",
                     "checkpoint-step-000000001.pth", "checkpoint-step-000000003.pth"]
    return out


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "weights only"])
def test_unusable_newest_checkpoint_falls_back_to_the_previous(pngs, interrupted, capsys, damage):
    out = interrupted
    newest = out / "checkpoint-step-000000003.pth"
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[:3000])
    elif damage == "random bytes":
        newest.write_bytes(os.urandom(20000))
    else:  # a foreign file: weights, no training state
        torch.save(read_checkpoint(newest)["model"], newest)
    partial = out / ".checkpoint-last.pth.x1y2z3.tmp"
    partial.write_bytes(b"half a checkpoint")
    stats = train.main(_args(pngs, out, "--resume", "auto"), default_config="cifar10")
    printed = capsys.readouterr().out
    assert f"warning: cannot resume from {newest}: " in printed
    assert f"resumed from {out / 'checkpoint-last.pth'} at epoch 1" in printed
    assert "removed .checkpoint-last.pth.x1y2z3.tmp" in printed and not partial.exists()
    assert "weights_only=False" not in printed and "weights_only` set to `False" not in printed
    assert stats["epoch"] == 1


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(monkeypatch, pngs, interrupted):
    for p in interrupted.glob("checkpoint-*.pth"):
        p.write_bytes(os.urandom(5000))
    msg = _cli_error(monkeypatch, train.main, _args(pngs, interrupted, "--resume", "auto"),
                     default_config="cifar10")
    assert f"--resume auto: no usable checkpoint in {interrupted}" in msg
    assert "refusing to start over" in msg and "weights_only" not in msg


# --------------------------------------------------------------------------------------------
# full disk, read-only folder
# --------------------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 512 KiB tmpfs (root only): a real full disk and a real read-only file system."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _model():
    return timm.create_model("qkformer_cifar10", embed_dims=16, depths=(1, 1, 1), num_heads=2,
                             num_classes=2, T=2)


def test_checkpoints_get_the_umask_permissions(tmp_path):
    model = _model()
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "c.pth", model, torch.optim.SGD(model.parameters(), lr=0.1),
                        0, None)
    finally:
        os.umask(old)
    assert (tmp_path / "c.pth").stat().st_mode & 0o777 == 0o640  # not mkstemp's private 0o600


def test_full_disk_and_read_only_folder_keep_the_previous_checkpoint(small_tmpfs):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = small_tmpfs / "checkpoint-last.pth"
    save_checkpoint(path, model, opt, 0, None)
    good = path.read_bytes()
    big = torch.zeros(256 * 1024)  # 1 MiB: does not fit
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(path, model, opt, 1, None, payload=big)
    msg = str(e.value)
    assert msg.startswith(f"cannot write checkpoint checkpoint-last.pth into {small_tmpfs}: about ")
    need = int(msg.split("about ")[1].split(" bytes")[0].replace(",", ""))
    assert need > big.numel() * 4 and "free (" in msg and "No space left on device" in msg
    assert msg.endswith("; the previous checkpoint-last.pth is intact") and "\n" not in msg
    assert path.read_bytes() == good and [p.name for p in small_tmpfs.iterdir()] == [path.name]
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(CheckpointWriteError, match="Read-only file system.*previous "
                                                   "checkpoint-last.pth is intact"):
        save_checkpoint(path, model, opt, 1, None)
    assert path.read_bytes() == good


def test_training_into_a_full_or_read_only_folder_is_one_line(monkeypatch, pngs, small_tmpfs):
    msg = _cli_error(monkeypatch, train.main, _args(pngs, small_tmpfs, "--embed-dims", "64", "128",
                                                    "256", "--epochs", "1"),
                     default_config="cifar10")
    assert msg.startswith(f"error: cannot write checkpoint checkpoint-last.pth into "
                          f"{small_tmpfs}: about "), msg
    assert not list(small_tmpfs.glob(".*.tmp")) and not (small_tmpfs / LOCK_NAME).exists()
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    msg = _cli_error(monkeypatch, train.main, _args(pngs, small_tmpfs / "run"),
                     default_config="cifar10")
    assert msg == f"error: [Errno 30] Read-only file system: '{small_tmpfs / 'run'}'" or \
        msg.startswith(f"error: cannot write into --output-dir {small_tmpfs}"), msg


# --------------------------------------------------------------------------------------------
# non-finite evaluation, user input errors, data validated up front
# --------------------------------------------------------------------------------------------
def test_evaluating_non_finite_weights_fails(monkeypatch, pngs, tmp_path):
    model = _model()
    with torch.no_grad():
        next(model.parameters()).view(-1)[:3] = float("nan")
    ckpt = tmp_path / "nan.pth"
    torch.save({"model": model.state_dict(), "epoch": 0,
                "args": argparse.Namespace(model="qkformer_cifar10", T=2, input_size=16,
                                           embed_dims=[16], depths=[1, 1, 1], num_heads=[2])},
               ckpt)
    msg = _cli_error(monkeypatch, evaluate.main, ["--checkpoint", str(ckpt), "--data-dir",
                                                  str(pngs), "--workers", "0", "--no-progress",
                                                  "--no-amp", "--input-size", "16"])
    assert msg == ("error: cannot evaluate: 3 of the model's weights are not finite (NaN or inf), "
                   "in 1 tensor(s), first patch_embed1.proj_conv.weight")


BAD = [
    (["--lr", "inf"], "error: --lr inf is invalid: it must be positive and finite"),
    (["--lr", "nan"], "error: --lr nan is invalid: it must be positive and finite"),
    (["--lr=-1e-3"], "error: --lr -0.001 is invalid: it must be positive and finite"),
    (["--workers", "100000"], "error: --workers 100000 is invalid: at most 64 loader processes"),
    (["--save-every", "-1"], "error: --save-every -1 is invalid: it must be 0 or more"),
    (["--keep-last", "0"], "error: --keep-last 0 is invalid: it must be at least 1"),
    (["--preempt-signals", "SIGFOO"], "error: --preempt-signals: SIGFOO is not a signal name"),
]


@pytest.mark.parametrize("argv, expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_numbers_are_one_line(monkeypatch, tmp_path, argv, expected):
    msg = _cli_error(monkeypatch, train.main, _args(tmp_path / "none", tmp_path / "out", *argv),
                     default_config="cifar10")
    assert msg.startswith(expected), msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--T", "1.5"], ["--lr", "fast"], ["--no-such-flag"]])
def test_unparsable_options_are_one_line(monkeypatch, capsys, tmp_path, argv):
    monkeypatch.setattr(sys, "argv", ["train.py", *_args(tmp_path, tmp_path / "out", *argv)])
    with pytest.raises(SystemExit) as e:
        train.main(default_config="cifar10")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert "train.py --help" in err


def test_every_exception_class_is_one_line(capsys):
    def misspelt():
        return timm.create_model("qkformer_cifar10", embde_dims=16)  # a misspelt keyword

    with pytest.raises(SystemExit) as e:
        run_cli(misspelt, from_command_line=True)
    assert e.value.code.startswith("error: TypeError: ") and "embde_dims" in e.value.code
    assert "\n" not in e.value.code

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        run_cli(interrupted, from_command_line=True)
    assert e.value.code == 130 and capsys.readouterr().err == "error: interrupted (Ctrl-C)\n"
    with pytest.raises(TypeError):  # from Python, errors propagate
        run_cli(misspelt, from_command_line=False)


def test_unreadable_image_is_found_before_the_first_step(monkeypatch, tmp_path):
    data = write_png_image_folder(tmp_path / "data", classes=2, per_class_train=3, per_class_val=1,
                                  size=(16, 16))
    empty = data / "train" / "class_1" / "002.png"
    empty.write_bytes(b"")
    msg = _cli_error(monkeypatch, train.main, _args(data, tmp_path / "out", "--workers", "1"),
                     default_config="imagenet")
    assert msg == f"error: 1 unreadable training image file(s), e.g. {empty} is empty"
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_step_checkpoint_resumed_with_other_batches_is_refused(monkeypatch, pngs, interrupted):
    for p in interrupted.glob("checkpoint-last.pth"):
        p.unlink()  # the newest usable one is then the step checkpoint of update 3
    msg = _cli_error(monkeypatch, train.main, _args(pngs, interrupted, "--resume", "auto",
                                                    "--max-iters", "1"), default_config="cifar10")
    assert "checkpoint-step-000000003.pth is a step checkpoint of a run with other batches " \
           "(2 per epoch, --accum-iter 1; now 1, 1)" in msg
