"""Small on-disk image datasets that need no download.

* :func:`write_png_image_folder`: a few random PNGs per class, for exercising the ImageNet/CIFAR
  code paths in tests.
* :func:`write_digits_image_folder`: scikit-learn's bundled 8x8 handwritten digits (1797 images,
  shipped inside the package) upsampled to CIFAR size. Learnable in minutes on a CPU, which makes it
  the project's built-in demo dataset.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["write_png_image_folder", "write_digits_image_folder"]


def write_png_image_folder(root, classes: int = 3, per_class_train: int = 4,
                           per_class_val: int = 2, size=(40, 48), seed: int = 0) -> Path:
    """Write ``root/{train,val}/class_<k>/<i>.png`` (RGB, ``size`` = (height, width)); return root.

    Each class has its own mean colour plus per-image noise, so a classifier could tell them apart.
    Existing files with the same names are overwritten.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    base = rng.integers(30, 226, size=(classes, 3))
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for k in range(classes):
            d = root / split / f"class_{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = base[k] + rng.normal(0, 25, size=(h, w, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(d / f"{i:03d}.png")
    return root


_MANIFEST = ".digits_manifest.json"


def _digits_split(y: np.ndarray, val_fraction: float, seed: int):
    """Stratified split: in every class, round(n_c * val_fraction) images go to val."""
    rng = np.random.default_rng(seed)
    val = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        val[rng.permutation(idx)[:int(round(len(idx) * val_fraction))]] = True
    return val


def _count_pngs(root: Path) -> dict:
    return {s: sum(1 for _ in (root / s).glob("*/*.png")) for s in ("train", "val")}


def write_digits_image_folder(root, size: int = 32, val_fraction: float = 0.2, seed: int = 0,
                              interpolation: str = "bicubic") -> Path:
    """Write sklearn's digits as ``root/{train,val}/<digit>/<index>.png`` (RGB size x size); return root.

    Pixel values 0..16 are scaled to 0..255, replicated to three channels and resized with
    ``interpolation`` ('bicubic' or 'nearest'). The split is stratified and fixed by ``seed``.

    Idempotent: a manifest records the parameters and file counts; when it matches what is on disk
    the call returns at once. A partial or differently-parameterised folder is deleted and rewritten,
    but only if it contains nothing except digit folders of PNGs (so a wrong ``root`` never costs data).
    """
    from sklearn.datasets import load_digits  # local: sklearn is needed only for the demo dataset

    if interpolation not in ("bicubic", "nearest"):
        raise ValueError(f"interpolation must be 'bicubic' or 'nearest', got {interpolation!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root = Path(root)
    digits = load_digits()
    x, y = digits.images, digits.target  # (1797, 8, 8) floats in 0..16, labels 0..9
    is_val = _digits_split(y, val_fraction, seed)
    params = {"size": int(size), "val_fraction": float(val_fraction), "seed": int(seed),
              "interpolation": interpolation}
    counts = {"train": int((~is_val).sum()), "val": int(is_val.sum())}

    manifest = root / _MANIFEST
    if manifest.is_file():
        try:
            done = json.loads(manifest.read_text())
        except ValueError:
            done = None
        if done == {**params, **counts} and _count_pngs(root) == counts:
            return root
    _clear_digits_folder(root)

    resample = Image.BICUBIC if interpolation == "bicubic" else Image.NEAREST
    for i in range(len(y)):
        d = root / ("val" if is_val[i] else "train") / str(int(y[i]))
        d.mkdir(parents=True, exist_ok=True)
        gray = np.round(x[i] * (255.0 / 16.0)).astype(np.uint8)
        img = Image.fromarray(gray, "L").resize((size, size), resample).convert("RGB")
        img.save(d / f"{i:04d}.png")
    # The manifest is written last: its presence marks a complete folder.
    manifest.write_text(json.dumps({**params, **counts}, indent=1))
    return root


def _clear_digits_folder(root: Path) -> None:
    """Remove a stale/partial digits folder, refusing if it holds anything we did not write."""
    for split in ("train", "val"):
        d = root / split
        if not d.exists():
            continue
        foreign = [p for p in d.iterdir()
                   if not (p.is_dir() and p.name in {str(k) for k in range(10)})]
        foreign += [p for c in d.iterdir() if c.is_dir() for p in c.iterdir() if p.suffix != ".png"]
        if foreign:
            raise FileExistsError(f"{str(d)!r} holds files that are not digits PNGs (e.g. "
                                  f"{str(foreign[0])!r}); refusing to overwrite it, choose another root")
    (root / _MANIFEST).unlink(missing_ok=True)
    for split in ("train", "val"):
        shutil.rmtree(root / split, ignore_errors=True)
