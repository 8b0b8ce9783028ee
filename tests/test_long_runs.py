"""Step checkpoints and preemption, with real processes and real signals: a run killed (SIGKILL) or
preempted (SIGTERM) in the middle of an epoch and resumed with ``--resume auto`` ends with weights
bit-identical to a run that was never interrupted (CPU, fp32, one loader worker, augmentation on:
RandAugment, random erasing, random resized crops)."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qkformer.checkpoint import read_checkpoint
from qkformer.data.synthetic_images import write_png_image_folder
from qkformer.run_state import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
ITERS = 6  # batches per epoch: 3 classes x 8 images / batch 4
RUN = ["--input-size", "32", "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "1",
       "--embed-dims", "16", "32", "64", "--depths", "1", "1", "1", "--num-heads", "2", "--T", "2",
       "--workers", "1", "--no-progress", "--no-amp", "--device", "cpu", "--save-every", "1",
       "--save-every-min", "0", "--keep-last", "2", "--accum-iter", "1"]


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    return write_png_image_folder(tmp_path_factory.mktemp("pngs"), classes=3, per_class_train=8,
                                  per_class_val=2, size=(36, 40))


def _env(**extra):
    # one thread: the same reduction order in every process, and fair on a 2-core CI machine
    return {**os.environ, "OMP_NUM_THREADS": "1", "QKFORMER_FAULT": "", **extra}


def _cmd(data, out, *extra):
    return [sys.executable, str(REPO / "imagenet" / "train.py"), "--data-dir", str(data),
            "--output-dir", str(out), *RUN, *extra]


def _train(data, out, *extra, **env):
    return subprocess.run(_cmd(data, out, *extra), cwd=REPO, env=_env(**env), capture_output=True,
                          text=True, timeout=600)


def _assert_same_final_state(a_dir, b_dir):
    a, b = (read_checkpoint(d / "checkpoint-last.pth") for d in (a_dir, b_dir))
    assert a["epoch"] == b["epoch"] == 1
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][i][k])), k
    assert a["scheduler"] == b["scheduler"]


@pytest.fixture(scope="module")
def uninterrupted(pngs, tmp_path_factory):
    runs = {}

    def get(accum):
        if accum not in runs:
            out = tmp_path_factory.mktemp(f"full_accum{accum}")
            r = _train(pngs, out, "--accum-iter", str(accum))
            assert r.returncode == 0, r.stderr[-3000:]
            runs[accum] = out
        return runs[accum]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(pngs, tmp_path, uninterrupted, accum):
    # a random batch of the second epoch after its first update (with --accum-iter 2 a kill at
    # its second batch would leave only the first epoch's checkpoints), not past its last
    step = ITERS + random.Random().randint(accum, ITERS - 1)
    r = _train(pngs, tmp_path, "--accum-iter", str(accum), QKFORMER_FAULT=f"kill@{step}")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    steps = sorted(tmp_path.glob("checkpoint-step-*.pth"))
    assert 1 <= len(steps) <= 2  # --keep-last 2
    newest = read_checkpoint(steps[-1])
    done = (step - ITERS) // accum * accum  # the last update boundary before the kill
    assert newest["epoch"] == 1 and newest["step"]["batches"] == done, (step, newest["step"])
    r = _train(pngs, tmp_path, "--accum-iter", str(accum), "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {steps[-1]} at epoch 1, batch {done} of {ITERS}" in r.stdout
    _assert_same_final_state(uninterrupted(accum), tmp_path)


@pytest.mark.slow
def test_sigterm_writes_a_step_checkpoint_exits_75_and_resumes_exactly(pngs, tmp_path,
                                                                       uninterrupted):
    p = subprocess.Popen(_cmd(pngs, tmp_path), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    # wait until the run is inside the first epoch (its second update's checkpoint exists)
    while not list(tmp_path.glob("checkpoint-step-000000002.pth")):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "SIGTERM received: stopping after the current optimizer update" in stderr
    assert "Traceback" not in stderr
    assert "step checkpoint" in stdout and "continue with --resume auto" in stdout
    steps = sorted(tmp_path.glob("checkpoint-step-*.pth"))
    stopped = read_checkpoint(steps[-1])["step"]
    assert stopped["update"] >= 2
    r = _train(pngs, tmp_path, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_final_state(uninterrupted(1), tmp_path)


@pytest.mark.slow
def test_second_signal_ends_the_run_at_once(pngs, tmp_path):
    # a long epoch, so that the run cannot reach an update boundary between the two signals
    mark = tmp_path / "slow-step-reached"
    p = subprocess.Popen(_cmd(pngs, tmp_path / "out", "--save-every", "0"), cwd=REPO,
                         env=_env(QKFORMER_FAULT="slow@1", QKFORMER_FAULT_MARK=str(mark)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not mark.exists():  # the run sits in its second batch for a minute
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "error: second SIGTERM: stopping now, without a checkpoint" in stderr
    assert not list((tmp_path / "out").glob("checkpoint-*.pth"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(data, out, restarts, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--max-restarts={restarts}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=localhost:{_free_port()}",
           str(REPO / "imagenet" / "train.py"), "--data-dir", str(data), "--output-dir", str(out),
           *RUN, "--batch-size", "2", "--workers", "0", "--resume", "auto"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True,
                       timeout=600)
    return r, time.monotonic() - t0


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_and_resumes_exactly(pngs, tmp_path):
    """Two gloo processes, 6 batches of 2 per rank and epoch; rank 1 is SIGKILLed before batch 2
    of epoch 1: torchrun restarts the group, which resumes from the step checkpoint of update 8
    and ends with the weights of the uninterrupted two-process run."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    r, _ = _torchrun(pngs, full, 0)
    assert r.returncode == 0, r.stderr[-3000:]
    r, _ = _torchrun(pngs, cut, 1, QKFORMER_FAULT="kill@8:rank1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {cut / 'checkpoint-step-000000008.pth'} at epoch 1, batch 2 of 6" \
        in r.stdout, r.stdout[-3000:]
    _assert_same_final_state(full, cut)


@pytest.mark.slow
def test_torchrun_without_restarts_left_ends_both_ranks(pngs, tmp_path):
    r, seconds = _torchrun(pngs, tmp_path, 0, QKFORMER_FAULT="kill@8:rank1")
    assert r.returncode != 0
    assert "Signal 9 (SIGKILL)" in r.stderr or "exitcode  : -9" in r.stderr, r.stderr[-3000:]
    assert seconds < 240  # the survivor is stopped, not left waiting in an all-reduce
    assert read_checkpoint(tmp_path / "checkpoint-step-000000008.pth")["step"]["batches"] == 2


@pytest.mark.slow
def test_srun_style_ranks_stop_together_on_sigusr1_and_resume_exactly(pngs, tmp_path):
    """Two ranks started as srun starts them (SLURM_PROCID/SLURM_NTASKS, no torchrun); SIGUSR1
    reaches rank 1 only: both ranks stop after the same update with status 75, rank 0 writes one
    step checkpoint holding both ranks' states, and the resumed pair ends with the weights of an
    uninterrupted pair."""
    def launch(out, *extra):
        env = _env(MASTER_ADDR="localhost", MASTER_PORT=str(_free_port()), SLURM_NTASKS="2")
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
        return [subprocess.Popen(_cmd(pngs, out, "--batch-size", "2", "--workers", "0", *extra),
                                 cwd=REPO, env={**env, "SLURM_PROCID": str(r),
                                                "SLURM_LOCALID": str(r)},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for r in (0, 1)]

    def finish(procs):
        outs = [p.communicate(timeout=300) for p in procs]
        return [p.returncode for p in procs], outs

    full, cut = tmp_path / "full", tmp_path / "cut"
    codes, outs = finish(launch(full))
    assert codes == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    procs = launch(cut)
    deadline = time.monotonic() + 300
    while not list(cut.glob("checkpoint-step-000000002.pth")):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGUSR1)
    codes, outs = finish(procs)
    assert codes == [EXIT_PREEMPTED] * 2, outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "SIGUSR1 received" in outs[1][1] and "stopped on a signal on another rank" in outs[0][0]
    step = read_checkpoint(sorted(cut.glob("checkpoint-step-*.pth"))[-1])["step"]
    assert len(step["ranks"]) == 2
    assert not torch.equal(step["ranks"][0]["rng"]["torch"], step["ranks"][1]["rng"]["torch"])
    codes, outs = finish(launch(cut, "--resume", "auto"))
    assert codes == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert f"resumed from {cut / 'checkpoint-step-'}" in outs[0][0]
    _assert_same_final_state(full, cut)


@pytest.mark.slow
def test_sigterm_in_the_last_batch_of_an_epoch(pngs, tmp_path, uninterrupted):
    """The stop lands on the epoch's last update: the step checkpoint says the epoch's training
    is done, and the resumed run goes straight to its evaluation and epoch checkpoint."""
    mark = tmp_path / "in-last-batch"
    out = tmp_path / "out"
    p = subprocess.Popen(_cmd(pngs, out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=_env(QKFORMER_FAULT=f"slow@{ITERS - 1}", QKFORMER_FAULT_MARK=str(mark)),
                         text=True)
    deadline = time.monotonic() + 300
    while not mark.exists():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    mark.unlink()  # let the batch run
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == EXIT_PREEMPTED, stderr[-3000:]
    step = read_checkpoint(out / f"checkpoint-step-{ITERS:09d}.pth")["step"]
    assert step["batches"] == ITERS and not (out / "checkpoint-last.pth").exists()
    r = _train(pngs, out, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at epoch 0, batch {ITERS} of {ITERS}" in r.stdout
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").open()] == [0, 1]
    _assert_same_final_state(uninterrupted(1), out)
