"""What the command-line tools offer a newcomer by default: the demo's help, schedule and closing
lines, and loader workers that fit the cores available. Nothing here trains: the demo's calls
into training and evaluation are replaced by recorders."""
import re

import pytest
import torch
from timm.scheduler import create_scheduler_v2

from qkformer import demo, evaluate, train
from qkformer.config import parse_with_config


@pytest.fixture
def recorded_demo(monkeypatch, tmp_path):
    """Runs the demo with training and evaluation recorded instead of run; returns
    (the argv given to training, the argv given to evaluation, the stdout lines, tmp_path)."""
    calls = {}

    def fake_train(argv, default_config=None):
        calls["train"] = (list(argv), default_config)
        return {}

    def fake_evaluate(argv):
        calls["evaluate"] = list(argv)
        return {"acc1": 97.5, "images": 360}

    monkeypatch.setattr(demo.train, "main", fake_train)
    monkeypatch.setattr(demo.evaluate, "main", fake_evaluate)
    monkeypatch.setattr(demo, "write_digits_image_folder", lambda root, size: tmp_path / "digits")

    def run(capsys, *argv):
        demo.main(["--data-dir", str(tmp_path / "digits"), "--output-dir", str(tmp_path / "out"),
                   *argv])
        return calls["train"], calls["evaluate"], capsys.readouterr().out.splitlines()
    return run


def _epoch_lrs(train_argv, default_config):
    """The learning rate of each epoch under the demo's settings, resolved through the recipe
    and scheduled the way training schedules it (per epoch for the CIFAR recipe)."""
    args = parse_with_config(train.build_parser(), train_argv, default_config)
    assert args.sched_on == "epoch"  # the case where the warm-up lr lasts a whole epoch
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    sched, _ = create_scheduler_v2(opt, "cosine", num_epochs=args.epochs,
                                   cooldown_epochs=args.cooldown_epochs, min_lr=args.min_lr,
                                   warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
                                   step_on_epochs=True, updates_per_epoch=1)
    lrs = []
    for epoch in range(args.epochs):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    return args, lrs


def test_demo_first_epoch_trains_at_a_useful_rate(recorded_demo, capsys):
    (argv, config), _, _ = recorded_demo(capsys)
    args, lrs = _epoch_lrs(argv, config)
    assert args.epochs == 12 and len(lrs) == 12
    # the recipe's 1e-5 would make epoch 0 a no-op; at least a tenth of the peak is learning
    assert lrs[0] >= args.lr / 10 - 1e-12, lrs
    # then the cosine from (about) the peak down
    assert 0.9 * args.lr < lrs[1] <= args.lr and all(a > b for a, b in zip(lrs[1:], lrs[2:]))


def test_demo_prints_where_it_wrote(recorded_demo, capsys, tmp_path):
    (argv, _), eval_argv, lines = recorded_demo(capsys)
    out = (tmp_path / "out").resolve()
    checkpoint = out / "checkpoint-last.pth"
    evaluated = eval_argv[eval_argv.index("--checkpoint") + 1]
    assert evaluated == str(tmp_path / "out" / "checkpoint-last.pth")
    text = "\n".join(lines)
    assert f"checkpoint {checkpoint}" in text
    assert f"training log {out / 'log.jsonl'}" in text
    assert f"data {(tmp_path / 'digits').resolve()}" in text
    # the paths come last, after the result
    assert lines[-4].startswith("demo: top-1 97.5%")


def test_demo_help_shows_defaults_and_matches_the_docstring():
    text = demo.build_parser().format_help()
    options = text[text.index("options:"):]
    for flag, default in [("--epochs", 12), ("--workers", 2), ("--output-dir", "output/demo"),
                          ("--data-dir", "data/digits32")]:
        entry = re.search(rf"\n  {flag} \S+\s+(.+?)(?=\n  -|\Z)", options, re.S).group(1)
        assert f"(default: {default})" in " ".join(entry.split()), (flag, text)
        # the usage line of the module docstring names the same defaults
        assert flag == "--workers" or f"[{flag} {default}]" in demo.__doc__, flag
    assert f"{demo.build_parser().get_default('epochs')} epochs" in demo.__doc__


@pytest.mark.parametrize("cores, expected", [({0}, 1), ({0, 1}, 2), (set(range(16)), 4)])
def test_evaluate_workers_follow_the_available_cores(monkeypatch, cores, expected):
    monkeypatch.setattr(evaluate.os, "sched_getaffinity", lambda pid: cores, raising=False)
    args = evaluate.build_parser().parse_args(["--checkpoint", "c.pth", "--data-dir", "d"])
    assert args.workers == expected
    assert f"(default: {expected})" in evaluate.build_parser().format_help()
