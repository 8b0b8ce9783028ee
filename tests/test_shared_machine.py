"""A shared machine: the command lines' thread count from the cores free at start, and progress
lines where there is no terminal."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from qkformer import engine, threads

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.mark.parametrize("free, expected", [(0.2, 1), (1.1, 1), (1.6, 2), (3.0, None)])
def test_threads_follow_the_free_cores(monkeypatch, capsys, keep_threads, free, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(threads, "free_cores", lambda interval=0.2: free)
    torch.set_num_threads(3)
    got = threads.fit_threads_to_free_cores()
    assert got == expected
    assert torch.get_num_threads() == (expected or 3)
    err = capsys.readouterr().err
    if expected:
        assert err == (f"threads: {expected} instead of 3: other processes kept {4 - free:.1f} of "
                       f"4 cores busy at start (OMP_NUM_THREADS=3 takes them all)\n")
    else:
        assert err == ""


def test_threads_leave_the_users_choice(monkeypatch, keep_threads):
    monkeypatch.setattr(threads, "free_cores", lambda interval=0.2: 0.0)
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.fit_threads_to_free_cores() is None and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    # called from Python (argv given), or one rank of many: the caller's setting stays
    assert threads.fit_for_command_line(False) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert threads.fit_for_command_line(True) is None and torch.get_num_threads() == 2


def test_free_cores_from_proc_stat(monkeypatch):
    # /proc/stat's cpu line: user nice system idle iowait irq softirq steal
    readings = iter([(1000, 400), (1400, 500)])  # 400 ticks, 100 idle: a quarter idle
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(readings))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 8)
    assert threads.free_cores(0) == pytest.approx(2.0)
    if Path("/proc/stat").is_file():
        monkeypatch.undo()
        assert 0 <= threads.free_cores(0.05) <= (threads.os.cpu_count() or 1) + 1e-6


def test_command_line_entry_point_fits_threads(tmp_path):
    """The demo, training and evaluation command lines count the free cores before any work."""
    code = ("import sys; from qkformer import threads, evaluate; calls = []; "
            "threads.fit_threads_to_free_cores = lambda: calls.append(1); "
            "sys.argv = ['x', '--checkpoint', 'missing.pth', '--data-dir', 'd'];\n"
            "try:\n    evaluate.main()\nexcept SystemExit:\n    pass\nprint(len(calls))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={k: v for k, v in __import__("os").environ.items()
                            if k not in ("OMP_NUM_THREADS", "WORLD_SIZE")})
    assert r.stdout.strip().splitlines()[-1] == "1", r.stderr


# ------------------------------------------------------------------------------ progress lines
def test_progress_lines_without_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(engine, "PROGRESS_INTERVAL_S", 0.0)
    model = timm.create_model("qkformer_cifar10", embed_dims=16, depths=(1, 1, 1), num_heads=2,
                              T=1, img_size=8, num_classes=3)
    loader = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1])) for _ in range(3)]
    assert not sys.stderr.isatty()  # pytest captures it
    engine.evaluate(model, loader, torch.device("cpu"), progress=True)
    lines = capsys.readouterr().out.splitlines()
    # one line per batch but the last (the loop's own summary follows it)
    assert [line.split(",")[0] for line in lines] == ["eval: 1/3 batches", "eval: 2/3 batches"]
    assert all(" images/s, " in line and line.endswith(" left") for line in lines)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine.train_one_epoch(model, loader, opt, torch.nn.CrossEntropyLoss(), torch.device("cpu"),
                           0, progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("epoch 0: 1/3 batches, ")
    assert " left; loss " in lines[0] and ", lr " in lines[0]
    engine.evaluate(model, loader, torch.device("cpu"), progress=False)
    assert capsys.readouterr().out == ""
    # the default interval: nothing within a fast loop
    monkeypatch.setattr(engine, "PROGRESS_INTERVAL_S", 30.0)
    engine.evaluate(model, loader, torch.device("cpu"), progress=True)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("main, argv", [
    ("train", ["--data-dir", "nowhere", "--accum-iter", "0"]),
    ("evaluate", ["--checkpoint", "nowhere.pth", "--data-dir", "nowhere", "--batch-size", "0"]),
])
def test_a_bad_flag_on_a_busy_machine_is_one_line(monkeypatch, capsys, keep_threads, main, argv):
    # the flags are checked before the threads are fitted: on a busy machine too, a mistake
    # is one 'error:' line, and the process's threads stay as they were
    from qkformer import evaluate, train
    from conftest import cli_error

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "free_cores", lambda interval=0.2: 0.0)
    torch.set_num_threads(2)
    msg = cli_error(monkeypatch, {"train": train, "evaluate": evaluate}[main].main, argv)
    assert "is invalid" in msg
    assert "threads:" not in capsys.readouterr().err
    assert torch.get_num_threads() == 2
