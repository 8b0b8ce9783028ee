"""Checkpoint I/O: safe reading, layout detection, strict loading with useful errors, safetensors.

Released QKFormer checkpoints are MAE-style dicts ``{'model', 'optimizer', 'epoch', 'scaler',
'args': argparse.Namespace}``; the CIFAR/DVS scripts wrote timm-style (``state_dict``) or
``model`` dicts. Our module names equal the original ones (the manifests in the tests prove it),
so no key conversion is needed beyond stripping wrapper prefixes (``module.`` from DDP,
``_orig_mod.`` from ``torch.compile``).

Files are unpickled with ``weights_only=True``: only tensors, plain containers and the
allow-listed ``argparse.Namespace`` are rebuilt. A file that needs anything else (arbitrary code)
is refused, never executed.

CLI: ``python -m qkformer.checkpoint export IN.pth OUT.safetensors`` and
``python -m qkformer.checkpoint inspect FILE``.
"""
from __future__ import annotations

import argparse
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["SAFE_GLOBALS", "UnsafeCheckpointError", "CheckpointMismatchError", "read_checkpoint",
           "extract_state_dict", "checkpoint_filter_fn", "load_checkpoint", "match_variant",
           "save_safetensors", "atomic_save"]

# Exactly what the released files need beyond tensors and builtins.
SAFE_GLOBALS = [argparse.Namespace]
_PREFIXES = ("module.", "_orig_mod.")
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")
_EMA_KEYS = ("state_dict_ema", "model_ema")

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]


class UnsafeCheckpointError(ValueError):
    """The file's pickle asks for objects outside the allow-list (it could run code)."""


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the model."""


def read_checkpoint(path: PathLike) -> Any:
    """Read a ``.pth``/``.pt``/``.tar`` (safe unpickling) or ``.safetensors`` file onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"corrupt or truncated safetensors file {path}: {e}") from e
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UnsafeCheckpointError(
                f"refusing to load {path}: its pickle needs objects that are not plain tensors or "
                f"containers, so loading it could execute arbitrary code. Only "
                f"{[g.__module__ + '.' + g.__qualname__ for g in SAFE_GLOBALS]} are allowed. "
                f"Details: {str(e).splitlines()[0]}") from e
        raise ValueError(f"corrupt checkpoint file {path}: {e}") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"corrupt or truncated checkpoint file {path} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def extract_state_dict(ckpt: Any, use_ema: bool = False) -> StateDict:
    """The model weights inside any supported layout, with wrapper prefixes removed."""
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint is a {type(ckpt).__name__}, not a dict")
    keys = (_EMA_KEYS if use_ema else ()) + _STATE_DICT_KEYS
    for key in keys:
        inner = ckpt.get(key)
        if isinstance(inner, Mapping) and inner:
            ckpt = inner
            break
    else:
        if use_ema:
            raise ValueError(f"no EMA weights ({', '.join(_EMA_KEYS)}) in checkpoint")
    if not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        found = sorted(k for k, v in ckpt.items() if not isinstance(v, torch.Tensor))[:8]
        raise ValueError(f"no state_dict found in checkpoint: expected one of {keys} or a bare "
                         f"state_dict; found non-tensor entries {found}")
    return _strip_prefixes(ckpt)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: Optional[nn.Module] = None) -> StateDict:
    """timm-style filter: any supported layout -> this package's keys (identical to the original)."""
    return extract_state_dict(state_dict)


def _shapes(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _variant_shapes(name: str, **overrides) -> Dict[str, Tuple[int, ...]]:
    import timm

    from . import variants  # noqa: F401  (registration)

    with torch.device("meta"):
        return _shapes(timm.create_model(name, **overrides).state_dict())


def match_variant(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Name of the released variant whose keys and shapes this state_dict fits, if any.

    A head of another size still matches, reported as ``name (num_classes=K)``.
    """
    from .variants import VARIANTS

    shapes = _shapes(state_dict)
    head_only = None
    for name in VARIANTS:
        ref = _variant_shapes(name)
        if ref.keys() != shapes.keys():
            continue
        diff = {k for k in ref if ref[k] != shapes[k]}
        if not diff:
            return name  # an exact fit wins over a fit with another head size
        if head_only is None and diff <= {"head.weight", "head.bias"} and "head.bias" in shapes:
            head_only = f"{name} (num_classes={shapes['head.bias'][0]})"
    return head_only


def _mismatch_report(model_sd: Mapping, ckpt_sd: Mapping, limit: int = 10) -> str:
    def fmt(title: str, items: Iterable[str]) -> str:
        items = list(items)
        if not items:
            return ""
        more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"\n  {title} ({len(items)}): {', '.join(items[:limit])}{more}"

    missing = [k for k in model_sd if k not in ckpt_sd]
    unexpected = [k for k in ckpt_sd if k not in model_sd]
    shaped = [f"{k} checkpoint {tuple(ckpt_sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
              for k in model_sd if k in ckpt_sd and ckpt_sd[k].shape != model_sd[k].shape]
    return fmt("missing keys", missing) + fmt("unexpected keys", unexpected) + fmt(
        "mis-shaped keys", shaped)


def load_checkpoint(model: nn.Module, source: Union[PathLike, Mapping[str, Any]],
                    strict: bool = True, use_ema: bool = False) -> Any:
    """Load weights from a file or an already-read checkpoint into ``model``.

    Returns the whole checkpoint object (for resuming optimizer/epoch). With ``strict=True`` any
    missing, unexpected or mis-shaped key raises :class:`CheckpointMismatchError` naming them and,
    where it can, the released variant the checkpoint does fit.
    """
    ckpt = source if isinstance(source, Mapping) else read_checkpoint(source)
    state_dict = extract_state_dict(ckpt, use_ema=use_ema)
    target = model.module if hasattr(model, "module") else model
    target = getattr(target, "_orig_mod", target)
    model_sd = target.state_dict()
    report = _mismatch_report(model_sd, state_dict)
    if report and strict:
        fits = match_variant(state_dict)
        hint = (f"\n  the checkpoint fits the variant {fits}" if fits else
                "\n  the checkpoint matches none of the released variants")
        where = "" if isinstance(source, Mapping) else f" {source}"
        raise CheckpointMismatchError(
            f"checkpoint{where} does not fit {type(target).__name__}:{report}{hint}")
    if not strict:  # drop mis-shaped entries (e.g. a head of another size when fine-tuning)
        state_dict = {k: v for k, v in state_dict.items()
                      if k not in model_sd or v.shape == model_sd[k].shape}
    target.load_state_dict(state_dict, strict=strict)
    return ckpt


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, then rename: a crash never leaves a
    half-written checkpoint in place of a good one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors(source: Union[nn.Module, Mapping[str, Any], PathLike], path: PathLike,
                     metadata: Optional[Dict[str, str]] = None) -> None:
    """Export model weights (from a module, a checkpoint dict or a checkpoint file)."""
    from safetensors.torch import save_file

    if isinstance(source, nn.Module):
        state_dict = source.state_dict()
    else:
        state_dict = extract_state_dict(source if isinstance(source, Mapping) else read_checkpoint(source))
    tensors = {k: v.detach().cpu().contiguous() for k, v in _strip_prefixes(state_dict).items()}
    fits = match_variant(tensors)
    meta = {"format": "pt", **({"variant": fits} if fits else {}), **(metadata or {})}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qkformer.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    exp = sub.add_parser("export", help="write the weights of a checkpoint as .safetensors")
    exp.add_argument("src")
    exp.add_argument("dst")
    ins = sub.add_parser("inspect", help="print the layout and the variant a checkpoint fits")
    ins.add_argument("src")
    args = parser.parse_args(argv)
    if args.cmd == "export":
        save_safetensors(args.src, args.dst)
        print(f"wrote {args.dst}")
    else:
        ckpt = read_checkpoint(args.src)
        sd = extract_state_dict(ckpt)
        top = sorted(ckpt.keys()) if not all(isinstance(v, torch.Tensor) for v in ckpt.values()) else "bare state_dict"
        print(f"layout: {top}\ntensors: {len(sd)}, parameters+buffers: {sum(v.numel() for v in sd.values()):,}")
        print(f"fits variant: {match_variant(sd)}")


if __name__ == "__main__":
    main()
