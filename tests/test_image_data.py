"""Static-image data layer: timm transforms (docs/original.md §6.1/§6.2), ImageFolder checks, CIFAR fallback,
synthetic folders and the sklearn-digits demo dataset."""
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from qkformer.data.images import (
    build_cifar, build_image_folder, check_num_classes, cifar_transforms, dataset_num_classes,
    imagenet_transforms)
from qkformer.data.synthetic_images import write_digits_image_folder, write_png_image_folder

IMAGENET_MEAN_U8 = (124, 116, 104)  # round(255 * (0.485, 0.456, 0.406))


def _find(compose, cls):
    found = [t for t in compose.transforms if isinstance(t, cls)]
    assert len(found) == 1, f"expected one {cls.__name__} in {compose}"
    return found[0]


def _index(compose, cls):
    return [i for i, t in enumerate(compose.transforms) if isinstance(t, cls)][0]


# ------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("size,resize", [(224, 256), (288, 288), (384, 384)])
def test_imagenet_eval_transform(size, resize):
    tf = imagenet_transforms(size, is_training=False)
    r = _find(tf, T.Resize)
    assert r.size == resize and r.interpolation == InterpolationMode.BICUBIC
    assert tuple(_find(tf, T.CenterCrop).size) == (size, size)
    assert not any(isinstance(t, (RandAugment, RandomErasing)) for t in tf.transforms)
    # A mean-coloured non-square image comes out as [3, S, S] zeros: resized, cropped, normalised.
    img = Image.new("RGB", (500, 300), IMAGENET_MEAN_U8)
    x = tf(img)
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    assert x.abs().max() < 0.02


def test_imagenet_train_transform():
    tf = imagenet_transforms(224, is_training=True)
    rrc = _find(tf, RandomResizedCropAndInterpolation)
    assert rrc.size == (224, 224) and rrc.scale == (0.08, 1.0)
    assert rrc.ratio == pytest.approx((3 / 4, 4 / 3)) and rrc.interpolation == InterpolationMode.BICUBIC
    assert _find(tf, T.RandomHorizontalFlip).p == 0.5
    ra = _find(tf, RandAugment)
    assert ra.num_layers == 2
    assert all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in ra.ops)
    names = {op.name for op in ra.ops}
    assert "PosterizeIncreasing" in names and "Posterize" not in names  # 'inc1'
    assert ra.ops[0].hparams["img_mean"] == IMAGENET_MEAN_U8  # fill colour = ImageNet mean
    re = _find(tf, RandomErasing)
    assert re.probability == 0.25 and re.mode == "pixel" and re.min_count == re.max_count == 1
    assert _index(tf, T.Normalize) < _index(tf, RandomErasing)
    norm = _find(tf, T.Normalize)
    assert torch.allclose(torch.as_tensor(norm.mean), torch.tensor([0.485, 0.456, 0.406]))
    assert not any(isinstance(t, T.ColorJitter) for t in tf.transforms)
    torch.manual_seed(0), random.seed(0)
    assert tf(Image.new("RGB", (300, 260), (10, 200, 30))).shape == (3, 224, 224)


def test_cifar_transforms():
    tf = cifar_transforms(32, is_training=True)
    rrc = _find(tf, RandomResizedCropAndInterpolation)
    assert rrc.scale == (1.0, 1.0) and rrc.ratio == (1.0, 1.0)
    assert rrc.interpolation == InterpolationMode.BICUBIC
    assert _find(tf, T.RandomHorizontalFlip).p == 0.5
    ra = _find(tf, RandAugment)
    assert ra.num_layers == 1
    assert all(op.magnitude == 9 and op.magnitude_std == 0.4 for op in ra.ops)
    re = _find(tf, RandomErasing)
    assert re.probability == 0.25 and re.mode == "const" and re.max_count == 1
    # Erasing after Normalize: 'const' zeros in normalised space, as the GPU prefetcher did.
    assert _index(tf, T.Normalize) < _index(tf, RandomErasing)
    assert torch.allclose(torch.as_tensor(_find(tf, T.Normalize).std),
                          torch.tensor([0.2470, 0.2435, 0.2616]))
    torch.manual_seed(0), random.seed(0)
    assert tf(Image.new("RGB", (32, 32), (1, 2, 3))).shape == (3, 32, 32)

    ev = cifar_transforms(32, is_training=False)
    assert _find(ev, T.Resize).size == 32 and _find(ev, T.Resize).interpolation == InterpolationMode.BICUBIC
    assert tuple(_find(ev, T.CenterCrop).size) == (32, 32)
    mean_u8 = tuple(round(255 * m) for m in (0.4914, 0.4822, 0.4465))
    x = ev(Image.new("RGB", (32, 32), mean_u8))
    assert x.shape == (3, 32, 32) and x.abs().max() < 0.02


# ------------------------------------------------------------------------------ ImageFolder
def test_image_folder_ok_and_val_class_check(tmp_path):
    root = write_png_image_folder(tmp_path / "d", classes=3, per_class_train=4, per_class_val=2)
    train = build_image_folder(root, "train", imagenet_transforms(64, is_training=True))
    val = build_image_folder(root, "val", imagenet_transforms(64), classes=train.classes)
    assert len(train) == 12 and len(val) == 6 and train.classes == ["class_0", "class_1", "class_2"]
    x, y = val[5]
    assert x.shape == (3, 64, 64) and y == 2
    assert check_num_classes(train, 3) == 3 and dataset_num_classes(torch.utils.data.Subset(val, [0])) == 3
    with pytest.raises(ValueError, match=r"has 3 classes but the model was built with num_classes=10"):
        check_num_classes(train, 10)


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*train/<class>/\*\.png"):
        build_image_folder(tmp_path / "nope", "train")


def test_image_folder_missing_or_empty_split(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"split folder .*val.* does not exist"):
        build_image_folder(tmp_path, "val")
    with pytest.raises(ValueError, match=r"no class sub-folders"):
        build_image_folder(tmp_path, "train")


def test_image_folder_empty_class(tmp_path):
    root = write_png_image_folder(tmp_path, classes=2)
    (root / "train" / "zebra").mkdir()
    (root / "train" / "zebra" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"without images.*zebra"):
        build_image_folder(root, "train")


def test_image_folder_mismatched_classes(tmp_path):
    root = write_png_image_folder(tmp_path, classes=3)
    os.rename(root / "val" / "class_2", root / "val" / "class_9")
    train = build_image_folder(root, "train")
    with pytest.raises(ValueError, match=r"missing 1: \['class_2'\]; unexpected 1: \['class_9'\]"):
        build_image_folder(root, "val", classes=train.classes)


def test_image_folder_corrupt_png(tmp_path):
    root = write_png_image_folder(tmp_path, classes=2, per_class_train=1)
    bad = root / "train" / "class_1" / "000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    ds = build_image_folder(root, "train")
    ds[0]  # the good one loads
    with pytest.raises(OSError, match=r"cannot read image file .*class_1.*000\.png"):
        ds[1]


# -------------------------------------------------------------------------------------- CIFAR
def test_cifar_imagefolder_fallback(tmp_path):
    root = write_png_image_folder(tmp_path, classes=10, per_class_train=1, per_class_val=1, size=(32, 32))
    train = build_cifar("cifar10", root, "train", cifar_transforms(is_training=True))
    test = build_cifar("cifar10", root, "test", cifar_transforms(), classes=train.classes)
    assert len(train) == 10 and len(test) == 10 and test.root.endswith("val")
    assert train[0][0].shape == (3, 32, 32)
    check_num_classes(train, 10)
    with pytest.raises(ValueError, match="num_classes=100"):
        check_num_classes(train, 100)
    # A 'test' folder serves as val when there is no 'val'.
    os.rename(root / "val", root / "test")
    assert build_cifar("cifar100", root, "val").root.endswith("test")


def test_cifar_missing_explains_both_options(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python.*download.*ImageFolder"):
        build_cifar("cifar100", tmp_path, "train")
    with pytest.raises(ValueError, match="unknown CIFAR"):
        build_cifar("cifar1000", tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split"):
        build_cifar("cifar10", tmp_path, "dev")


def test_cifar_uses_torchvision_files_when_present(tmp_path, monkeypatch):
    # No real archive offline: check the dispatch by stubbing the torchvision class.
    import qkformer.data.images as images
    calls = []

    class FakeCIFAR10:
        base_folder = "cifar-10-batches-py"

        def __init__(self, root, train, transform=None, download=False):
            calls.append((root, train, download))

    monkeypatch.setitem(images._CIFAR, "cifar10", FakeCIFAR10)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "train").mkdir()  # would be the fallback; the torchvision files win
    build_cifar("cifar10", tmp_path, "train")
    build_cifar("cifar10", tmp_path / "cifar-10-batches-py", "test")  # extracted folder given
    build_cifar("cifar10", tmp_path / "empty", "val", download=True)
    assert calls == [(str(tmp_path), True, False), (str(tmp_path), False, False),
                     (str(tmp_path / "empty"), False, True)]


# --------------------------------------------------------------------------- synthetic data
def test_png_image_folder(tmp_path):
    root = write_png_image_folder(tmp_path, classes=2, per_class_train=3, per_class_val=1, size=(40, 48))
    files = sorted(root.glob("*/*/*.png"))
    assert len(files) == 8
    with Image.open(files[0]) as im:
        assert im.mode == "RGB" and im.size == (48, 40)  # PIL size is (width, height)
    # Class-dependent: the two class means differ clearly.
    m = [np.asarray(Image.open(root / "train" / f"class_{k}" / "000.png")).mean((0, 1)) for k in (0, 1)]
    assert np.abs(m[0] - m[1]).max() > 10


def test_digits_image_folder(tmp_path):
    root = write_digits_image_folder(tmp_path / "digits", size=32, val_fraction=0.2, seed=0)
    train = build_image_folder(root, "train")
    val = build_image_folder(root, "val", classes=train.classes)
    assert train.classes == [str(d) for d in range(10)]
    assert len(train) + len(val) == 1797
    # Stratified: every class has ~20 % of its images in val.
    from sklearn.datasets import load_digits
    per_class = np.bincount(load_digits().target)
    val_per_class = np.bincount([t for _, t in val.samples], minlength=10)
    assert np.all(np.abs(val_per_class - per_class * 0.2) <= 0.5 + 1e-9)
    img = val.loader(val.samples[0][0])
    assert img.mode == "RGB" and img.size == (32, 32)
    arr = np.asarray(img)
    assert arr.max() > 200 and arr.min() < 30 and (arr[..., 0] == arr[..., 2]).all()
    x, _ = build_image_folder(root, "val", cifar_transforms())[0]
    assert x.shape == (3, 32, 32)

    # Idempotent: a second call writes nothing.
    probe = root / "train" / "0" / sorted(os.listdir(root / "train" / "0"))[0]
    os.utime(probe, (1, 1))
    write_digits_image_folder(root, size=32, val_fraction=0.2, seed=0)
    assert probe.stat().st_mtime == 1
    # Same seed -> same split.
    assert json.loads((root / ".digits_manifest.json").read_text())["val"] == len(val)

    # A partial folder (a file lost) is detected and rewritten.
    probe.unlink()
    write_digits_image_folder(root, size=32, val_fraction=0.2, seed=0)
    assert probe.exists() and len(build_image_folder(root, "train")) == len(train)

    # Different parameters rewrite the folder.
    write_digits_image_folder(root, size=16, val_fraction=0.2, seed=0)
    with Image.open(probe) as im:
        assert im.size == (16, 16)


def test_digits_refuses_foreign_folder(tmp_path):
    (tmp_path / "train" / "cats").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_digits_image_folder(tmp_path)
    assert (tmp_path / "train" / "cats").is_dir()
