import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The reference data the fidelity tests compare against (manifests of the released state_dicts,
# golden vectors made with the original modules) ships in tests/reference; QKFORMER_REFERENCE
# points the tests at another copy.
REFERENCE = Path(os.environ.get("QKFORMER_REFERENCE", REPO / "tests" / "reference"))

# Released variant -> manifest file name in <reference>/manifests.
MANIFESTS = {
    "qkformer_10_384": "imagenet_10_384",
    "qkformer_10_512": "imagenet_10_512",
    "qkformer_10_768": "imagenet_10_768",
    "qkformer_cifar10": "cifar10",
    "qkformer_cifar100": "cifar100",
    "qkformer_cifar10_dvs": "cifar10_dvs",
    "qkformer_dvs128_gesture": "dvs128_gesture",
}

# The tiny golden configurations (docs/original.md §9), as overrides of a released variant.
GOLDEN = {
    "imagenet_family_tiny": ("qkformer_10_384", dict(T=2, embed_dims=64, num_heads=2,
                                                     depths=(1, 2, 2), num_classes=10, img_size=32)),
    "cifar_family_tiny": ("qkformer_cifar10", dict(T=2, embed_dims=64, depths=(1, 1, 2),
                                                   num_classes=10, img_size=16)),
    "dvs_family_tiny_mlp1": ("qkformer_cifar10_dvs", dict(embed_dims=64, mlp_ratio=1.0,
                                                          num_classes=10, img_size=32)),
    "dvs_family_tiny_mlp4": ("qkformer_cifar10_dvs", dict(embed_dims=64, mlp_ratio=4.0,
                                                          num_classes=10, img_size=32)),
}


def benchmark_module(name: str):
    """A script of benchmarks/ imported as a module. Some set their environment on import
    (gpu_cost turns the CPU kernels off to count the CUDA route): the process's environment
    is put back as it was, so later tests do not inherit it."""
    import importlib
    import sys

    saved = dict(os.environ)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
        os.environ.clear()
        os.environ.update(saved)


def fire_bn(model: torch.nn.Module, seed: int = 1) -> None:
    """BN parameters and statistics far from the defaults, biased so that neurons fire (in train
    and eval mode): comparisons between silent networks would prove nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5 + 0.5)


def cli_error(monkeypatch, main, argv, **kwargs) -> str:
    """The message ``main`` exits with when run from the command line with ``argv``: one
    ``error:`` line, no traceback."""
    import sys

    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    with pytest.raises(SystemExit) as e:
        main(**kwargs)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: "), msg
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def count_calls(monkeypatch, module, names) -> dict:
    """Wrap ``module.<name>`` for each name so that calls are counted; returns the counts."""
    calls = {name: 0 for name in names}
    for name in names:
        original = getattr(module, name)

        def counted(*a, _name=name, _f=original, **k):
            calls[_name] += 1
            return _f(*a, **k)
        monkeypatch.setattr(module, name, counted)
    return calls


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while ``fn()`` runs, each storage counted once."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.fixture(scope="session")
def reference() -> Path:
    missing = [d for d in ("manifests", "golden") if not (REFERENCE / d).is_dir()]
    if missing:  # a fidelity check that cannot run is a failure, never a skip
        pytest.fail(f"reference data missing at {REFERENCE} ({', '.join(missing)}); "
                    f"QKFORMER_REFERENCE overrides the default tests/reference")
    return REFERENCE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _threads():
    # a driver run as from the command line fits its threads to the cores free at start (on a
    # busy machine fewer): the next test gets the process's threads back
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
