"""Spike-driven convolutions: products of sparse integer inputs, computed from their non-zeros.

Nearly every convolution and projection of QKFormer reads spikes (0/1) or the residual stream
(small counts), and most of those values are zero. A dense GEMM multiplies the zeros too; these
products (:mod:`qkformer.cpu`'s ``sparse_kernels.cpp``) gather only the non-zeros, which is
faster whenever the input is sparse enough (:func:`limits`). The forward product and the
weight gradient use them; the input gradient (dense in the output gradient) stays with the
dense libraries. Each output is a sum of the same terms as the dense product in another order,
so the results agree up to rounding (the tests compare them in float64).

A product is described by its geometry: the input ``[N, H, W, C]`` (a token list ``[R, C]`` is
``N = R``, ``H = W = 1``), a ``k x k`` kernel with padding ``k // 2`` and ``stride``, ``Co``
outputs.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.profiler import record_function

from . import cpu, sparse_limits

__all__ = ["limits", "timing_pairs", "max_density", "max_density_weight_grad", "CSR", "enabled", "csr_from_dense",
           "csr_from_packed", "forward", "weight_grad", "weight_grad_supported", "weight_to_taps",
           "taps_to_weight"]

_limits: Optional[Tuple[float, float]] = None


def limits() -> Tuple[float, float]:
    """``(forward, weight gradient)``: above these fractions of non-zeros the dense products are
    faster. Measured once per machine and thread count (:mod:`qkformer.sparse_limits`), or set
    by ``QKFORMER_SPARSE_MAX_DENSITY`` (0: the spike-driven products are off)."""
    global _limits
    if _limits is None:
        forward, weight_grad, _ = sparse_limits.limits(timing_pairs)
        _limits = (forward, weight_grad)
    return _limits


def timing_pairs(shape, kernel_size: int, out_channels: int, density: float, g):
    """What :mod:`qkformer.sparse_limits` times: per operation ('forward', 'weight_grad'), the
    spike-driven product and the dense one the fast path would run instead, as callables on a
    float32 spike input of ``shape`` (``[R, C]`` or ``[N, H, W, C]``) with that density, each
    starting from what the fast path has at hand (the input itself forward, its bits backward)."""
    k, co = kernel_size, out_channels
    x = (torch.rand(shape, generator=g) < density).float()
    w = torch.randn(co, shape[-1], max(k, 1), max(k, 1), generator=g) * 0.05
    dy = torch.randn((*shape[:-1], co), generator=g)
    if k == 0:
        w2 = w.view(co, -1)
        dense_fwd = lambda: x @ w2.t()  # noqa: E731
    else:
        xc, dyc = x.permute(0, 3, 1, 2), dy.permute(0, 3, 1, 2)  # channels-last views
        dense_fwd = lambda: torch.nn.functional.conv2d(xc, w, None, 1, k // 2)  # noqa: E731
    # the weight gradient reads the input as the unit kept it for backward: spikes as bits
    n = x.numel()
    bits = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8)
    bits[:n] = x.reshape(-1) != 0
    bits = (bits.view(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)
    how = ("bits", x.shape, x.dtype)

    def unpacked():
        out = torch.empty(shape)
        cpu.kernel("from_bits", torch.float32)(bits.data_ptr(), out.data_ptr(), n,
                                               *cpu.Parts(n, 8).args)
        return out

    if k == 0:
        dense_dw = lambda: dy.t() @ unpacked()  # noqa: E731
    else:
        dense_dw = lambda: torch.ops.aten.convolution_backward(  # noqa: E731
            dyc, unpacked().permute(0, 3, 1, 2), w, None, [1, 1], [k // 2] * 2, [1, 1], False,
            [0, 0], 1, [False, True, False])
    sparse_fwd = lambda: forward(csr_from_dense(x, 1.0), shape, w, None, k, 1)  # noqa: E731
    sparse_dw = lambda: weight_grad(csr_from_packed(bits, how, 1.0), shape, dy, w, k, 1)  # noqa: E731
    return {"forward": (sparse_fwd, dense_fwd), "weight_grad": (sparse_dw, dense_dw)}


def max_density() -> float:
    return limits()[0]


def max_density_weight_grad() -> float:
    return limits()[1]


class CSR(NamedTuple):
    rowptr: Tensor  # int64 [R + 1]
    idx: Tensor     # int32 [nnz]: channel of each non-zero
    val: Tensor     # [nnz]: its value, in the product's dtype
    rows: int
    cols: int

    @property
    def density(self) -> float:
        return int(self.rowptr[-1]) / max(self.rows * self.cols, 1)


def enabled(dtype: torch.dtype, device: torch.device) -> bool:
    """Sparse products exist for float32/float64 CPU tensors where the kernels are built."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.float64)
            and cpu.library() is not None)


def _check_dense(x: Tensor) -> None:
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() == 0:
        raise ValueError(f"spike-driven products take float32/float64 CPU tensors with a channel "
                         f"axis, not {x.dtype} on {x.device} of shape {tuple(x.shape)}")


def _check_product(csr: CSR, x_shape, weight: Tensor, kernel_size: int, stride: int) -> None:
    """Raise ValueError unless ``csr``, ``x_shape`` and ``weight`` describe one product the
    kernels can compute (they read memory by these sizes and check nothing)."""
    x_shape = tuple(x_shape)
    C = x_shape[-1] if x_shape else 0
    if kernel_size < 0 or stride < 1 or (kernel_size > 0 and len(x_shape) != 4):
        raise ValueError(f"no spike-driven product for kernel {kernel_size}, stride {stride} "
                         f"on an input of shape {x_shape}")
    want = (weight.shape[0], C, kernel_size, kernel_size) if kernel_size else None
    if (want is not None and tuple(weight.shape) != want) or (
            want is None and weight.numel() != weight.shape[0] * C):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit an input of "
                         f"{C} channels and kernel {kernel_size}")
    rows = math.prod(x_shape[:-1])
    if (csr.cols != C or csr.rows != rows or csr.rowptr.numel() != rows + 1
            or csr.rowptr.dtype != torch.int64 or csr.idx.dtype != torch.int32
            or csr.val.dtype not in (torch.float32, torch.float64)
            or not all(t.is_contiguous() and t.device.type == "cpu"
                       for t in (csr.rowptr, csr.idx, csr.val))
            or csr.idx.numel() < int(csr.rowptr[-1]) or csr.val.numel() < int(csr.rowptr[-1])):
        raise ValueError(f"CSR of {csr.rows}x{csr.cols} does not describe an input of shape {x_shape}")


def _count(rows: int, cols: int, count) -> Tensor:
    counts = torch.empty(rows, dtype=torch.int32)
    count(cpu.Parts(rows, work=cols), counts.data_ptr())
    return counts


def _csr(counts: Tensor, cols: int, dtype: torch.dtype, fill) -> CSR:
    rows = counts.numel()
    rowptr = torch.empty(rows + 1, dtype=torch.int64)
    cpu.kernel("csr_prefix")(counts.data_ptr(), rows, rowptr.data_ptr())
    nnz = int(rowptr[-1])
    # one spare slot: the branch-free fill writes a candidate past the last non-zero
    idx = torch.empty(nnz + 1, dtype=torch.int32)
    val = torch.empty(nnz + 1, dtype=dtype)
    fill(cpu.Parts(rows, work=cols), rowptr.data_ptr(), idx.data_ptr(), val.data_ptr())
    return CSR(rowptr, idx, val, rows, cols)


def _sparse_enough(counts: Tensor, cols: int, max_density: float) -> bool:
    return int(counts.sum(dtype=torch.int64)) <= max_density * counts.numel() * cols


@record_function("qkformer.sparse.csr")
def csr_from_dense(x: Tensor, max_density: Optional[float] = None) -> Optional[CSR]:
    """CSR of ``x`` [..., C] (rows: all leading positions), or None when it is denser than
    ``max_density`` (default: the forward limit of :func:`limits`; counting is one cheap pass,
    filling happens only for a sparse input)."""
    max_density = limits()[0] if max_density is None else max_density
    _check_dense(x)
    C = x.shape[-1]
    x2 = x.contiguous().view(-1, C)
    count, fill = cpu.kernel("csr_count", x2.dtype), cpu.kernel("csr_fill", x2.dtype)
    src = x2.data_ptr()
    counts = _count(x2.shape[0], C, lambda parts, cp: count(src, C, *parts.args, cp))
    if not _sparse_enough(counts, C, max_density):
        return None
    return _csr(counts, C, x2.dtype, lambda parts, *out: fill(src, C, *parts.args, *out))


@record_function("qkformer.sparse.csr")
def csr_from_packed(stored: Tensor, how, max_density: Optional[float] = None) -> Optional[CSR]:
    """CSR straight from :func:`qkformer.fused.pack`'s bits or bytes, without unpacking."""
    max_density = limits()[0] if max_density is None else max_density
    fmt, shape, dtype = how
    C = shape[-1]
    R = math.prod(shape[:-1])
    need = (R * C + 7) // 8 if fmt == "bits" else R * C
    if (fmt not in ("bits", "u8") or stored.dtype != torch.uint8 or not stored.is_contiguous()
            or stored.device.type != "cpu" or stored.numel() != need
            or dtype not in (torch.float32, torch.float64)):
        raise ValueError(f"packed input ({fmt}, {stored.numel()} bytes of {stored.dtype}) does "
                         f"not hold {tuple(shape)} values of {dtype}")
    src = stored.data_ptr()
    if fmt == "bits":
        count, fill = cpu.kernel("csr_count_bits"), cpu.kernel("csr_fill_bits", dtype)
    else:
        count, fill = cpu.kernel("csr_count_u8"), cpu.kernel("csr_fill_u8", dtype)
    counts = _count(R, C, lambda parts, cp: count(src, C, *parts.args, cp))
    if not _sparse_enough(counts, C, max_density):
        return None
    return _csr(counts, C, dtype, lambda parts, *out: fill(src, C, *parts.args, *out))


def _geometry(x_shape, kernel_size: int, stride: int, Co: int) -> Tuple[Tensor, tuple]:
    """The kernels' geometry array and the output shape."""
    if kernel_size == 0:  # a projection over tokens [..., C]
        R = math.prod(x_shape[:-1])
        g = (R, 1, 1, x_shape[-1], 1, 1, 1, 1, 0, Co)
        return torch.tensor(g, dtype=torch.int64), (*x_shape[:-1], Co)
    N, H, W, C = x_shape
    pad = kernel_size // 2
    Ho = (H + 2 * pad - kernel_size) // stride + 1
    Wo = (W + 2 * pad - kernel_size) // stride + 1
    g = (N, H, W, C, Ho, Wo, kernel_size, stride, pad, Co)
    return torch.tensor(g, dtype=torch.int64), (N, Ho, Wo, Co)


def weight_to_taps(weight: Tensor) -> Tensor:
    """[Co, C, kh, kw] (or [Co, C, 1] / [Co, C]) -> [kh*kw, C, Co], output channels innermost."""
    if weight.dim() == 4:
        return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[1], weight.shape[0]).contiguous()
    return weight.reshape(weight.shape[0], -1).t().contiguous().unsqueeze(0)


def taps_to_weight(taps: Tensor, like: Tensor) -> Tensor:
    if like.dim() == 4:
        Co, C, kh, kw = like.shape
        return taps.view(kh, kw, C, Co).permute(3, 2, 0, 1).contiguous()
    return taps[0].t().contiguous().view(like.shape)


@record_function("qkformer.sparse.forward")
def forward(csr: CSR, x_shape, weight: Tensor, bias: Optional[Tensor], kernel_size: int,
            stride: int) -> Tensor:
    """The convolution (or projection) of the input ``csr`` describes; output token-major."""
    _check_product(csr, x_shape, weight, kernel_size, stride)
    if bias is not None and bias.numel() != weight.shape[0]:
        raise ValueError(f"bias of {bias.numel()} values for {weight.shape[0]} outputs")
    dtype = csr.val.dtype
    geometry, out_shape = _geometry(x_shape, kernel_size, stride, weight.shape[0])
    taps = weight_to_taps(weight.to(dtype))
    b = bias.to(dtype).contiguous() if bias is not None else None
    P = math.prod(out_shape[:-1])
    y = torch.empty(out_shape, dtype=dtype)
    cpu.kernel("spconv_fwd", dtype)(
        csr.rowptr.data_ptr(), csr.idx.data_ptr(), csr.val.data_ptr(), geometry.data_ptr(),
        taps.data_ptr(), b.data_ptr() if b is not None else None, y.data_ptr(),
        *cpu.Parts(P, work=weight.shape[0] * max(kernel_size, 1) ** 2).args)
    return y


def weight_grad_supported(kernel_size: int, stride: int) -> bool:
    """The weight-gradient kernel covers projections and stride-1 1x1 and 3x3 convolutions."""
    return kernel_size == 0 or (stride == 1 and kernel_size in (1, 3))


@record_function("qkformer.sparse.weight_grad")
def weight_grad(csr: CSR, x_shape, grad_out: Tensor, weight: Tensor, kernel_size: int,
                stride: int) -> Tensor:
    """Gradient of the product with respect to ``weight`` (shaped like it)."""
    if not weight_grad_supported(kernel_size, stride):
        raise ValueError(f"no sparse weight gradient for kernel {kernel_size}, stride {stride}")
    _check_product(csr, x_shape, weight, kernel_size, stride)
    dtype = csr.val.dtype
    geometry, out_shape = _geometry(x_shape, kernel_size, stride, weight.shape[0])
    if tuple(grad_out.shape) != tuple(out_shape) or grad_out.device.type != "cpu":
        raise ValueError(f"output gradient of shape {tuple(grad_out.shape)}, expected {out_shape}")
    Co = weight.shape[0]
    dy = grad_out.to(dtype).contiguous()
    taps = torch.empty((kernel_size * kernel_size if kernel_size else 1, csr.cols, Co), dtype=dtype)
    # output channels are shared out (each gradient element is summed by one thread, in order)
    lanes = 16 if dtype == torch.float32 else 8
    width = -(-Co // (2 * torch.get_num_threads()))
    width = max(lanes, -(-width // lanes) * lanes)
    slices = cpu.Parts.of([*range(0, Co, width), Co])
    done = cpu.kernel("spconv_dw", dtype)(
        csr.rowptr.data_ptr(), csr.idx.data_ptr(), csr.val.data_ptr(), geometry.data_ptr(),
        dy.data_ptr(), taps.data_ptr(), *slices.args)
    if not done:  # the kernel refused the geometry: taps holds no gradient
        raise RuntimeError(f"spconv_dw: geometry {geometry.tolist()} not supported")
    return taps_to_weight(taps, weight).to(weight.dtype)
