"""User mistakes end a command-line run with one line, ``error: ...``, saying what is wrong.

The drivers run as the scripts run them: ``main()`` with the arguments in ``sys.argv`` (so
``run_cli`` turns user errors into ``SystemExit("error: ...")``), plus one real subprocess.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from qkformer import VARIANTS, evaluate, train
from qkformer.config import error_message, parse_with_config
from qkformer.data.synthetic_images import write_png_image_folder
from conftest import cli_error as _cli_error

REPO = Path(__file__).resolve().parents[1]
TINY = ["--embed-dims", "16", "32", "64", "--depths", "1", "1", "1", "--num-heads", "2",
        "--T", "2", "--workers", "0", "--no-progress", "--no-amp", "--input-size", "16",
        "--batch-size", "2", "--epochs", "1", "--warmup-epochs", "0", "--cooldown-epochs", "0"]




@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    return write_png_image_folder(tmp_path_factory.mktemp("pngs"), classes=2, per_class_train=2,
                                  per_class_val=1, size=(16, 16))


# Each bad setting, with what the message must say. --data-dir does not exist: the settings are
# checked before the data (a data error would be a different message).
BAD_TRAIN = [
    (["--model", "resnet50"], "unknown --model 'resnet50'; the qkformer models are"),
    (["--epochs", "-1"], "--epochs -1 is invalid: it must be at least 1"),
    (["--epochs", "0"], "--epochs 0 is invalid: it must be at least 1"),
    (["--warmup-epochs", "-1"], "--warmup-epochs -1 is invalid: it must be 0 or more"),
    (["--warmup-epochs", "3", "--epochs", "2"], "--warmup-epochs 3 is longer than the run"),
    (["--batch-size", "0"], "--batch-size 0 is invalid"),
    (["--val-batch-size", "-4"], "--val-batch-size -4 is invalid"),
    (["--accum-iter", "0"], "--accum-iter 0 is invalid"),
    (["--T", "0"], "--T 0 is invalid"),
    (["--workers", "-1"], "--workers -1 is invalid: it must be 0 or more"),
    (["--lr", "0"], "--lr 0.0 is invalid: it must be positive"),
    (["--mixup-prob", "1.5"], "--mixup-prob 1.5 is invalid: it must be in [0, 1]"),
    (["--embed-dims", "16", "0", "64"], "--embed-dims 0 is invalid"),
    (["--num-heads", "3"], "cannot build qkformer_cifar10 with these architecture options"),
    (["--input-size", "30"], "--input-size 30: input size 30x30 is not supported"),
    (["--config", "no_such_recipe"], "config file not found: no_such_recipe"),
]


@pytest.mark.parametrize("argv, expected", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_train_rejects_bad_settings_up_front(monkeypatch, tmp_path, argv, expected):
    msg = _cli_error(monkeypatch, train.main, ["--data-dir", str(tmp_path / "no_data"),
                                               "--output-dir", str(tmp_path / "out"), *TINY, *argv],
                     default_config="cifar10")
    assert expected in msg
    assert not (tmp_path / "out").exists()  # nothing was started


def test_unknown_model_lists_every_variant(monkeypatch, tmp_path):
    msg = _cli_error(monkeypatch, train.main, ["--data-dir", str(tmp_path), "--model", "vit_b"])
    assert all(name in msg for name in VARIANTS)


def test_step_schedule_needs_epochs_after_warmup(monkeypatch, tmp_path):
    # the per-iteration (ImageNet) schedule runs the cosine on epochs - warmup
    msg = _cli_error(monkeypatch, train.main, ["--data-dir", str(tmp_path / "x"), *TINY,
                                               "--input-size", "32", "--epochs", "5",
                                               "--warmup-epochs", "5"], default_config="imagenet")
    assert "--warmup-epochs 5 must be smaller than --epochs 5" in msg


@pytest.mark.parametrize("model, size, nearest", [("qkformer_cifar10", 30, "28x28 or 32x32"),
                                                  ("qkformer_10_384", 200, "192x192 or 208x208"),
                                                  ("qkformer_10_384", 8, "16x16")])
def test_input_size_suggests_the_nearest_valid_sizes(monkeypatch, tmp_path, model, size, nearest):
    msg = _cli_error(monkeypatch, train.main, ["--data-dir", str(tmp_path / "x"), *TINY,
                                               "--model", model, "--input-size", str(size)])
    assert msg.endswith(f"(nearest: {nearest})") and f"{size}x{size} is not supported" in msg


def test_model_input_check_suggests_both_neighbours_per_side():
    model = timm.create_model("qkformer_cifar10", embed_dims=16, depths=(1, 1, 1), num_heads=2)
    with pytest.raises(ValueError, match=r"multiples of 4 .*\(nearest: 28x32 or 32x36\)"):
        model(torch.zeros(1, 3, 30, 33))
    with pytest.raises(ValueError, match=r"\(nearest: 32x28 or 32x32\)"):
        model(torch.zeros(1, 3, 32, 30))
    with pytest.raises(ValueError, match=r"\(nearest: 4x4\)$"):
        model(torch.zeros(1, 3, 2, 3))


def test_every_recipe_passes_the_checks(tmp_path):
    from qkformer.config import recipe_names

    assert set(recipe_names()) == {"imagenet", "cifar10", "cifar100", "cifar10_dvs",
                                   "dvs128_gesture"}
    for name in recipe_names():
        args = parse_with_config(train.build_parser(), ["--data-dir", str(tmp_path)], name)
        train.check_args(args)  # raises on any rejected value
        assert args.model == f"qkformer_{name}" or name == "imagenet"


def test_paths_that_are_not_what_they_should_be(monkeypatch, pngs, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello\n")  # neither a folder nor a checkpoint
    state = timm.create_model("qkformer_cifar10", embed_dims=16, depths=(1, 1, 1), num_heads=2,
                              num_classes=2, T=2).state_dict()
    bare = tmp_path / "weights.pth"
    torch.save(state, bare)  # weights, but no training state
    bad_yaml = tmp_path / "bad.yml"
    bad_yaml.write_text("lr: [1e-3\nepochs: 2\n")
    bad_value = tmp_path / "bad_value.yml"
    bad_value.write_text("lr: fast\n")
    base = ["--data-dir", str(pngs), "--output-dir", str(tmp_path / "out"), *TINY]
    cases = [
        (["--data-dir", str(a_file)], f"--data-dir {a_file} is a file"),
        (["--output-dir", str(a_file)], f"--output-dir {a_file} is a file, not a folder"),
        (["--resume", str(tmp_path)], f"--resume {tmp_path} is a folder; give a checkpoint file"),
        (["--resume", str(a_file)], f"{a_file} is not a checkpoint file"),
        (["--finetune", str(a_file)], f"{a_file} is not a checkpoint file"),
        (["--resume", str(bare)], f"{bare} is not a training checkpoint"),
        (["--config", str(bad_yaml)], f"{bad_yaml}: not a valid YAML file"),
        (["--config", str(bad_value)], f"{bad_value}: bad value for lr: 'fast'"),
        (["--config", str(tmp_path)], f"--config {tmp_path} is a folder"),
    ]
    for argv, expected in cases:
        assert expected in _cli_error(monkeypatch, train.main, [*base, *argv]), argv


def test_unknown_or_missing_device(monkeypatch, pngs, tmp_path):
    base = ["--data-dir", str(pngs), "--output-dir", str(tmp_path / "out"), *TINY]
    msg = _cli_error(monkeypatch, train.main, [*base, "--device", "gpu"])
    assert "--device 'gpu' is not a device" in msg
    if not torch.cuda.is_available():
        msg = _cli_error(monkeypatch, train.main, [*base, "--device", "cuda"])
        assert "--device cuda: CUDA is not available here" in msg


def test_corrupt_image_in_a_worker_is_one_line(monkeypatch, pngs, tmp_path):
    data = tmp_path / "data"
    write_png_image_folder(data, classes=2, per_class_train=2, per_class_val=1, size=(16, 16))
    broken = data / "train" / "class_1" / "001.png"
    broken.write_bytes(b"not a png")
    # --workers 1: the error is raised in a DataLoader worker and re-raised with its traceback
    msg = _cli_error(monkeypatch, train.main, ["--data-dir", str(data), "--output-dir",
                                               str(tmp_path / "out"), *TINY, "--workers", "1"])
    assert msg.startswith(f"error: cannot read image file {str(broken)!r}")
    assert msg.endswith("delete or replace the file")


def test_error_message_unwraps_only_worker_tracebacks():
    wrapped = ValueError("Caught CorruptImageError in DataLoader worker process 0.\n"
                         "Original Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                         "qkformer.data.images.CorruptImageError: cannot read image file 'a.png'\n")
    assert error_message(wrapped) == "cannot read image file 'a.png'"
    assert error_message(ValueError("Caught a cold: no traceback")) == "Caught a cold: no traceback"


def test_evaluate_rejects_bad_settings(monkeypatch, pngs, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello\n")
    ckpt = tmp_path / "c.pth"
    torch.save({"model": timm.create_model("qkformer_cifar10", embed_dims=16, depths=(1, 1, 1),
                                           num_heads=2, num_classes=2, T=2).state_dict()}, ckpt)
    base = ["--data-dir", str(pngs), "--workers", "0", "--no-progress"]
    cases = [
        (["--checkpoint", str(ckpt), "--model", "cifar10"], "unknown --model 'cifar10'"),
        (["--checkpoint", str(ckpt), "--batch-size", "0"], "--batch-size 0 is invalid"),
        (["--checkpoint", str(ckpt), "--T", "-2"], "--T -2 is invalid"),
        (["--checkpoint", str(tmp_path)], f"--checkpoint {tmp_path} is a folder"),
        (["--checkpoint", str(a_file)], f"{a_file} is not a checkpoint file"),
        (["--checkpoint", str(ckpt), "--data-dir", str(a_file)], f"--data-dir {a_file} is a file"),
        (["--checkpoint", str(ckpt), "--model", "qkformer_cifar10", "--input-size", "18"],
         "--input-size 18: input size 18x18 is not supported"),
    ]
    for argv, expected in cases:
        assert expected in _cli_error(monkeypatch, evaluate.main, [*base, *argv]), argv


def test_script_prints_one_line_and_exits_1(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "cifar10" / "train.py"), "--data-dir",
                        str(tmp_path), "--accum-iter", "0"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 1
    assert r.stderr == "error: --accum-iter 0 is invalid: it must be at least 1\n"
