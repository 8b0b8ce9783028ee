"""Static-image data: transforms and datasets for the ImageNet and CIFAR recipes (docs/original.md §6.1, §6.2).

Transforms come from timm's ``create_transform`` so the augmentation is the library's, not a
re-implementation. Datasets are torchvision's ``ImageFolder`` / ``CIFAR10`` / ``CIFAR100`` with
up-front layout checks, because torchvision's own errors for a wrong layout are terse (or, with
``allow_empty``, silent) and a data-path mistake is the most common way a training run fails.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

__all__ = [
    "CIFAR_MEAN", "CIFAR_STD", "imagenet_transforms", "cifar_transforms", "build_image_folder",
    "build_cifar", "dataset_num_classes", "check_num_classes", "checked_loader", "CorruptImageError",
]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

_LAYOUT = ("expected an ImageFolder layout: {root}/train/<class>/*.png (or .jpg, .jpeg, ...) and "
           "{root}/val/<class>/*.png with the same class folder names in both splits")


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------
def imagenet_transforms(input_size: int = 224, is_training: bool = False,
                        aa: Optional[str] = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                        remode: str = "pixel", recount: int = 1):
    """The MAE/DeiT fine-tuning transforms of the ImageNet script (docs/original.md §6.1).

    Train: RandomResizedCrop(scale 0.08-1, bicubic), hflip 0.5, RandAugment (fill = ImageNet mean),
    ToTensor, Normalize, RandomErasing. ``color_jitter=None`` as in the original (timm would drop it
    anyway because ``aa`` is set). Eval: Resize(int(input_size / crop_pct), bicubic) + CenterCrop,
    with crop_pct = 224/256 up to 224 px and 1.0 above (so 256 / 288 / 384 for 224 / 288 / 384).
    """
    if is_training:
        return create_transform(
            input_size, is_training=True, color_jitter=None, auto_augment=aa,
            interpolation="bicubic", re_prob=reprob, re_mode=remode, re_count=recount,
            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    # timm computes floor(input_size / crop_pct), the same number as the original int(...).
    return create_transform(input_size, is_training=False, interpolation="bicubic",
                            crop_pct=crop_pct, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def cifar_transforms(img_size: int = 32, is_training: bool = False,
                     mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD,
                     aa: Optional[str] = "rand-m9-n1-mstd0.4-inc1", reprob: float = 0.25,
                     remode: str = "const", hflip: float = 0.5):
    """The CIFAR-10/100 transforms (docs/original.md §6.2).

    Train: RandomResizedCrop with scale (1, 1) and ratio (1, 1) (an identity on 32x32 inputs, kept
    because it also squares and resizes non-CIFAR folders), hflip 0.5, RandAugment with 1 op,
    ToTensor, Normalize, RandomErasing. The original erased on the GPU prefetcher *after*
    normalisation; with ``separate=False`` timm places RandomErasing after Normalize too, so 'const'
    still writes zeros in normalised space. Eval: Resize(img_size, bicubic) + CenterCrop (crop_pct 1).
    """
    mean, std = tuple(mean), tuple(std)
    if is_training:
        return create_transform(
            img_size, is_training=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=hflip, vflip=0.0,
            color_jitter=None, auto_augment=aa, interpolation="bicubic", re_prob=reprob,
            re_mode=remode, re_count=1, mean=mean, std=std)
    return create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=1.0,
                            mean=mean, std=std)


# --------------------------------------------------------------------------------------------
# ImageFolder with layout checks
# --------------------------------------------------------------------------------------------
class CorruptImageError(OSError, ValueError):
    """An image file that cannot be decoded. A ValueError too, so that the command-line tools
    report it as a user error (one line naming the file), also from a DataLoader worker."""


def checked_loader(path: str):
    """torchvision's default loader, but a corrupt/truncated file raises an error naming it.

    Module-level (not a closure) so DataLoader workers can pickle it.
    """
    try:
        return default_loader(path)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        detail = " ".join(str(e).split())
        raise CorruptImageError(f"cannot read image file {path!r} ({type(e).__name__}: {detail}); "
                                "delete or replace the file") from e


def _class_dirs(split_dir: Path) -> list:
    # Same rule as torchvision's find_classes, so class indices are identical to the original's.
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())


def _diff_text(got: Sequence[str], want: Sequence[str], limit: int = 10) -> str:
    missing = [c for c in want if c not in set(got)]
    extra = [c for c in got if c not in set(want)]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {missing[:limit]}{' ...' if len(missing) > limit else ''}")
    if extra:
        parts.append(f"unexpected {len(extra)}: {extra[:limit]}{' ...' if len(extra) > limit else ''}")
    return "; ".join(parts) or "same names, different order"


def build_image_folder(root, split: str, transform: Optional[Callable] = None,
                       classes: Optional[Sequence[str]] = None) -> ImageFolder:
    """``ImageFolder(root/split)`` with readable errors for every layout mistake.

    ``classes``: the class list of another split (normally ``train_ds.classes``); the split must
    have exactly these class folders, otherwise labels would silently be shifted.
    """
    root = Path(root).expanduser()
    layout = _LAYOUT.format(root=root)
    if not root.is_dir():
        raise FileNotFoundError(f"image dataset root {str(root)!r} does not exist or is not a "
                                f"directory; {layout}")
    split_dir = root / split
    if not split_dir.is_dir():
        present = sorted(e.name for e in os.scandir(root) if e.is_dir())
        raise FileNotFoundError(f"split folder {str(split_dir)!r} does not exist (folders in root: "
                                f"{present[:10]}); {layout}")
    found = _class_dirs(split_dir)
    if not found:
        raise ValueError(f"split folder {str(split_dir)!r} has no class sub-folders; {layout}")
    if classes is not None and list(found) != list(classes):
        raise ValueError(f"class folders of {str(split_dir)!r} differ from the expected "
                         f"{len(classes)} classes ({_diff_text(found, list(classes))})")
    # allow_empty=True so that we, not torchvision, report empty classes (with their paths).
    ds = ImageFolder(str(split_dir), transform=transform, loader=checked_loader, allow_empty=True)
    nonempty = {target for _, target in ds.samples}
    empty = [c for c in ds.classes if ds.class_to_idx[c] not in nonempty]
    if empty:
        raise ValueError(f"class folder(s) without images in {str(split_dir)!r}: "
                         f"{empty[:10]}{' ...' if len(empty) > 10 else ''} (accepted extensions: "
                         f"{', '.join(IMG_EXTENSIONS)}); every class needs at least one image")
    return ds


# --------------------------------------------------------------------------------------------
# CIFAR: torchvision files, or an ImageFolder fallback
# --------------------------------------------------------------------------------------------
_CIFAR = {"cifar10": CIFAR10, "cifar100": CIFAR100}
_SPLITS = {"train": "train", "val": "val", "test": "val", "validation": "val"}


def build_cifar(name: str, data_dir, split: str, transform: Optional[Callable] = None,
                download: bool = False, classes: Optional[Sequence[str]] = None):
    """CIFAR-10/100 'train' or 'val' (= the 10k test set, as in the original; 'test' is an alias).

    Uses torchvision's files when ``data_dir/cifar-10-batches-py`` (or ``cifar-100-python``) exists
    or ``download=True``; otherwise an ImageFolder at ``data_dir/train`` / ``data_dir/val`` (a
    ``test`` folder is accepted for val). ``classes`` is passed to :func:`build_image_folder`.
    """
    name = name.lower()
    if name not in _CIFAR:
        raise ValueError(f"unknown CIFAR dataset {name!r}; expected one of {sorted(_CIFAR)}")
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLITS)}")
    split = _SPLITS[split]
    cls = _CIFAR[name]
    data_dir = Path(data_dir).expanduser()
    if data_dir.name == cls.base_folder:  # the user pointed at the extracted folder itself
        data_dir = data_dir.parent
    if (data_dir / cls.base_folder).is_dir() or download:
        return cls(str(data_dir), train=(split == "train"), transform=transform, download=download)
    folder = split
    if split == "val" and not (data_dir / "val").is_dir() and (data_dir / "test").is_dir():
        folder = "test"
    if (data_dir / folder).is_dir():
        return build_image_folder(data_dir, folder, transform, classes=classes)
    raise FileNotFoundError(
        f"no {name} data in {str(data_dir)!r}. Either (a) put torchvision's extracted archive at "
        f"{str(data_dir / cls.base_folder)!r} (or pass download=True / --download on a machine with "
        f"internet), or (b) provide an ImageFolder: {_LAYOUT.format(root=data_dir)}")


# --------------------------------------------------------------------------------------------
# Class-count checks
# --------------------------------------------------------------------------------------------
def dataset_num_classes(dataset) -> int:
    """Number of classes of an ImageFolder / torchvision CIFAR dataset (or a Subset of one)."""
    while not hasattr(dataset, "classes") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset  # torch.utils.data.Subset and similar wrappers
    if hasattr(dataset, "classes"):
        return len(dataset.classes)
    raise TypeError(f"cannot tell the number of classes of {type(dataset).__name__} "
                    "(it has no .classes attribute)")


def check_num_classes(dataset, num_classes: int, what: str = "dataset") -> int:
    """Raise ValueError unless the dataset has exactly ``num_classes`` classes; return the count.

    Fewer classes would train (unused logits) and more would crash inside the loss with a CUDA
    assert, so both are reported here with the numbers that need changing.
    """
    n = dataset_num_classes(dataset)
    if n != num_classes:
        root = getattr(dataset, "root", None)
        where = f" at {str(root)!r}" if root is not None else ""
        raise ValueError(f"{what}{where} has {n} classes but the model was built with "
                         f"num_classes={num_classes}; build the model with num_classes={n} or "
                         "point the data path at the intended dataset")
    return n
