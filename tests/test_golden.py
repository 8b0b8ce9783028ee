"""The golden vectors (docs/original.md §9), made with the original modules, reproduced.

The reference path reproduces them bit for bit in float32. The fast path (token-major, fused)
sums in another order, so in float32 a spike exactly at a threshold could flip: it is held to the
documented float32 tolerance here (in practice it matches exactly too), and to the reference path
within 1e-9 in float64 in tests/test_fast_path.py, which is the verdict.
"""
import pytest
import timm
import torch

import qkformer  # noqa: F401  (registers the variants with timm)

from conftest import GOLDEN

PATHS = ("reference", "fast")
FP32_SPIKE_AGREEMENT = 0.999  # fast path, float32: fraction of spikes equal to the golden ones
FP32_ATOL = 1e-5


def _model(reference, name, path="reference"):
    variant, kwargs = GOLDEN[name]
    g = torch.load(reference / "golden" / f"{name}.pt", weights_only=True)
    model = timm.create_model(variant, fast_path=path == "fast", **kwargs)
    model.load_state_dict(g["state_dict"], strict=True)
    return model.eval(), g


def _reference_layout(model, out):
    """Hooked outputs of the fast path are token-major [T, B, H, W, C]."""
    return out.permute(0, 1, 4, 2, 3) if model.fast_path else out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(GOLDEN))
def test_logits_and_intermediates(reference, name, path):
    model, g = _model(reference, name, path)
    captured = {}
    for mod_name, mod in model.named_modules():
        if mod_name in g["intermediates_eval"]:
            mod.register_forward_hook(
                lambda m, i, o, n=mod_name: captured.__setitem__(n, _reference_layout(model, o)))
    with torch.no_grad():
        logits = model(g["input"])
    assert captured.keys() == g["intermediates_eval"].keys()
    for key, ref in g["intermediates_eval"].items():
        spikes = ".mlp" in key or key.count(".") == 2  # attention/MLP outputs are spikes
        if path == "reference":
            torch.testing.assert_close(captured[key], ref, rtol=0, atol=1e-5, msg=key)
            if spikes:
                assert torch.equal(captured[key], ref), key
        else:
            agree = (captured[key] == ref).float().mean().item()
            assert agree >= FP32_SPIKE_AGREEMENT, (key, agree)
    tol = 1e-5 if path == "reference" else 1e-3
    torch.testing.assert_close(logits, g["logits_eval"], rtol=0, atol=tol)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(GOLDEN))
def test_each_sample_alone_and_train_mode(reference, name, path):
    model, g = _model(reference, name, path)
    tol = 1e-5 if path == "reference" else 1e-3
    with torch.no_grad():
        alone = torch.cat([model(x[None]) for x in g["input"]])
        torch.testing.assert_close(alone, g["logits_eval_each_sample_alone"], rtol=0, atol=tol)
        # the batch-coupled legacy SSA is why "alone" differs from the batch forward
        assert not torch.allclose(alone, g["logits_eval"], atol=1e-3)
        model.train()
        torch.testing.assert_close(model(g["input"]), g["logits_train_mode"], rtol=0, atol=tol)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(GOLDEN))
def test_float64_and_gradients(reference, name, path):
    model, g = _model(reference, name, path)
    model = model.double()
    x = g["input"].double().requires_grad_()
    logits = model(x)
    assert logits.dtype == torch.float64
    # in float64 a spike could in principle flip at a threshold tie; with these vectors none does
    torch.testing.assert_close(logits.float(), g["logits_eval"], rtol=0, atol=1e-5)
    logits.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())
