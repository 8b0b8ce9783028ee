"""Hugging Face Hub folders: export-hub, timm's local-dir: and hf-hub: loading (offline), and the
module layering (checkpoint.py, the generic layer, never imports variants.py)."""
import argparse
import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from qkformer.checkpoint import CheckpointMismatchError, UnsafeCheckpointError, main
from qkformer.variants import CIFAR_MEAN, CIFAR_STD

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(embed_dims=64, depths=(1, 1, 2), num_classes=5, T=2, img_size=16, legacy_ssa=False)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def released(tmp_path):
    """A small CIFAR-family model saved in the authors' MAE layout, and its state_dict."""
    src = timm.create_model("qkformer_cifar10", **SMALL)
    for p in src.parameters():
        p.data.normal_()
    for m in src.modules():  # BN statistics must travel too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    path = tmp_path / "checkpoint-9.pth"
    torch.save({"model": src.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "epoch": 9, "scaler": {"scale": 1024.0}, "args": argparse.Namespace(model="x")}, path)
    return path, src.state_dict()


def _export(src, out, model="qkformer_cifar10", **kwargs):
    main(["export-hub", str(src), str(out), "--model", model,
          "--model-kwargs", json.dumps({**SMALL, **kwargs})])


def _assert_identical(model, state_dict):
    assert list(model.state_dict()) == list(state_dict)
    for k, v in model.state_dict().items():
        assert v.dtype == state_dict[k].dtype and torch.equal(v, state_dict[k]), k


def _hub_cache(folder, cache, repo_id):
    """A huggingface_hub cache holding ``folder`` as the main revision of ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_export_hub_folder(tmp_path, released):
    src, sd = released
    out = tmp_path / "hub" / "qkformer-small"
    _export(src, out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert [p.name for p in out.parent.iterdir()] == ["qkformer-small"]  # no temp folder left
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "qkformer_cifar10" and cfg["num_classes"] == 5
    args = cfg["model_args"]
    assert args["T"] == 2 and args["legacy_ssa"] is False and args["depths"] == [1, 1, 2]
    assert args["embed_dims"] == [64 // 4, 64 // 2, 64] and args["num_classes"] == 5
    pre = cfg["pretrained_cfg"]
    assert pre["input_size"] == [3, 16, 16] and pre["crop_pct"] == 1.0
    assert pre["mean"] == list(CIFAR_MEAN) and pre["std"] == list(CIFAR_STD)
    assert not {"file", "url", "hf_hub_id", "source", "state_dict"} & pre.keys()
    assert src.name in " ".join(pre["notes"])
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(sd)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: timm" in card and "import qkformer" in card


def test_export_hub_round_trip_local_dir(tmp_path, released):
    src, sd = released
    _export(src, tmp_path / "out")
    model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    _assert_identical(model, sd)
    assert model.T == 2 and model.img_size == 16 and model.pretrained_cfg["source"] == "local-dir"
    assert not any(m.legacy_proj_lif for m in model.modules() if hasattr(m, "legacy_proj_lif"))
    # and the export of the export is the same folder
    again = tmp_path / "again"
    main(["export-hub", str(tmp_path / "out" / "model.safetensors"), str(again), "--model",
          "qkformer_cifar10", "--model-kwargs", json.dumps(SMALL)])
    _assert_identical(timm.create_model(f"local-dir:{again}", pretrained=True), sd)


def test_export_hub_round_trip_hf_hub(tmp_path, released, offline):
    src, sd = released
    _export(src, tmp_path / "out")
    cache = _hub_cache(tmp_path / "out", tmp_path / "cache", "someorg/qkformer-small")
    model = timm.create_model("hf-hub:someorg/qkformer-small", pretrained=True, cache_dir=cache)
    _assert_identical(model, sd)
    assert model.pretrained_cfg["hf_hub_id"] == "someorg/qkformer-small"
    # a registered name pointed at the same repo goes through timm's hf_hub_id source
    named = timm.create_model("qkformer_cifar10", pretrained=True, cache_dir=cache, **SMALL,
                              pretrained_cfg_overlay=dict(hf_hub_id="someorg/qkformer-small",
                                                          num_classes=5))
    _assert_identical(named, sd)


def test_export_hub_original_vocabulary_and_tags(tmp_path):
    """A config in the original's vocabulary is written back in ours, and a tag's cfg is kept."""
    with torch.device("meta"):
        ref = timm.create_model("qkformer_cifar10_dvs")
    sd = {k: torch.rand(v.shape).to(v.dtype) for k, v in ref.state_dict().items()}
    torch.save({"model": sd}, tmp_path / "dvs.pth")
    main(["export-hub", str(tmp_path / "dvs.pth"), str(tmp_path / "out"), "--model",
          "qkformer_cifar10_dvs", "--model-kwargs",
          json.dumps(dict(embed_dims=256, mlp_ratios=1, in_channels=2, depths=4, patch_size=16))])
    args = json.loads((tmp_path / "out" / "config.json").read_text())["model_args"]
    assert not {"mlp_ratios", "in_channels", "patch_size"} & args.keys()
    assert args["embed_dims"] == [128, 256] and args["depths"] == [1, 1] and args["mlp_ratio"] == 1.0
    _assert_identical(timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True), sd)


def test_export_hub_wrong_model_names_the_fitting_variant(tmp_path):
    with torch.device("meta"):
        ref = timm.create_model("qkformer_cifar10_dvs")
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in ref.state_dict().items()}
    torch.save({"model": sd, "args": argparse.Namespace()}, tmp_path / "dvs.pth")
    with pytest.raises(CheckpointMismatchError, match="fits the variant qkformer_cifar10_dvs"):
        main(["export-hub", str(tmp_path / "dvs.pth"), str(tmp_path / "out"),
              "--model", "qkformer_dvs128_gesture"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="is none of"):
        main(["export-hub", str(tmp_path / "dvs.pth"), str(tmp_path / "out"), "--model", "resnet18"])
    # the module entry point: a one-line error and exit status 1, no traceback, no runpy warning
    r = subprocess.run([sys.executable, "-m", "qkformer.checkpoint", "export-hub",
                        str(tmp_path / "dvs.pth"), str(tmp_path / "out"), "--model",
                        "qkformer_dvs128_gesture"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: ") and "fits the variant qkformer_cifar10_dvs" in r.stderr
    assert "Traceback" not in r.stderr and "RuntimeWarning" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["local-dir", "hf-hub"])
def test_hub_pickles_are_refused_not_executed(tmp_path, released, offline, source):
    """A folder whose weights are a pickle is read by timm (weights_only=True, argparse.Namespace
    allow-listed); one that needs anything else is refused with our error type."""
    src, _ = released
    _export(src, tmp_path / "out")
    (tmp_path / "out" / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "payload": _Exploit(marker)}, tmp_path / "out" / "pytorch_model.bin")
    if source == "local-dir":
        name, kw = f"local-dir:{tmp_path / 'out'}", {}
    else:
        name = "hf-hub:someorg/evil"
        kw = dict(cache_dir=_hub_cache(tmp_path / "out", tmp_path / "cache", "someorg/evil"))
    with pytest.raises(UnsafeCheckpointError, match="arbitrary code"):
        timm.create_model(name, pretrained=True, **kw)
    assert not marker.exists()


def _imported_modules(path: Path, package: str):
    """Absolute names of everything ``path`` imports, at any depth (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def test_checkpoint_does_not_import_variants():
    ckpt = _imported_modules(REPO / "qkformer" / "checkpoint.py", "qkformer")
    assert "qkformer.variants" not in ckpt, "checkpoint.py is the generic layer"
    # the oracle sees lazy relative imports: variants.py's own use of checkpoint.py is found
    assert "qkformer.checkpoint" in _imported_modules(REPO / "qkformer" / "variants.py", "qkformer")


# --------------------------------------------------- every tool reads a Hub folder like a checkpoint
@pytest.fixture
def trained(tmp_path):
    """A checkpoint as training writes it (weights and the arguments of a custom architecture,
    no --model needed anywhere), fired up so that its accuracy is not trivially 10 %, and a
    digits ImageFolder to evaluate it on."""
    from qkformer.data.synthetic_images import write_digits_image_folder

    from conftest import fire_bn

    torch.manual_seed(0)
    model = timm.create_model("qkformer_cifar10", embed_dims=32, depths=(1, 1, 1), num_heads=2,
                              T=2, img_size=16, num_classes=10)
    fire_bn(model)
    args = argparse.Namespace(model="qkformer_cifar10", T=2, input_size=16, embed_dims=[32],
                              depths=[1, 1, 1], num_heads=[2], mlp_ratio=None, attn_types=None,
                              legacy_ssa=True, dataset="cifar10")
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(), "args": args, "epoch": 11}, path)
    return path, write_digits_image_folder(tmp_path / "digits", size=16)


def test_every_tool_takes_the_checkpoint_or_its_hub_folder(tmp_path, trained, capsys, monkeypatch):
    """The chain of the README: evaluate, inspect, export-hub, evaluate and analyse the export
    (as a folder path, local-dir: and hf-hub:), with no architecture flag anywhere: the same
    network, so the same predictions."""
    import huggingface_hub.constants

    from qkformer import evaluate
    from qkformer.analysis import _common, firing

    path, data = trained
    run = ["--data-dir", str(data), "--batch-size", "64", "--workers", "0", "--no-progress",
           "--no-amp", "--max-iters", "2"]
    first = evaluate.main(["--checkpoint", str(path), *run])
    out = tmp_path / "hub"
    main(["export-hub", str(path), str(out)])
    cache = _hub_cache(out, tmp_path / "cache", "someorg/tiny")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for source in (str(out), f"local-dir:{out}", "hf-hub:someorg/tiny"):
        again = evaluate.main(["--checkpoint", source, *run])
        assert (again["acc1"], again["loss"]) == (first["acc1"], first["loss"]), source
        printed = capsys.readouterr().out
        assert "model qkformer_cifar10 (T=2, input 16, cifar preprocessing, legacy SSA)" in printed
        main(["inspect", source])
        printed = capsys.readouterr().out
        assert "layout: Hub folder" in printed and "model: qkformer_cifar10 T=2" in printed
        assert "img_size=16" in printed and "num_classes=10" in printed
    # a flag that contradicts the folder changes the model, and says so in one line
    evaluate.main(["--checkpoint", str(out), "--T", "1", *run])
    assert capsys.readouterr().err.splitlines() == [
        "warning: --T 1 but the checkpoint was trained with T=2"]
    # the analysis tools: the same weights whichever way the folder is named
    reference = _common.build_model(None, str(path)).state_dict()
    for model, checkpoint in ((f"local-dir:{out}", None), (None, str(out)),
                              ("hf-hub:someorg/tiny", None)):
        built = _common.build_model(model, checkpoint)
        assert (built.T, built.img_size, built.num_classes) == (2, 16, 10)
        _assert_identical(built, reference)
    firing.main(["--model", f"local-dir:{out}", "--data-dir", str(data), "--batches", "1",
                 "--batch-size", "4", "--out", str(tmp_path / "f")])
    assert "wrote" in capsys.readouterr().out and any((tmp_path / "f").iterdir())
    with pytest.raises(ValueError, match="give one"):
        _common.build_model(f"local-dir:{out}", str(path))
    # export-hub and convert of the export: the same weights again, still no --model
    main(["convert", f"local-dir:{out}", str(tmp_path / "back.pth")])
    _assert_identical(_common.build_model(None, str(tmp_path / "back.pth")), reference)


def test_hub_sources_fail_in_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from qkformer.checkpoint import read_source

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"^cannot fetch hf-hub:someorg/none \(.*local-dir:FOLDER$"):
        read_source("hf-hub:someorg/none")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        read_source(f"local-dir:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="folder without config.json"):
        read_source(str(tmp_path))
    # not offline, but no network: the host name does not resolve, so no half-minute of retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match=r"hub\.invalid cannot be reached"):
        read_source("hf-hub:someorg/none")
    r = subprocess.run([sys.executable, "-m", "qkformer.checkpoint", "inspect", "hf-hub:a/b"],
                       capture_output=True, text=True, cwd=REPO,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1",
                            "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert r.returncode == 1 and r.stderr.startswith("error: cannot fetch hf-hub:a/b")
    assert len(r.stderr.strip().splitlines()) == 1
