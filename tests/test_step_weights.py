"""The STEP benchmark's QKFormer checkpoints (timm-0.5 ``CheckpointSaver`` ``.pth.tar`` files).

The oracle is STEP's own code: ``tests/reference/step/make_step_reference.py`` built STEP's
CIFAR and ImageNet QKFormer from its module definitions (BrainCog neurons), saved them as STEP's
train.py does, and recorded their float64 logits, stage spikes and gradients. Here our models
load those files through every path and must give the same numbers.
"""
import argparse
import json
import logging

import pytest
import timm
import torch

import qkformer  # noqa: F401  (registers the models)
from qkformer import checkpoint as ck
from qkformer.checkpoint import CheckpointMismatchError, load_checkpoint, main, read_checkpoint
from qkformer.neuron import MultiStepLIF

from conftest import REFERENCE

STEP = REFERENCE / "step"
# Our vocabulary for the two reference models (STEP's factories: CIFAR 1/1/(depths-2) blocks and
# always 8 heads; ImageNet 1/1/7 blocks and its num_heads).
TINY = {
    "cifar_tiny": ("qkformer_cifar10", dict(embed_dims=32, depths=(1, 1, 1), num_heads=8,
                                            num_classes=10, T=4, img_size=16)),
    "imagenet_tiny": ("qkformer_10_384", dict(embed_dims=8, depths=(1, 1, 7), num_heads=2,
                                              num_classes=10, T=4, img_size=32)),
}
SWITCH = "switching the model to legacy_ssa=False"


@pytest.fixture(scope="module")
def outputs():
    path = STEP / "outputs.pt"
    if not path.is_file():  # a fidelity check that cannot run is a failure, never a skip
        pytest.fail(f"STEP reference data missing: {path}")
    return torch.load(path)


def _full(name):
    """A state_dict with the keys, shapes and neuron values of a full-size STEP model."""
    entries = json.loads((STEP / "full_keys.json").read_text())[name]
    return {k: (torch.tensor(v[0]) if v else torch.zeros(shape)) for k, shape, *v in entries}


def _saver_dict(state_dict, **args):
    """What timm 0.5's CheckpointSaver writes, as in STEP's train.py."""
    base = dict(model="qkformer_cifar", step=4, tau=2.0, threshold=1.0, alpha=4.0,
                node_type="LIFNode", act_function="SigmoidGrad", num_heads=8, img_size=32,
                dataset="torch/cifar10")
    return {"epoch": 399, "arch": args.get("model", base["model"]), "state_dict": state_dict,
            "optimizer": {"state": {}, "param_groups": []}, "version": 2,
            "args": argparse.Namespace(**{**base, **args}), "amp_scaler": {}, "metric": 96.24}


def _check(model, ref, mode, grads=True):
    """Our model (already loaded) against STEP's recorded results, in float64."""
    model = model.double().train(mode == "train")
    last, maps = model.forward_intermediates(ref["input"])
    logits = model.forward_head(last)
    torch.testing.assert_close(logits, ref[mode]["logits"], rtol=0, atol=1e-12)
    for i, (ours, theirs) in enumerate(zip(maps, ref[mode]["stages"]), 1):
        assert torch.equal(ours, theirs.double()), f"stage {i} spikes differ"
    if mode == "train" and grads:
        w = torch.linspace(-1, 1, logits.numel(), dtype=torch.float64).reshape(logits.shape)
        (logits * w).sum().backward()
        params = dict(model.named_parameters())
        for k, g in ref["train"]["grads"].items():
            torch.testing.assert_close(params[k].grad, g, rtol=1e-9, atol=1e-12, msg=k)
    return logits


def test_reference_files_are_what_step_writes(outputs):
    for name in TINY:
        with torch.serialization.safe_globals([argparse.Namespace]):
            raw = torch.load(STEP / f"{name}.pth.tar", map_location="cpu", weights_only=True)
        assert set(raw) == {"epoch", "arch", "state_dict", "optimizer", "version", "args",
                            "amp_scaler", "metric"}
        assert isinstance(raw["args"], argparse.Namespace) and raw["arch"] == outputs[name]["step_model"]
        sd = raw["state_dict"]
        assert any(k.endswith(".mlp.fc_conv1.weight") for k in sd)
        assert any(k.endswith("_lif.threshold") for k in sd) and any(k.endswith(".act_fun.alpha") for k in sd)
    assert sum(p.stat().st_size for p in STEP.iterdir()) < 800_000


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("name", list(TINY))
def test_load_checkpoint_matches_step(outputs, name, fast_path, caplog):
    arch, kw = TINY[name]
    for mode in ("eval", "train"):
        model = timm.create_model(arch, fast_path=fast_path, **kw)
        assert model.stage3[0].attention.legacy_proj_lif  # the default: the original's coupling
        with caplog.at_level(logging.WARNING, logger="qkformer.checkpoint"):
            caplog.clear()
            ckpt = load_checkpoint(model, STEP / f"{name}.pth.tar")
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1 and SWITCH in messages[0] and "STEP" in messages[0]
        assert not any(getattr(m, "legacy_proj_lif", False) for m in model.modules())
        assert ckpt["epoch"] == 0 and ckpt["step_args"].model == outputs[name]["step_model"]
        logits = _check(model, outputs[name], mode)
    # the switch matters: the batch-coupled SSA gives other logits on this batch of two
    model.set_legacy_ssa(True)
    with torch.no_grad():
        assert not torch.allclose(model(outputs[name]["input"]), logits.detach())


@pytest.mark.parametrize("name", list(TINY))
def test_timm_pretrained_file_matches_step(outputs, name):
    arch, kw = TINY[name]
    model = timm.create_model(arch, pretrained=True, **kw,
                              pretrained_cfg_overlay=dict(file=str(STEP / f"{name}.pth.tar")))
    assert not any(getattr(m, "legacy_proj_lif", False) for m in model.modules())
    _check(model, outputs[name], "eval")
    _check(model, outputs[name], "train", grads=False)


def test_neuron_constants_are_our_models():
    model = timm.create_model("qkformer_10_384", embed_dims=16, depths=(1, 1, 1), num_heads=2)
    lifs = {n: m for n, m in model.named_modules() if isinstance(m, MultiStepLIF)}
    assert {m.tau for m in lifs.values()} == {ck.LIF_TAU}
    assert {m.alpha for m in lifs.values()} == {ck.SURROGATE_ALPHA}
    assert {m.v_threshold for n, m in lifs.items() if n.endswith("attn_lif")} == {ck.MASK_THRESHOLD}
    assert {m.v_threshold for n, m in lifs.items() if not n.endswith("attn_lif")} == {ck.LIF_THRESHOLD}


def _tampered(tmp_path, key_end, value=None, **args):
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(STEP / "cifar_tiny.pth.tar", map_location="cpu", weights_only=True)
    if key_end:
        key = next(k for k in raw["state_dict"] if k.endswith(key_end))
        raw["state_dict"][key] = torch.tensor(value)
    for k, v in args.items():
        setattr(raw["args"], k, v)
    path = tmp_path / "tampered.pth.tar"
    torch.save(raw, path)
    return path


@pytest.mark.parametrize("key_end, value, args, expected", [
    ("stage1.0.tssa.q_lif.threshold", 0.8, {}, "stage1.0.tssa.q_lif.threshold is 0.8"),
    ("stage3.0.ssa.attn_lif.threshold", 1.0, {}, "stage3.0.ssa.attn_lif.threshold is 1.0 (expected 0.5)"),
    ("patch_embed2.proj3_lif.act_fun.alpha", 2.0, {}, "proj3_lif.act_fun.alpha is 2.0 (expected 4.0)"),
    (None, None, {"tau": 1.5}, "args.tau is 1.5 (expected 2.0)"),
    (None, None, {"node_type": "PLIFNode"}, "args.node_type is 'PLIFNode'"),
])
def test_other_neurons_are_refused(tmp_path, key_end, value, args, expected):
    path = _tampered(tmp_path, key_end, value, **args)
    arch, kw = TINY["cifar_tiny"]
    with pytest.raises(CheckpointMismatchError, match="neurons differ from this package's LIF") as e:
        load_checkpoint(timm.create_model(arch, **kw), path)
    assert expected in str(e.value)
    with pytest.raises(CheckpointMismatchError, match="neurons differ"):
        timm.create_model(arch, pretrained=True, **kw, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(CheckpointMismatchError, match="neurons differ"):
        main(["inspect", str(path)])
    # an untouched copy loads: the refusal is about the value, not the file
    load_checkpoint(timm.create_model(arch, **kw), _tampered(tmp_path, None))


def test_imagenet_file_is_refused_for_hst10_and_loads_as_1_1_7(tmp_path, caplog):
    """STEP's ImageNet model has one block in stage 2 (9 blocks) and calls the stage-3
    attention ``ssa``; its heads come from its args."""
    path = tmp_path / "model_best.pth.tar"
    torch.save(_saver_dict(_full("imagenet_10_384"), model="qkformer_imagenet", num_heads=8,
                           num_classes=1000, img_size=224, dataset="imagenet"), path)
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(timm.create_model("qkformer_10_384"), path)
    assert "fits the variant qkformer_10_384 built with depths=(1, 1, 7), num_heads=8" in str(e.value)
    with pytest.raises(CheckpointMismatchError, match=r"depths=\(1, 1, 7\)"):
        timm.create_model("qkformer_10_384", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(CheckpointMismatchError, match="build it with num_heads=8"):
        load_checkpoint(timm.create_model("qkformer_10_384", depths=(1, 1, 7)), path)
    model = timm.create_model("qkformer_10_384", depths=(1, 1, 7), num_heads=8)
    load_checkpoint(model, path)
    sd = model.state_dict()
    assert torch.count_nonzero(sd["stage3.6.attn.q_bn.running_var"]) == 0  # zeros came through
    assert "stage3.0.attn.q_conv.weight" in sd and "stage3.0.mlp.fc1_conv.weight" in sd


@pytest.mark.parametrize("name, variant", [("cifar10", "qkformer_cifar10"),
                                           ("cifar100", "qkformer_cifar100")])
def test_full_size_cifar_files_fit_our_variants(tmp_path, capsys, name, variant):
    path = tmp_path / "checkpoint-399.pth.tar"
    torch.save(_saver_dict(_full(name)), path)
    load_checkpoint(timm.create_model(variant), path)
    main(["inspect", str(path)])
    out = capsys.readouterr().out
    assert "layout: STEP benchmark checkpoint (timm 0.5 CheckpointSaver" in out
    assert "STEP model 'qkformer_cifar', T=4, epoch 399; loads with legacy_ssa=False" in out
    assert f"fits variant: {variant}\n" in out
    assert read_checkpoint(path)["args"].model == variant


def test_inspect_names_the_step_layout(capsys):
    main(["inspect", str(STEP / "cifar_tiny.pth.tar")])
    out = capsys.readouterr().out
    assert out.startswith("layout: STEP benchmark checkpoint (timm 0.5 CheckpointSaver ['amp_scaler'")
    assert "STEP model 'qkformer_cifar', T=4" in out and "fits variant: None" in out


def test_convert_round_trips(outputs, tmp_path, caplog):
    arch, kw = TINY["cifar_tiny"]
    ref = outputs["cifar_tiny"]
    kwargs = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()})
    ours = tmp_path / "qkformer_step_cifar.pth"
    main(["convert", str(STEP / "cifar_tiny.pth.tar"), str(ours), "--model", arch,
          "--model-kwargs", kwargs])
    raw = read_checkpoint(ours)
    assert set(raw) == {"model", "args", "legacy_ssa"} and raw["args"].model == arch
    assert raw["args"].legacy_ssa is False and raw["args"].dataset == "cifar10"
    # plain timm with our file: the per-sample SSA is switched on again by the mark in the file
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qkformer.checkpoint"):
        model = timm.create_model(arch, pretrained=True, **kw,
                                  pretrained_cfg_overlay=dict(file=str(ours)))
    assert any(SWITCH in r.getMessage() for r in caplog.records)
    _check(model, ref, "eval")
    # ours -> safetensors -> ours: the same tensors and the same mark
    st = tmp_path / "w.safetensors"
    main(["convert", str(ours), str(st), "--model", arch, "--model-kwargs", kwargs])
    again = tmp_path / "again.pth"
    main(["convert", str(st), str(again), "--model", arch, "--model-kwargs", kwargs])
    a, b, c = (ck.extract_state_dict(read_checkpoint(p)) for p in (ours, st, again))
    assert list(a) == list(c) and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert all(isinstance(x, ck._PerSampleSSA) for x in (a, b, c))
    _check(timm.create_model(arch, pretrained=True, **kw, pretrained_cfg_overlay=dict(file=str(st))),
           ref, "eval")
    # a Hub folder (OUT without a suffix): its config builds the per-sample SSA by itself
    hub = tmp_path / "hub"
    main(["convert", str(STEP / "cifar_tiny.pth.tar"), str(hub), "--model", arch,
          "--model-kwargs", kwargs])
    cfg = json.loads((hub / "config.json").read_text())
    assert cfg["model_args"]["legacy_ssa"] is False
    _check(timm.create_model(f"local-dir:{hub}", pretrained=True), ref, "eval")
    # a released-layout file without the mark stays legacy
    plain = tmp_path / "plain.pth"
    torch.save({"model": dict(a)}, plain)
    m = timm.create_model(arch, pretrained=True, **kw, pretrained_cfg_overlay=dict(file=str(plain)))
    assert m.stage3[0].attention.legacy_proj_lif


def test_export_hub_from_step_file(outputs, tmp_path):
    arch, kw = TINY["imagenet_tiny"]
    out = ck.export_hub(STEP / "imagenet_tiny.pth.tar", tmp_path / "hub", arch, dict(kw))
    assert json.loads((out / "config.json").read_text())["model_args"]["depths"] == [1, 1, 7]
    _check(timm.create_model(f"local-dir:{out}", pretrained=True), outputs["imagenet_tiny"], "eval")


def test_imagenet_test_py_evaluates_a_step_file(tmp_path, capsys, caplog):
    from qkformer import evaluate
    from qkformer.data.synthetic_images import write_png_image_folder

    data = write_png_image_folder(tmp_path / "pngs", classes=10, per_class_train=0,
                                  per_class_val=1, size=(16, 16))
    with caplog.at_level(logging.WARNING, logger="qkformer.checkpoint"):
        res = evaluate.main(["--checkpoint", str(STEP / "cifar_tiny.pth.tar"), "--data-dir",
                             str(data), "--batch-size", "5", "--workers", "0", "--no-progress",
                             "--no-amp", "--device", "cpu"])
    assert res["images"] == 10
    out = capsys.readouterr().out
    assert "model qkformer_cifar10 (T=4, input 16, cifar preprocessing" in out
    # the file says its SSA is STEP's fixed one: the model is built so, nothing to switch
    assert "fixed SSA" in out and not any(SWITCH in r.getMessage() for r in caplog.records)
