"""Checkpoint I/O: safe reading, layout detection, strict loading with useful errors, safetensors.

Released QKFormer checkpoints are MAE-style dicts ``{'model', 'optimizer', 'epoch', 'scaler',
'args': argparse.Namespace}``; the CIFAR/DVS scripts wrote timm-style (``state_dict``) or
``model`` dicts. Our module names equal the original ones (the manifests in the tests prove it),
so no key conversion is needed beyond stripping wrapper prefixes (``module.`` from DDP,
``_orig_mod.`` from ``torch.compile``).

The STEP benchmark's QKFormer files (``.pth.tar`` dicts written by timm 0.5's
``CheckpointSaver``: ``epoch, arch, state_dict, optimizer, version, args, amp_scaler, metric``)
are read too: their MLP keys ``fc_conv1/fc_bn1/...`` become ``fc1_``/``mlp1_`` (ImageNet/CIFAR
family), the ImageNet stage-3 ``ssa`` becomes ``attn``, and the BrainCog neuron entries
(``*_lif.threshold``, ``*_lif.act_fun.alpha``) are checked against this package's LIF and
dropped; a file whose neurons differ is refused. STEP's SSA ``proj_lif`` runs per sample, so a
model loading such weights is switched to ``legacy_ssa=False`` (one log line says so).

Files are unpickled with ``weights_only=True``: only tensors, plain containers and the
allow-listed ``argparse.Namespace`` are rebuilt. A file that needs anything else (arbitrary code)
is refused, never executed.

This module is the generic layer: it knows no variant table. The variants a checkpoint may fit
are the ``qkformer_*`` models registered with timm (``qkformer.variants`` registers them and
builds on this module, never the other way round).

CLI::

    python -m qkformer.checkpoint export IN.pth OUT.safetensors
    python -m qkformer.checkpoint inspect SOURCE
    python -m qkformer.checkpoint export-hub SOURCE OUT_DIR [--model NAME] [--model-kwargs JSON]
    python -m qkformer.checkpoint convert SOURCE OUT [--model NAME] [--model-kwargs JSON]

A SOURCE is a checkpoint file or a Hub folder (``local-dir:FOLDER``, the folder's path, or
``hf-hub:ORG/NAME``); the model is the one the source describes unless ``--model`` says otherwise.

``convert`` writes any readable layout as this package's ``.pth`` (``{'model', 'args'}``), as
``.safetensors`` or, for an OUT without a suffix, as an ``export-hub`` folder.

``export-hub`` writes a Hugging Face Hub folder (``model.safetensors``, timm's ``config.json``,
``README.md``) that ``timm.create_model('local-dir:OUT_DIR', pretrained=True)`` loads, and that
can be uploaded as is (``hf upload ORG/NAME OUT_DIR``) for ``hf-hub:ORG/NAME``.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Collection, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["SAFE_GLOBALS", "UnsafeCheckpointError", "CheckpointMismatchError", "read_checkpoint",
           "extract_state_dict", "checkpoint_filter_fn", "load_checkpoint", "match_variant",
           "save_safetensors", "atomic_save", "export_hub", "convert", "is_step_checkpoint",
           "describe_fit", "saved_architecture", "read_source", "is_hub_source", "HUB_PREFIXES"]

_logger = logging.getLogger(__name__)

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
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path), device="cpu")
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"corrupt or truncated safetensors file {path}: {e}") from e
        return _PerSampleSSA(tensors) if meta.get("legacy_ssa") == "false" else tensors
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return _with_our_args(ckpt) if is_step_checkpoint(ckpt) else ckpt
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False: never pass that on, only the cause.
        lines = [ln.strip() for ln in str(e).splitlines()]
        unsafe = [ln for ln in lines if "GLOBAL" in ln]
        if unsafe:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: its pickle needs objects that are not plain tensors or "
                f"containers, so loading it could execute arbitrary code. Only "
                f"{[g.__module__ + '.' + g.__qualname__ for g in SAFE_GLOBALS]} are allowed. "
                f"Details: {unsafe[0].split(' by default')[0]}") from e
        cause = next((ln for ln in lines if ln and "weights_only" not in ln
                      and not ln.startswith(("Please file", "Check the documentation", "In PyTorch"))
                      and not ln.endswith("error:")), "unreadable pickle")
        raise ValueError(f"corrupt or truncated checkpoint file {path}: not a torch checkpoint "
                         f"({cause})") from e
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


def extract_state_dict(ckpt: Any, use_ema: Optional[bool] = False) -> StateDict:
    """The model weights inside any supported layout, with wrapper prefixes removed.

    ``use_ema``: True requires EMA weights, None takes them when present (timm's convention for
    pretrained weights), False ignores them.
    """
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint is a {type(ckpt).__name__}, not a dict")
    if isinstance(ckpt, _PerSampleSSA):  # already ours (a second pass, e.g. timm's filter)
        return ckpt
    outer = ckpt
    keys = (_EMA_KEYS if use_ema is not False else ()) + _STATE_DICT_KEYS
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
    state_dict = _strip_prefixes(ckpt)
    if _is_step_state_dict(state_dict):
        # read_checkpoint moved STEP's own args aside (see _with_our_args)
        return _from_step(state_dict, outer["step_args"] if "step_args" in outer else outer.get("args"))
    if outer.get("legacy_ssa") is False:  # written by `convert` from weights that need it
        return _PerSampleSSA(state_dict)
    return state_dict


# -- the STEP benchmark's layout ---------------------------------------------------------------
# This package's neuron: MultiStepLIF's defaults; the attention-mask neurons fire at 0.5 (the
# tests hold these equal to the models' neurons). STEP stores threshold and surrogate alpha per
# neuron; tau only in its args.
LIF_TAU, LIF_THRESHOLD, MASK_THRESHOLD, SURROGATE_ALPHA = 2.0, 1.0, 0.5, 4.0
_STEP_NEURON = re.compile(r"^(?P<module>.*_lif\d*)\.(?P<what>threshold|act_fun\.alpha)$")
_STEP_MLP = re.compile(r"\.mlp\.fc_(conv|bn)(\d)\.")
_STEP_SSA = re.compile(r"^(stage\d+\.\d+)\.ssa\.")
_STEP_CIFAR_HEADS = 8  # STEP's CIFAR model, like the original, ignores its num_heads


class _PerSampleSSA(dict):
    """A state_dict in our keys whose weights need the per-sample SSA ``proj_lif``
    (``legacy_ssa=False``): STEP's, or one that ``convert`` wrote for such a model. The mark is
    the class, so it survives the copies timm makes of a pretrained cfg; ``num_heads`` is the
    head count the weights were trained with, where the file tells it."""

    source = "these weights were saved for a model with legacy_ssa=False"
    num_heads: Optional[int] = None


@functools.lru_cache(maxsize=None)
def _step_marked(num_heads: Optional[int]) -> type:
    return type("_StepStateDict", (_PerSampleSSA,), dict(
        source="these are STEP weights, whose SSA proj_lif runs over T for each sample",
        num_heads=num_heads))


def _is_step_state_dict(state_dict: Mapping[str, Any]) -> bool:
    return any(_STEP_NEURON.match(k) or ".mlp.fc_conv1." in k for k in state_dict)


def is_step_checkpoint(ckpt: Any) -> bool:
    """Whether ``ckpt`` (a read checkpoint) holds STEP's QKFormer weights (BrainCog neuron
    entries, ``fc_conv1``-style MLP keys)."""
    if not isinstance(ckpt, Mapping):
        return False
    inner = ckpt.get("state_dict")
    return _is_step_state_dict(inner if isinstance(inner, Mapping) else ckpt)


def _step_keys(state_dict: Mapping[str, torch.Tensor]):
    """(our keys -> tensors, the neuron entries) of a STEP state_dict, and whether it is the
    ImageNet model."""
    imagenet = "patch_embed1.proj2_conv.weight" in state_dict
    prefix = "fc" if imagenet else "mlp"
    ours, neurons = {}, {}
    for k, v in state_dict.items():
        if _STEP_NEURON.match(k):
            neurons[k] = v
            continue
        k = _STEP_MLP.sub(lambda m: f".mlp.{prefix}{m[2]}_{m[1]}.", k)
        ours[_STEP_SSA.sub(r"\1.attn.", k) if imagenet else k] = v
    return ours, neurons, imagenet


def _from_step(state_dict: Mapping[str, torch.Tensor], args: Any) -> _PerSampleSSA:
    """STEP's keys -> ours, after checking its neurons against this package's LIF."""
    meta = vars(args) if isinstance(args, argparse.Namespace) else {}
    ours, neurons, imagenet = _step_keys(state_dict)
    problems = []
    if meta.get("node_type") not in (None, "LIFNode"):
        problems.append(f"args.node_type is {meta['node_type']!r} (expected 'LIFNode')")
    tau = meta.get("tau")
    if isinstance(tau, (int, float)) and not math.isclose(float(tau), LIF_TAU):
        problems.append(f"args.tau is {tau} (expected {LIF_TAU})")
    for k, v in neurons.items():
        m = _STEP_NEURON.match(k)
        want = (SURROGATE_ALPHA if m["what"] != "threshold" else
                MASK_THRESHOLD if m["module"].endswith("attn_lif") else LIF_THRESHOLD)
        if v.numel() != 1 or not math.isclose(float(v.reshape(-1)[0]), want):
            got = float(v.reshape(-1)[0]) if v.numel() == 1 else tuple(v.shape)
            problems.append(f"{k} is {got} (expected {want})")
    if problems:
        more = f"; ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointMismatchError(
            f"refusing these STEP weights: their neurons differ from this package's LIF (tau "
            f"{LIF_TAU}, threshold {LIF_THRESHOLD}, {MASK_THRESHOLD} for the attention-mask "
            f"neurons, sigmoid surrogate alpha {SURROGATE_ALPHA}), so the network would compute "
            f"something else: {'; '.join(problems[:5])}{more}")
    heads = meta.get("num_heads") if imagenet else _STEP_CIFAR_HEADS
    return _step_marked(heads if isinstance(heads, int) else None)(ours)


def _stage_depths(state_dict: Mapping[str, Any]) -> Tuple[int, ...]:
    blocks = {}
    for k in state_dict:
        m = re.match(r"stage(\d+)\.(\d+)\.", k)
        if m:
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    return tuple(len(blocks[i]) for i in sorted(blocks))


def _step_arch(ckpt: Mapping[str, Any]) -> Dict[str, Any]:
    """A STEP checkpoint's network in this package's vocabulary: a registered variant of its
    family and the architecture arguments that make it this network (what our scripts' model
    flags and saved args take)."""
    import timm

    step_args = ckpt.get("args")
    meta = vars(step_args) if isinstance(step_args, argparse.Namespace) else {}
    ours, _, imagenet = _step_keys(_strip_prefixes(ckpt["state_dict"]))
    depths = _stage_depths(ours)
    widths = tuple(int(ours[f"patch_embed{i}.proj_res_bn.weight"].shape[0])
                   for i in range(1, len(depths) + 1))
    prefix = "fc" if imagenet else "mlp"
    hidden = ours[f"stage1.0.mlp.{prefix}1_conv.weight"].shape[0]
    num_classes = int(ours["head.bias"].shape[0]) if "head.bias" in ours else 0
    heads = meta.get("num_heads") if imagenet else _STEP_CIFAR_HEADS
    family = "imagenet" if imagenet else "cifar"
    names = [n for n in timm.list_models("qkformer_*") if _variant_info(n)[0] == family]
    same = [n for n in names if _variant_info(n)[1] == num_classes]
    width = [n for n in same + names if _variant_info(n)[2] == widths]
    arch = dict(model=(width + same + names + [None])[0], embed_dims=list(widths),
                depths=list(depths), mlp_ratio=hidden / widths[0], num_classes=num_classes,
                legacy_ssa=False)
    if isinstance(heads, int):
        arch["num_heads"] = [heads]
    if isinstance(meta.get("step"), int):
        arch["T"] = meta["step"]
    if isinstance(meta.get("img_size"), int):
        arch["input_size"] = meta["img_size"]
    data = str(meta.get("dataset", "")).split("/")[-1].lower()
    if data:
        arch["dataset"] = "imagenet" if data.startswith("imagenet") else data
    return arch


def _with_our_args(ckpt: Mapping[str, Any]) -> Dict[str, Any]:
    """A STEP checkpoint whose ``args`` speak our vocabulary (scripts that rebuild the model
    from a checkpoint's args read them); STEP's own stay under ``step_args``."""
    out = dict(ckpt)
    if isinstance(ckpt.get("state_dict"), Mapping):
        try:
            out["args"] = argparse.Namespace(**_step_arch(ckpt))
        except (KeyError, IndexError):  # not the QKFormer network: the key mapping reports it
            out.pop("args", None)
        out["step_args"] = ckpt.get("args")
    return out


def _use_per_sample_ssa(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Switch ``model`` to the per-sample SSA when ``state_dict`` needs it (one log line)."""
    if not isinstance(state_dict, _PerSampleSSA):
        return
    legacy = [m for m in model.modules() if getattr(m, "legacy_proj_lif", False)]
    for m in legacy:
        m.legacy_proj_lif = False
    if legacy:
        _logger.warning("switching the model to legacy_ssa=False (per-sample SSA proj_lif): %s",
                        state_dict.source)


def _check_heads(model: nn.Module, state_dict: Mapping[str, Any], what: str, name: str) -> None:
    heads = getattr(state_dict, "num_heads", None)
    found = sorted({m.num_heads for m in model.modules()
                    if hasattr(m, "num_heads") and hasattr(m, "token_major")})
    if heads is not None and found and found != [heads]:
        raise CheckpointMismatchError(
            f"{what} were trained with {heads} attention heads in every stage, but {name} has "
            f"{found}: build it with num_heads={heads}")


def _unwrap(model: nn.Module) -> nn.Module:
    target = model.module if hasattr(model, "module") else model
    return getattr(target, "_orig_mod", target)


def _adapted_by_timm(model: nn.Module) -> set:
    """Keys timm's ``load_pretrained`` replaces after the filter: the classifier when the model
    asks for another class count (it is dropped), the stem conv when it asks for other input
    channels (it is adapted). They may differ from the model without being a mismatch."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    keys = set()

    def names(entry):
        return (entry,) if isinstance(entry, str) else tuple(entry or ())

    source_classes = cfg.get("num_classes")
    if source_classes is not None and getattr(model, "num_classes", None) != source_classes:
        keys |= {f"{c}.{p}" for c in names(cfg.get("classifier")) for p in ("weight", "bias")}
    source_chans = (cfg.get("input_size") or (None,))[0]
    if source_chans is not None and getattr(model, "in_chans", source_chans) != source_chans:
        keys |= {f"{c}.weight" for c in names(cfg.get("first_conv"))}
    return keys


def _fit(model_sd: Mapping[str, torch.Tensor], state_dict: StateDict, strict: bool, what: str,
         model_name: str, exempt: Collection[str] = ()) -> StateDict:
    """Raise :class:`CheckpointMismatchError` (strict) or drop mis-shaped entries (not strict)."""
    report = _mismatch_report({k: v for k, v in model_sd.items() if k not in exempt},
                              {k: v for k, v in state_dict.items() if k not in exempt})
    if report and strict:
        fits = describe_fit(state_dict)
        hint = (f"\n  the checkpoint fits the variant {fits}" if fits else
                "\n  the checkpoint matches none of the released variants")
        raise CheckpointMismatchError(f"{what} does not fit {model_name}:{report}{hint}")
    if not strict:  # drop mis-shaped entries (e.g. a head of another size when fine-tuning)
        state_dict = {k: v for k, v in state_dict.items()
                      if k in exempt or k not in model_sd or v.shape == model_sd[k].shape}
    return state_dict


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: Optional[nn.Module] = None,
                         strict: bool = True) -> StateDict:
    """timm's ``pretrained_filter_fn``: any supported layout -> this package's keys (identical to
    the original's), checked against ``model``.

    With ``strict`` every missing, unexpected or mis-shaped key raises
    :class:`CheckpointMismatchError`, naming the released variant the weights do fit; keys that
    timm adapts afterwards (a new head size, other input channels) are left to timm.
    """
    state_dict = extract_state_dict(state_dict, use_ema=None)
    if model is None:
        return state_dict
    target = _unwrap(model)
    cfg = getattr(target, "pretrained_cfg", None) or {}
    source = cfg.get("file") or cfg.get("hf_hub_id") or cfg.get("url")
    what = f"pretrained weights {source}" if source else "pretrained weights"
    name = cfg.get("architecture") or type(target).__name__
    fitted = _fit(target.state_dict(), state_dict, strict, what, name, _adapted_by_timm(target))
    _check_heads(target, state_dict, what, name)
    _use_per_sample_ssa(target, state_dict)
    return fitted


def _shapes(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@functools.lru_cache(maxsize=None)
def _variant_shapes(name: str, depths: Optional[Tuple[int, ...]] = None) -> Dict[str, Tuple[int, ...]]:
    import timm

    with torch.device("meta"):
        kwargs = {} if depths is None else dict(depths=depths)
        return _shapes(timm.create_model(name, **kwargs).state_dict())


@functools.lru_cache(maxsize=None)
def _variant_info(name: str) -> Tuple[str, int, Tuple[int, ...], Tuple[int, ...]]:
    """(family, num_classes, embed_dims, attention heads) of a registered variant."""
    import timm

    with torch.device("meta"):
        m = timm.create_model(name)
    heads = tuple(sorted({a.num_heads for a in m.modules()
                          if hasattr(a, "num_heads") and hasattr(a, "token_major")}))
    return m.layout.name, m.num_classes, tuple(m.embed_dims), heads


def describe_fit(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """:func:`match_variant`, else a variant built with other per-stage depths that fits (e.g.
    STEP's ImageNet model: ``qkformer_10_384 built with depths=(1, 1, 7)``), with the head
    count when the weights tell it."""
    import timm

    fits = match_variant(state_dict)
    depths = _stage_depths(state_dict)
    if fits is None and depths:
        for name in timm.list_models("qkformer_*"):
            try:
                ref = _variant_shapes(name, depths)
            except ValueError:  # depths of another stage count
                continue
            if ref.keys() == state_dict.keys() and all(
                    ref[k] == tuple(state_dict[k].shape) for k in ref if not k.startswith("head.")):
                classes = ("head.bias" in state_dict and ref.get("head.bias") != tuple(
                    state_dict["head.bias"].shape))
                fits = f"{name} built with depths={depths}" + (
                    f", num_classes={state_dict['head.bias'].shape[0]}" if classes else "")
                break
    heads = getattr(state_dict, "num_heads", None)
    if fits is not None and heads is not None and _variant_info(fits.split(" ")[0])[3] != (heads,):
        fits += f"{',' if ' built with ' in fits else ' built with'} num_heads={heads}"
    return fits


def match_variant(state_dict: Mapping[str, torch.Tensor],
                  candidates: Optional[Sequence[str]] = None) -> Optional[str]:
    """Name of the variant whose keys and shapes this state_dict fits, if any.

    ``candidates`` default to the ``qkformer_*`` models registered with timm. A head of another
    size still matches, reported as ``name (num_classes=K)``.
    """
    import timm

    shapes = _shapes(state_dict)
    head_only = None
    for name in timm.list_models("qkformer_*") if candidates is None else candidates:
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
    target = _unwrap(model)
    where = "checkpoint" if isinstance(source, Mapping) else f"checkpoint {source}"
    fitted = _fit(target.state_dict(), state_dict, strict, where, type(target).__name__)
    _check_heads(target, state_dict, where, type(target).__name__)
    target.load_state_dict(fitted, strict=strict)
    _use_per_sample_ssa(target, state_dict)
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


def _without_t(description: str) -> str:
    """A registry description without its size and T (those of the variant's recipe)."""
    return ", ".join(p for p in description.split(", ")
                     if not p.startswith("T=") and " x " not in p)


def _model_card(model: nn.Module, name: str, src: Path) -> Dict[str, Any]:
    """What timm's ``generate_readme`` needs for a short Hub model card."""
    cfg = model.pretrained_cfg
    if describe_fit(model.state_dict()) is not None:
        what = _without_t(cfg.get("description") or name)
    else:  # the registry's description would name the variant's widths, not these
        what = f"{name} (a custom architecture: config.json has its arguments)"
    card = dict(
        tags=["image-classification", "timm", "spiking-neural-network"],
        license="other",  # the weights' terms are the authors'; nothing here relicenses them
        description=(f"QKFormer {what}, T={model.T}, "
                     f"{model.img_size} x {model.img_size} input, converted from "
                     f"`{src.name}` by `python -m qkformer.checkpoint export-hub`. The weights' "
                     f"terms are those of their authors' release."),
        details={
            "Model Type": "Image classification (spiking transformer)",
            "Model Stats": {
                "Params (M)": f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}",
                "Image size": f"{model.img_size} x {model.img_size}",
                "Time steps (T)": model.T,
            },
        },
        usage=("```python\nimport timm\nimport qkformer  # registers the architecture with timm\n\n"
               f"model = timm.create_model('hf-hub:ORG/{name}', pretrained=True).eval()\n```\n"),
    )
    if cfg.get("paper_name"):
        card["details"]["Papers"] = {cfg["paper_name"]: cfg.get("origin_url", "")}
    return card


def export_hub(src: PathLike, out_dir: PathLike, model_name: str,
               model_kwargs: Optional[Mapping[str, Any]] = None) -> Path:
    """Write a Hugging Face Hub folder for a checkpoint: ``model.safetensors``, timm's
    ``config.json`` (architecture, ``num_classes``, every constructor argument, the pretrained
    cfg) and a ``README.md`` card.

    The checkpoint goes through ``timm.create_model(model_name, pretrained=True, ...)`` first,
    so a file that does not fit ``model_name`` fails with the mismatch report.
    """
    import timm
    from timm.models import save_for_hf
    from timm.models._hub import generate_readme

    model_name, model_kwargs = _model_of(src, model_name, model_kwargs)
    arch = model_name.split(".")[0]
    known = timm.list_models("qkformer_*")
    if arch not in known:
        raise ValueError(f"export-hub writes QKFormer models; {model_name!r} is none of {known}")
    out_dir = Path(out_dir)
    kwargs = dict(model_kwargs or {})
    overlay = _weights_of(src, kwargs.pop("pretrained_cfg_overlay", None))
    src = Path(_source_name(src))
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    args = getattr(model, "arch_args", None)
    if args is not None and "legacy_ssa" in args:
        # loading may have switched the SSA (weights that need the per-sample one)
        args["legacy_ssa"] = _runs_legacy_ssa(model, args["legacy_ssa"])
    if args is not None:
        # timm also recorded the raw kwargs (maybe in the original's vocabulary); the config
        # gets the normalised arguments alone
        model._model_args = dict(args)
    size = model.img_size
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        # the notes of a registry cfg describe where its weights may come from; these came from src
        notes = (f"weights: converted from {src.name} by `python -m qkformer.checkpoint "
                 f"export-hub`",)
        save_for_hf(model, tmp, safe_serialization=True,
                    model_config=dict(pretrained_cfg=dict(notes=notes)),
                    data_config=dict(input_size=(model.in_chans, size, size)))
        tag = model.pretrained_cfg.get("tag")
        name = arch + (f".{tag}" if tag and tag != "untrained" else "")
        (tmp / "README.md").write_text(generate_readme(_model_card(model, name, src), name),
                                       encoding="utf-8")
        _refuse_foreign_files(out_dir, [f.name for f in tmp.iterdir()])
        out_dir.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _model_of(src: PathLike, model_name: Optional[str],
              model_kwargs: Optional[Mapping[str, Any]]) -> Tuple[str, Dict[str, Any]]:
    """The model to write ``src`` for: the one it was trained as (:func:`saved_architecture`),
    changed by ``model_name`` / ``model_kwargs`` where given."""
    source = read_source(src)
    name, saved = saved_architecture(source)
    kwargs = dict(model_kwargs or {})
    if model_name is None:
        if name is None:
            fit = describe_fit(extract_state_dict(source))
            raise ValueError(f"{_source_name(src)} does not say which model it holds: pass "
                             f"--model" + (f" (its weights fit {fit})" if fit else ""))
        model_name = name
    if name is not None and model_name.split(".")[0] == name:
        if not _is_folder(src):
            saved.pop("num_classes", None)  # timm takes the class count from the file's head
        kwargs = {**saved, **kwargs}
    return model_name, kwargs


def _is_folder(src: PathLike) -> bool:
    return is_hub_source(os.fspath(src)) or Path(src).is_dir()


def _source_name(src: PathLike) -> str:
    """What the model card and notes call the source: a file's or folder's name, a Hub id."""
    text = os.fspath(src)
    return text if text.startswith("hf-hub:") else Path(text.split(":", 1)[-1]
                                                          if is_hub_source(text) else text).name


def _weights_of(src: PathLike, overlay: Optional[Mapping[str, Any]],
                source: Any = None) -> Dict[str, Any]:
    """The pretrained-cfg overlay that hands ``src``'s weights to timm: a file by name (read by
    our reader inside the model's factory), a Hub folder's weights in memory with their class
    count."""
    overlay = dict(overlay or {})
    if not _is_folder(src):
        return {**overlay, "file": os.fspath(src)}
    state_dict = extract_state_dict(read_source(src) if source is None else source, use_ema=None)
    head = state_dict.get("head.bias")
    return {**overlay, "state_dict": state_dict,
            **({"num_classes": int(head.shape[0])} if head is not None else {})}


_EXPORT_MARK = "python -m qkformer.checkpoint export-hub"


def _refuse_foreign_files(out_dir: Path, names: Sequence[str]) -> None:
    """An export replaces only an earlier export's files: a folder holding files of any other
    kind is refused, so nothing a user put there is lost."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a folder for the export")
    present = sorted(p.name for p in out_dir.iterdir())
    ours = (out_dir / "README.md").is_file() and _EXPORT_MARK in (
        out_dir / "README.md").read_text(encoding="utf-8", errors="replace")
    foreign = [n for n in present if not (ours and n in names)]
    if foreign:
        raise ValueError(f"{out_dir} already holds files this export did not write "
                         f"({', '.join(foreign[:5])}); give an empty or new folder")


def _runs_legacy_ssa(model: nn.Module, default: bool = True) -> bool:
    flags = {m.legacy_proj_lif for m in model.modules() if hasattr(m, "legacy_proj_lif")}
    return flags.pop() if len(flags) == 1 else default


def convert(src: PathLike, dst: PathLike, model_name: str,
            model_kwargs: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the checkpoint ``src`` (any layout :func:`read_checkpoint` reads) for
    ``model_name``: ``.safetensors``, a Hub folder (``dst`` without a suffix, see
    :func:`export_hub`), or else this package's ``.pth`` (``{'model', 'args'}``, args in our
    vocabulary), which plain timm loads with ``pretrained_cfg_overlay=dict(file=...)``.

    The weights go through ``timm.create_model(model_name, pretrained=True, ...)`` first, so a
    file that does not fit fails with the mismatch report. Weights that need the per-sample SSA
    stay marked as such (``legacy_ssa`` in the file), so loading the result switches it again.
    """
    import timm

    dst = Path(dst)
    if not dst.suffix or dst.is_dir():
        return export_hub(src, dst, model_name, model_kwargs)
    model_name, model_kwargs = _model_of(src, model_name, model_kwargs)
    arch = model_name.split(".")[0]
    known = timm.list_models("qkformer_*")
    if arch not in known:
        raise ValueError(f"convert writes QKFormer models; {model_name!r} is none of {known}")
    source = read_source(src)
    kwargs = dict(model_kwargs or {})
    overlay = _weights_of(src, kwargs.pop("pretrained_cfg_overlay", None), source)
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    arch_args = dict(getattr(model, "arch_args", {}))
    has_ssa = any(hasattr(m, "legacy_proj_lif") for m in model.modules())
    per_sample = has_ssa and not _runs_legacy_ssa(model)
    if dst.suffix == ".safetensors":
        save_safetensors(state_dict, dst, {"legacy_ssa": "false"} if per_sample else None)
        return dst
    if "legacy_ssa" in arch_args:
        arch_args["legacy_ssa"] = not per_sample
    saved = source.get("args") if isinstance(source, Mapping) else None
    extra = {k: v for k, v in vars(saved).items() if k == "dataset"} if isinstance(
        saved, argparse.Namespace) else {}
    args = argparse.Namespace(model=arch, **{k: v for k, v in arch_args.items() if k != "img_size"},
                              input_size=model.img_size, **extra)
    atomic_save({"model": state_dict, "args": args,
                 **({"legacy_ssa": False} if per_sample else {})}, dst)
    return dst


_SOURCE_HELP = ("a checkpoint (.pth/.pth.tar/.safetensors), or a Hub folder: local-dir:FOLDER (or "
                "the folder's path), hf-hub:ORG/NAME")


def _add_model_args(parser: argparse.ArgumentParser, name: str, kwargs: str) -> None:
    parser.add_argument("--model", default=None, help=f"timm name, e.g. {name} (default: the "
                        f"model the checkpoint was trained as)")
    parser.add_argument("--model-kwargs", dest="model_kwargs", default="{}", type=_json_object,
                        help=f"architecture overrides as JSON, e.g. '{kwargs}'")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qkformer.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    exp = sub.add_parser("export", help="write the weights of a checkpoint as .safetensors")
    exp.add_argument("src")
    exp.add_argument("dst")
    ins = sub.add_parser("inspect", help="print the layout and the variant a checkpoint fits")
    ins.add_argument("src", help=_SOURCE_HELP)
    hub = sub.add_parser("export-hub", help="write a Hugging Face Hub folder (safetensors, timm "
                                            "config.json, README.md) for local-dir:/hf-hub:")
    hub.add_argument("src", help=_SOURCE_HELP)
    hub.add_argument("out_dir")
    _add_model_args(hub, "qkformer_10_768.in1k_384", '{"T": 2, "embed_dims": 64}')
    cnv = sub.add_parser("convert", help="write any readable layout (the authors', STEP's, ours) "
                                          "as our .pth, .safetensors, or a Hub folder (OUT "
                                          "without a suffix)")
    cnv.add_argument("src", help=_SOURCE_HELP)
    cnv.add_argument("dst")
    _add_model_args(cnv, "qkformer_cifar10", '{"depths": [1, 1, 7]}')
    args = parser.parse_args(argv)
    if args.cmd == "convert":
        out = convert(args.src, args.dst, args.model, args.model_kwargs)
        print(f"wrote {out}")
    elif args.cmd == "export":
        save_safetensors(args.src, args.dst)
        print(f"wrote {args.dst}")
    elif args.cmd == "export-hub":
        out = export_hub(args.src, args.out_dir, args.model, args.model_kwargs)
        print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}\n"
              f"load it with timm.create_model('local-dir:{out}', pretrained=True) after "
              f"`import qkformer`, or upload the folder and use 'hf-hub:ORG/NAME'")
    else:
        ckpt = read_source(args.src)
        top = sorted(ckpt.keys()) if not all(isinstance(v, torch.Tensor) for v in ckpt.values()) else "bare state_dict"
        if is_step_checkpoint(ckpt):
            step = ckpt.get("step_args")
            step = vars(step) if isinstance(step, argparse.Namespace) else {}
            print(f"layout: STEP benchmark checkpoint (timm 0.5 CheckpointSaver {top}); STEP "
                  f"model {step.get('model', '?')!r}, T={step.get('step', '?')}, epoch "
                  f"{ckpt.get('epoch', '?')}; loads with legacy_ssa=False")
        elif isinstance(ckpt, Mapping) and "source" in ckpt:
            print(f"layout: Hub folder {ckpt['source']} (timm config.json and weights)")
        else:
            print(f"layout: {top}")
        sd = extract_state_dict(ckpt)  # a STEP file whose neurons differ is refused here
        params = sum(v.numel() for k, v in sd.items() if not k.endswith(_BUFFERS))
        print(f"tensors: {len(sd)}, parameters: {params:,}, "
              f"parameters+buffers: {sum(v.numel() for v in sd.values()):,}")
        name, kwargs = saved_architecture(ckpt)
        if name is not None:
            print(f"model: {name} " + " ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items())))
        fit = describe_fit(sd)
        print(f"fits variant: {fit}" + ("" if fit else " (a custom architecture" + (
            "; the model line above builds it)" if name else ")")))
        stored = {k: ckpt[k] for k in ("epoch", "step", "best_acc1", "acc1", "metric")
                  if isinstance(ckpt, Mapping) and isinstance(ckpt.get(k), (int, float))}
        if stored:
            print("stored: " + ", ".join(f"{k} {v}" for k, v in stored.items()))


# -- Hub folders as sources ----------------------------------------------------------------------
HUB_PREFIXES = ("local-dir:", "hf-hub:")
_HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def is_hub_source(source: Any) -> bool:
    """Whether ``source`` names a Hub folder (``local-dir:DIR``, ``hf-hub:ORG/NAME[@REV]``) rather
    than a checkpoint file."""
    return isinstance(source, str) and source.startswith(HUB_PREFIXES)


def read_source(source: PathLike) -> Any:
    """A checkpoint file (:func:`read_checkpoint`), or a Hub folder as :func:`export_hub` writes
    it: ``local-dir:DIR``, ``hf-hub:ORG/NAME[@REV]`` (through ``huggingface_hub``'s cache and
    download) or the path of such a folder. A folder is returned in this package's checkpoint
    layout, ``{'model': weights, 'args': its config.json's model}``, so that
    :func:`saved_architecture` describes it as it describes a trained checkpoint."""
    text = os.fspath(source)
    if text.startswith("hf-hub:"):
        return _read_hub_folder(_download_hub(text[len("hf-hub:"):]), text)
    if text.startswith("local-dir:"):
        folder = Path(text[len("local-dir:"):])
        if not folder.is_dir():
            raise FileNotFoundError(f"{text}: no such folder")
        return _read_hub_folder(folder, text)
    if Path(text).is_dir():
        if not (Path(text) / "config.json").is_file():
            raise ValueError(f"{text} is a folder without config.json: give a checkpoint file "
                             f"(e.g. {Path(text) / 'checkpoint-best.pth'}) or a folder written "
                             f"by export-hub")
        return _read_hub_folder(Path(text), f"local-dir:{text}")
    return read_checkpoint(text)


def _download_hub(repo: str) -> Path:
    """The folder of ``repo`` in huggingface_hub's cache (downloaded when not cached): config.json
    and the first weights file that exists."""
    from huggingface_hub import constants, hf_hub_download

    repo_id, _, revision = repo.partition("@")

    def fetch(local: bool) -> Path:
        config = Path(hf_hub_download(repo_id, "config.json", revision=revision or None,
                                      local_files_only=local))
        for name in _HUB_WEIGHTS:
            try:
                hf_hub_download(repo_id, name, revision=revision or None, local_files_only=local)
                break
            except Exception as e:  # noqa: BLE001 (try the next name; the last error is raised)
                if "EntryNotFound" not in type(e).__name__ or name == _HUB_WEIGHTS[-1]:
                    raise
        return config.parent

    try:
        return fetch(local=True)
    except Exception:  # noqa: BLE001 (not cached: download below)
        pass
    try:
        if not constants.HF_HUB_OFFLINE:
            _check_reachable(constants.ENDPOINT)
        return fetch(local=False)
    except Exception as e:  # noqa: BLE001 (network, offline mode, unknown repo: one line)
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"cannot fetch hf-hub:{repo} ({type(e).__name__}: {first}); without a "
                         f"network, the folder export-hub wrote loads as local-dir:FOLDER") from e


def _check_reachable(endpoint: str) -> None:
    """Fail at once when the Hub's host name does not resolve (no network): huggingface_hub
    would retry for about half a minute. Behind a proxy the proxy resolves it."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    host = urlparse(endpoint).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise ConnectionError(f"{host} cannot be reached ({e})") from e


def _read_hub_folder(folder: Path, label: str) -> Dict[str, Any]:
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        arch, model_args = config["architecture"], dict(config.get("model_args") or {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{label}: no readable timm config.json with an architecture "
                         f"({type(e).__name__}: {e})") from e
    weights = next((folder / n for n in _HUB_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{label}: no weights ({' or '.join(_HUB_WEIGHTS)})")
    state_dict = extract_state_dict(read_checkpoint(weights))
    size = model_args.pop("img_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    args = argparse.Namespace(model=arch, **model_args, **({"input_size": size} if size else {}))
    out = {"model": dict(state_dict), "args": args, "source": label}
    if isinstance(state_dict, _PerSampleSSA) or model_args.get("legacy_ssa") is False:
        out["legacy_ssa"] = False  # extract_state_dict marks the weights again
    return out


# the training arguments that shape the network, besides model, T, input size and SSA form
_ARCHITECTURE_KEYS = ("embed_dims", "depths", "num_heads", "mlp_ratio", "attn_types",
                      "in_chans")


def saved_architecture(ckpt: Any) -> Tuple[Optional[str], Dict[str, Any]]:
    """``(timm name, timm.create_model keyword arguments)`` of the network a checkpoint was
    trained as, from the arguments this package's training (and :func:`convert`) stores in it (``T``, input size,
    widths, depths, heads, attention types, SSA form; the class count from the head). ``(None,
    {})`` for a file that records none (a released or foreign checkpoint)."""
    saved = ckpt.get("args") if isinstance(ckpt, dict) else None
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved or {})
    name = saved.get("model")
    if not isinstance(name, str) or not name.lower().startswith("qkformer_"):
        return None, {}
    kwargs: Dict[str, Any] = {}
    if saved.get("T") or saved.get("time_step"):
        kwargs["T"] = int(saved.get("T") or saved.get("time_step"))
    if saved.get("input_size"):
        kwargs["img_size"] = int(saved["input_size"])
    if saved.get("legacy_ssa") is not None:
        kwargs["legacy_ssa"] = bool(saved["legacy_ssa"])
    for k in _ARCHITECTURE_KEYS:
        v = saved.get(k)
        if v is not None:
            kwargs[k] = (tuple(v) if len(v) > 1 else v[0]) if isinstance(v, (list, tuple)) else v
    try:
        head = extract_state_dict(ckpt).get("head.bias")
    except ValueError:
        head = None
    if head is not None:
        kwargs["num_classes"] = int(head.shape[0])
    return name.lower(), kwargs


_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _json_object(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


if __name__ == "__main__":
    # Every error one line, as the other command lines (this generic layer does not import
    # their driver code): a wrong file, model or --model-kwargs key is the user's to fix.
    from qkformer.cli_warnings import one_line_warnings

    one_line_warnings()
    try:
        main()
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if os.environ.get("QKFORMER_TRACEBACK"):
            raise
        kind = "" if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: "
        sys.exit("error: " + " ".join(f"{kind}{e}".split()))
