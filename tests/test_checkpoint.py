"""Checkpoint reading: every layout and prefix, safetensors, refusal of unsafe pickles, errors."""
import argparse
import os
import pickle

import pytest
import timm
import torch

from qkformer.checkpoint import (CheckpointMismatchError, UnsafeCheckpointError, atomic_save,
                                 export_hub, load_checkpoint, main, match_variant,
                                 read_checkpoint, save_safetensors)

TINY = dict(embed_dims=32, depths=(1, 1, 1), num_heads=2, num_classes=5, T=1, img_size=16)


def _pair(name="qkformer_cifar10", **kw):
    src = timm.create_model(name, **{**TINY, **kw})
    for p in src.parameters():
        p.data.normal_()
    dst = timm.create_model(name, **{**TINY, **kw})
    return src, dst


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


LAYOUTS = {
    "mae": lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3,
                       "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="x", lr=1e-3)},
    "timm": lambda sd: {"epoch": 1, "arch": "vitsnn", "state_dict": sd, "version": 2,
                        "args": argparse.Namespace(model="vitsnn"), "metric": 91.0},
    "bare": lambda sd: sd,
    "ddp": lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    "compiled": lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    "ddp_compiled": lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_and_prefixes(tmp_path, layout):
    src, dst = _pair()
    path = tmp_path / "ckpt.pth"
    torch.save(LAYOUTS[layout](src.state_dict()), path)
    ckpt = load_checkpoint(dst, path, strict=True)
    assert _same(src, dst)
    if layout == "mae":
        assert ckpt["args"].lr == 1e-3 and ckpt["epoch"] == 3


def test_timm_ema_layout(tmp_path):
    src, dst = _pair()
    other, _ = _pair()
    torch.save({"state_dict": other.state_dict(), "state_dict_ema": src.state_dict()}, tmp_path / "c.pth")
    load_checkpoint(dst, tmp_path / "c.pth", use_ema=True)
    assert _same(src, dst)
    load_checkpoint(dst, tmp_path / "c.pth")
    assert _same(other, dst)


def test_safetensors_round_trip_and_cli(tmp_path):
    src, dst = _pair()
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(a=1)}, tmp_path / "c.pth")
    main(["export", str(tmp_path / "c.pth"), str(tmp_path / "c.safetensors")])
    load_checkpoint(dst, tmp_path / "c.safetensors")
    assert _same(src, dst)
    save_safetensors(src, tmp_path / "m.safetensors")
    assert read_checkpoint(tmp_path / "m.safetensors").keys() == src.state_dict().keys()


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _Exploit(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="arbitrary code"):
        read_checkpoint(path)
    assert not marker.exists()
    # the same with a raw pickle file
    path.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises((UnsafeCheckpointError, ValueError)):
        read_checkpoint(path)
    assert not marker.exists()


def test_wrong_variant_names_keys_and_the_fitting_variant(tmp_path):
    with torch.device("meta"):
        cifar10 = timm.create_model("qkformer_cifar10")
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in cifar10.state_dict().items()}
    torch.save({"model": sd}, tmp_path / "c10.pth")
    target = timm.create_model("qkformer_cifar100")
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(target, tmp_path / "c10.pth")
    msg = str(e.value)
    assert "mis-shaped keys (2)" in msg and "head.weight checkpoint (10, 384) vs model (100, 384)" in msg
    assert "qkformer_cifar10" in msg
    dvs = timm.create_model("qkformer_dvs128_gesture")
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(dvs, {"model": sd})
    msg = str(e.value)
    assert "missing keys" in msg and "unexpected keys" in msg and "patch_embed2.proj3_conv.weight" in msg
    assert "fits the variant qkformer_cifar10" in msg
    assert match_variant({**sd, "head.weight": torch.zeros(3, 384), "head.bias": torch.zeros(3)}) \
        == "qkformer_cifar10 (num_classes=3)"


def _pretrained(path, **kw):
    return timm.create_model("qkformer_cifar10", pretrained=True, **{**TINY, **kw},
                             pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_timm_pretrained_overlay(tmp_path, layout):
    src, _ = _pair()
    torch.save(LAYOUTS[layout](src.state_dict()), tmp_path / "c.pth")
    m = _pretrained(tmp_path / "c.pth")
    assert _same(src, m) and list(m.state_dict()) == list(src.state_dict())
    assert "state_dict" not in m.pretrained_cfg  # the handed-over weights are not kept alive


def test_timm_pretrained_overlay_safetensors_and_ema(tmp_path):
    src, _ = _pair()
    other, _ = _pair()
    save_safetensors(src, tmp_path / "c.safetensors")
    assert _same(src, _pretrained(tmp_path / "c.safetensors"))
    # timm's convention for pretrained weights: EMA when the file has it
    torch.save({"state_dict": other.state_dict(), "state_dict_ema": src.state_dict()}, tmp_path / "e.pth")
    assert _same(src, _pretrained(tmp_path / "e.pth"))


def test_timm_pretrained_needs_a_source():
    with pytest.raises(ValueError, match="pretrained_cfg_overlay") as e:
        timm.create_model("qkformer_cifar10", pretrained=True)
    assert "\n" not in str(e.value) and "local-dir:" in str(e.value) and "hf-hub:" in str(e.value)


def test_timm_pretrained_reads_with_the_safe_reader(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "payload": _Exploit(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="arbitrary code"):
        _pretrained(tmp_path / "evil.pth")
    assert not marker.exists()


def test_timm_pretrained_strictness_and_new_heads(tmp_path):
    src, _ = _pair()
    torch.save({"model": src.state_dict()}, tmp_path / "c.pth")
    with pytest.raises(CheckpointMismatchError, match="mis-shaped keys") as e:
        _pretrained(tmp_path / "c.pth", embed_dims=64)
    assert str(tmp_path / "c.pth") in str(e.value)
    sd = dict(src.state_dict())
    sd["stage9.0.extra"] = torch.zeros(1)
    del sd["stage1.0.tssa.q_conv.weight"]
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        _pretrained(tmp_path / "bad.pth")
    assert "missing keys (1): stage1.0.tssa.q_conv.weight" in str(e.value)
    assert "unexpected keys (1): stage9.0.extra" in str(e.value)
    loose = _pretrained(tmp_path / "bad.pth", pretrained_strict=False)
    assert torch.equal(loose.head.weight, src.head.weight)
    # another class count is timm's fine-tuning path: the body loads, the head is new
    m = _pretrained(tmp_path / "c.pth", num_classes=7)
    assert m.head.out_features == 7
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in m.state_dict().items()
               if not k.startswith("head."))


def test_timm_pretrained_released_checkpoint_names_the_variant_it_fits(tmp_path):
    with torch.device("meta"):
        dvs = timm.create_model("qkformer_cifar10_dvs")
    sd = {k: torch.rand(v.shape).to(v.dtype) for k, v in dvs.state_dict().items()}
    torch.save({"model": sd, "optimizer": {}, "epoch": 1, "scaler": {}, "args": argparse.Namespace()},
               tmp_path / "c.pth")
    m = timm.create_model("qkformer_cifar10_dvs", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "c.pth")))
    assert list(m.state_dict()) == list(sd) and all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    with pytest.raises(CheckpointMismatchError, match="fits the variant qkformer_cifar10_dvs"):
        timm.create_model("qkformer_dvs128_gesture", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "c.pth")))


def test_match_variant_candidates_come_from_timm_or_the_caller():
    with torch.device("meta"):
        sd = timm.create_model("qkformer_cifar10_dvs").state_dict()
    assert match_variant(sd) == "qkformer_cifar10_dvs"
    assert match_variant(sd, candidates=["qkformer_cifar10", "qkformer_dvs128_gesture"]) is None
    assert match_variant(sd, candidates=["qkformer_cifar10_dvs"]) == "qkformer_cifar10_dvs"


def test_inspect_cli(tmp_path, capsys):
    src, _ = _pair()
    torch.save({"model": src.state_dict(), "epoch": 2, "args": argparse.Namespace()}, tmp_path / "c.pth")
    main(["inspect", str(tmp_path / "c.pth")])
    out = capsys.readouterr().out
    assert "layout: ['args', 'epoch', 'model']" in out and f"tensors: {len(src.state_dict())}" in out
    assert "fits variant: None" in out


def test_a_trained_checkpoint_says_what_it_holds(tmp_path, capsys):
    """inspect, export-hub and convert read the model from the training arguments in the file:
    no --model, no architecture flags, and the card states the file's own T and size."""
    torch.manual_seed(0)
    model = timm.create_model("qkformer_cifar10", embed_dims=32, depths=(1, 1, 1), num_heads=2,
                              T=2, img_size=16, num_classes=10)
    args = argparse.Namespace(model="qkformer_cifar10", T=2, input_size=16, embed_dims=[32],
                              depths=[1, 1, 1], num_heads=[2], mlp_ratio=None, attn_types=None,
                              legacy_ssa=True)
    path = tmp_path / "c.pth"
    torch.save({"model": model.state_dict(), "args": args, "epoch": 11, "best_acc1": 98.4}, path)
    main(["inspect", str(path)])
    out = capsys.readouterr().out
    assert "model: qkformer_cifar10 T=2 depths=(1, 1, 1) embed_dims=32 img_size=16" in out
    assert "stored: epoch 11, best_acc1 98.4" in out and "parameters: " in out
    main(["export-hub", str(path), str(tmp_path / "hub")])
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "T=2, 16 x 16 input" in card and "T=4" not in card and "HST-4-384" not in card
    hub = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True)
    main(["convert", str(path), str(tmp_path / "c.safetensors")])
    for m in (hub,):
        assert (m.T, m.img_size, m.num_classes) == (2, 16, 10)
        for k, v in model.state_dict().items():
            assert torch.equal(m.state_dict()[k], v), k
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    with pytest.raises(ValueError, match="does not say which model it holds: pass --model"):
        main(["export-hub", str(bare), str(tmp_path / "hub2")])


def test_truncated_and_missing_files(tmp_path):
    src, dst = _pair()
    path = tmp_path / "c.pth"
    torch.save({"model": src.state_dict()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(dst, path)
    st = tmp_path / "c.safetensors"
    save_safetensors(src, st)
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_checkpoint(st)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "nope.pth")
    torch.save({"optimizer": {}, "epoch": 1}, path)
    with pytest.raises(ValueError, match="no state_dict"):
        load_checkpoint(dst, path)


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_save({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_save({"a": Boom()}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temp files left behind


def test_describe_fit_names_per_stage_depth_overrides():
    from qkformer.checkpoint import describe_fit

    with torch.device("meta"):
        sd = timm.create_model("qkformer_10_512", depths=(1, 1, 3)).state_dict()
        other = timm.create_model("qkformer_10_512", depths=(1, 1, 3), num_classes=7).state_dict()
    assert match_variant(sd) is None
    assert describe_fit(sd) == "qkformer_10_512 built with depths=(1, 1, 3)"
    assert describe_fit(other) == "qkformer_10_512 built with depths=(1, 1, 3), num_classes=7"
    with pytest.raises(CheckpointMismatchError,
                       match=r"fits the variant qkformer_10_512 built with depths=\(1, 1, 3\)"):
        load_checkpoint(timm.create_model("qkformer_10_512"), {"model": dict(sd)})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_convert_released_layout_round_trip(tmp_path, suffix):
    """A released (MAE) file -> our .pth or .safetensors -> the same weights, same SSA setting."""
    src, _ = _pair()
    torch.save(LAYOUTS["mae"](src.state_dict()), tmp_path / "c.pth")
    kwargs = '{"embed_dims": 32, "depths": [1, 1, 1], "num_heads": 2, "num_classes": 5, "T": 1, "img_size": 16}'
    out = tmp_path / f"out{suffix}"
    main(["convert", str(tmp_path / "c.pth"), str(out), "--model", "qkformer_cifar10",
          "--model-kwargs", kwargs])
    m = _pretrained(out)
    assert _same(src, m) and m.stage3[0].attention.legacy_proj_lif  # nothing asked to switch it
    if suffix == ".pth":
        ckpt = read_checkpoint(out)
        assert set(ckpt) == {"model", "args"} and ckpt["args"].model == "qkformer_cifar10"
        assert ckpt["args"].depths == (1, 1, 1) and ckpt["args"].input_size == 16
    with pytest.raises(ValueError, match="is none of"):
        main(["convert", str(tmp_path / "c.pth"), str(out), "--model", "resnet18"])


def test_export_never_replaces_files_it_did_not_write(tmp_path):
    src, _ = _pair()
    path = tmp_path / "c.pth"
    torch.save({"model": src.state_dict()}, path)
    name, kwargs = "qkformer_cifar10", dict(TINY)
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    with pytest.raises(ValueError, match="already holds files this export did not write"):
        export_hub(path, folder, name, kwargs)
    assert (folder / "README.md").read_text() == "my notes"
    again = tmp_path / "hub2"
    export_hub(path, again, name, kwargs)
    export_hub(path, again, name, kwargs)  # an earlier export of ours is replaced
    (again / "extra.txt").write_text("mine")
    with pytest.raises(ValueError, match="extra.txt"):
        export_hub(path, again, name, kwargs)


def test_checkpoint_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    src, _ = _pair()
    path = tmp_path / "c.pth"
    torch.save({"model": src.state_dict()}, path)
    proc = subprocess.run([sys.executable, "-m", "qkformer.checkpoint", "convert", str(path),
                           str(tmp_path / "o.pth"), "--model", "qkformer_cifar10",
                           "--model-kwargs", '{"bogus_key": 1}'], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bogus_key" in lines[0], lines
