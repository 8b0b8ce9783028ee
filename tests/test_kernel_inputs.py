"""What reaches the C++ kernels is checked first: their ctypes signatures equal the C prototypes,
and the public fused and sparse functions refuse (or copy) what a kernel would misread.

Each bad input here once gave a silently wrong result: a strided view read as contiguous, a
float64 vector read as float32, a gradient of an unsupported kernel left uninitialised.
"""
import ctypes
import re
import subprocess

import pytest
import torch

from qkformer import cpu, fused, sparse

pytestmark = pytest.mark.skipif(cpu.library() is None,
                                reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}")


def _prototypes():
    """``qk_*`` name -> (argument kinds, return kind) from the preprocessed C++ sources.
    Kinds: 'ptr', 'i64', 'int', 'A' (the arithmetic type: float or double), None for void."""
    out = {}
    for src in cpu._SOURCES:
        text = subprocess.run([cpu._compiler(), "-E", "-P", "-std=c++17", "-march=native",
                               "-I", str(src.parent), str(src)], capture_output=True, text=True,
                              check=True).stdout
        for m in re.finditer(r'extern "C"\s+([\w:\s\*]+?)\s*\b(qk_\w+)\s*\(([^)]*)\)', text):
            ret, name, args = m.groups()
            kinds = []
            for a in (a.strip() for a in args.split(",") if a.strip()):
                if "*" in a:
                    kinds.append("ptr")
                elif re.match(r"(const\s+)?(i64|int64_t)\b", a):
                    kinds.append("i64")
                elif re.match(r"int\b", a):
                    kinds.append("int")
                elif re.match(r"(const\s+)?(\w*::A|float|double)\b", a):
                    kinds.append("A")
                else:
                    raise AssertionError(f"{name}: unknown argument type {a!r}")
            out[name] = (kinds, {"void": None, "i64": "i64", "int": "int"}[ret.strip()])
    return out


def _kind(t):
    return {ctypes.c_void_p: "ptr", ctypes.c_int64: "i64", ctypes.c_int: "int",
            ctypes.c_float: "A", ctypes.c_double: "A", None: None, "A": "A"}[t]


def test_signatures_equal_the_c_prototypes():
    protos = _prototypes()
    declared = {}
    for name, (args, ret) in cpu._SIGNATURES.items():
        for suffix in cpu.SUFFIX.values():
            declared[f"qk_{name}_{suffix}"] = ([_kind(a) for a in args], _kind(ret))
    for name, (args, ret) in cpu._PLAIN.items():
        declared[f"qk_{name}"] = ([_kind(a) for a in args], _kind(ret))
    assert len(protos) > 40
    sparse_kernels = {"csr_count", "csr_fill", "csr_fill_u8", "csr_fill_bits", "spconv_fwd",
                      "spconv_dw"}  # float32 and float64 only
    for name, want in declared.items():
        if name.endswith("_bf16") and name[3:-5] in sparse_kernels:
            assert name not in protos, name
            continue
        assert name in protos, f"{name}: declared for ctypes, not in the C sources"
        assert protos[name] == want, f"{name}: ctypes {want} != C {protos[name]}"
    assert set(protos) <= set(declared), f"without a ctypes signature: {set(protos) - set(declared)}"


def test_the_prototype_reader_sees_a_mismatch(monkeypatch):
    monkeypatch.setitem(cpu._SIGNATURES, "to_u8", ([ctypes.c_void_p, ctypes.c_int64],
                                                   ctypes.c_int64))
    with pytest.raises(AssertionError, match="qk_to_u8"):
        test_signatures_equal_the_c_prototypes()


def test_batch_stats_of_a_strided_view():
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(64, 24, generator=g)
    view = wide[:, 4:12]  # a column slice: reshape keeps it strided
    mean, var = fused.batch_stats(view)
    want_var, want_mean = torch.var_mean(view.double(), dim=0, correction=0)
    torch.testing.assert_close(mean, want_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var, want_var, rtol=1e-6, atol=1e-7)


def test_bn_lif_refuses_per_channel_vectors_it_would_misread():
    y = torch.randn(4, 8, 16)
    scale, shift = torch.rand(16) + 0.5, torch.randn(16)
    ok = fused.bn_lif_forward(y, 2, scale, shift, 2.0, 1.0)
    # a strided (but otherwise right) vector is copied, not misread
    wide = torch.stack([scale, torch.zeros(16)], 1)
    assert torch.equal(fused.bn_lif_forward(y, 2, wide[:, 0], shift, 2.0, 1.0), ok)
    for bad, match in [((scale.double(), shift), "scale"), ((scale, shift[:8]), "shift"),
                       ((scale, None), "together")]:
        with pytest.raises(ValueError, match=match):
            fused.bn_lif_forward(y, 2, *bad, 2.0, 1.0)
        with pytest.raises(ValueError, match=match):
            fused.bn_lif_backward(torch.ones_like(y), y, 2, *bad, 2.0, 1.0, 4.0, True)


def test_fused_passes_refuse_wrong_sizes():
    y = torch.randn(4, 8, 16)
    with pytest.raises(ValueError, match="gradient of shape"):
        fused.bn_lif_backward(torch.ones(4, 8, 15), y, 2, None, None, 2.0, 1.0, 4.0, True)
    with pytest.raises(ValueError, match="steps"):
        fused.bn_lif_forward(torch.randn(3, 5, 16), 2, None, None, 2.0, 1.0)
    with pytest.raises(ValueError, match="steps"):
        fused.bn_lif_forward(torch.randn(4, 8, 16), 2, None, None, 2.0, 1.0, pool=True)
    with pytest.raises(ValueError, match="BN input gradient"):
        fused._bn_input_grad(torch.zeros(4, 8, 15), y, None, None, None, None)
    packed, how = fused.pack(torch.ones(100), fused.SPIKES)
    with pytest.raises(ValueError, match="unpack"):
        fused.unpack(packed[:-1], how)


def test_sparse_products_refuse_inputs_that_do_not_fit():
    x = (torch.rand(2, 6, 6, 8) < 0.2).float()
    csr = sparse.csr_from_dense(x, 1.0)
    w = torch.randn(5, 8, 3, 3)
    with pytest.raises(ValueError, match="weight of shape"):
        sparse.forward(csr, x.shape, torch.randn(5, 7, 3, 3), None, 3, 1)
    with pytest.raises(ValueError, match="CSR"):
        sparse.forward(csr, (2, 6, 5, 8), w, None, 3, 1)
    with pytest.raises(ValueError, match="bias"):
        sparse.forward(csr, x.shape, w, torch.zeros(4), 3, 1)
    with pytest.raises(ValueError, match="output gradient"):
        sparse.weight_grad(csr, x.shape, torch.randn(2, 6, 6, 4), w, 3, 1)
    with pytest.raises(ValueError, match="float32/float64"):
        sparse.csr_from_dense(x.to(torch.int32))
    packed, how = fused.pack(x, fused.SPIKES)
    with pytest.raises(ValueError, match="packed input"):
        sparse.csr_from_packed(packed[1:], how)


@pytest.mark.parametrize("k", [2, 5, 7])
def test_sparse_weight_gradient_only_where_its_kernel_exists(k):
    """The weight-gradient kernel has 1x1 and 3x3 only: anything else is refused (it used to
    return uninitialised memory as the gradient), and the forward product still covers it."""
    assert not sparse.weight_grad_supported(k, 1)
    assert sparse.weight_grad_supported(0, 1) and sparse.weight_grad_supported(3, 1)
    assert not sparse.weight_grad_supported(1, 2)
    x = (torch.rand(2, 7, 7, 4, dtype=torch.float64) < 0.3).double()
    csr = sparse.csr_from_dense(x, 1.0)
    w = torch.randn(3, 4, k, k, dtype=torch.float64)
    with pytest.raises(ValueError, match="no sparse weight gradient"):
        sparse.weight_grad(csr, x.shape, torch.randn(2, 7 + (k + 1) % 2, 7 + (k + 1) % 2, 3,
                                                    dtype=torch.float64), w, k, 1)
    want = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), w, None, 1, k // 2)
    torch.testing.assert_close(sparse.forward(csr, x.shape, w, None, k, 1),
                               want.permute(0, 2, 3, 1), rtol=1e-12, atol=1e-12)
