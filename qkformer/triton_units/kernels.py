"""Triton kernels of the fused spiking unit (see :mod:`qkformer.triton_units` for the launchers).

The arithmetic per element is that of the CPU kernels (``qkformer/cpu/fused_kernels.cpp``) and
the torch loops (``qkformer/lif_loops.py``):

    Z = Y * scale + shift;  H = V + (Z - V) / tau;  S = H >= V_th;  V = H - H * S
    g_H = g_S sg + carry dV/dH;  g_Z = g_H / tau;  carry = g_H (1 - 1/tau)

with sg = alpha sig (1 - sig), sig = 1 / (1 + exp(-alpha (H - V_th))). Values are loaded in
their storage type (16-bit under AMP) and computed in float32 (float64 for float64 storage) in
registers; nothing is written in a wider type than the caller asks for. Layouts are token-major
(channels innermost): ``y`` is [steps, M, C] (``y_step`` apart per step, 0 when one static
image is repeated over the steps) or, for the pooled unit, [steps, B, H, W, C].

The backward kernels keep the T charges of a neuron in registers (``STEPS`` is a compile-time
constant, the loops unrolled) instead of storing them: each pass recomputes them from ``y``.
Partial sums are written one row per program and summed by the next kernel in a fixed order, so
results do not depend on scheduling (no atomics on floating-point values).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _over_tau(x, tau, inv_tau, EXACT: tl.constexpr):
    # x / tau as a multiplication where that is the same number (tau a power of two)
    if EXACT:
        return x * inv_tau
    else:
        return x / tau


@triton.jit
def _charge(z, v, tau, inv_tau, v_th, EXACT: tl.constexpr):
    h = v + _over_tau(z - v, tau, inv_tau, EXACT)
    fired = tl.where(h >= v_th, 1.0, 0.0).to(h.dtype)
    return h, fired, h - h * fired


@triton.jit
def _grad(g_s, h, carry, tau, inv_tau, v_th, alpha, decay, EXACT: tl.constexpr,
          DETACH: tl.constexpr):
    sig = 1.0 / (1.0 + tl.exp(-((h - v_th) * alpha)))
    sg = (1.0 - sig) * sig * alpha
    keep = tl.where(h < v_th, 1.0, 0.0).to(h.dtype)
    if DETACH:
        dv_dh = keep
    else:
        dv_dh = keep - h * sg
    g_h = g_s * sg + carry * dv_dh
    return _over_tau(g_h, tau, inv_tau, EXACT), g_h * decay


@triton.jit
def _affine(y, sc, sh, AFFINE: tl.constexpr):
    if AFFINE:
        return y * sc + sh
    else:
        return y


@triton.jit
def _bn_input_grad(g, y, a, b, mu, d, APPLY: tl.constexpr, FULL_BN: tl.constexpr):
    if APPLY:
        if FULL_BN:
            return a * g + b * (y - mu) + d
        else:
            return a * g
    else:
        return g


@triton.jit
def _bn_affine(gamma_ptr, beta_ptr, mean, invstd, cols, cm, HAS_GAMMA: tl.constexpr,
               HAS_BETA: tl.constexpr):
    """BatchNorm as Z = y scale + shift, in float64, from its mean and 1/std."""
    if HAS_GAMMA:
        scale = tl.load(gamma_ptr + cols, mask=cm, other=0.0).to(tl.float64) * invstd
    else:
        scale = invstd
    if HAS_BETA:
        shift = tl.load(beta_ptr + cols, mask=cm, other=0.0).to(tl.float64) - mean * scale
    else:
        shift = 0.0 - mean * scale
    return scale, shift


@triton.jit
def _sum_parts(part_ptr, n_parts, C, cols, cm, BLOCK_C: tl.constexpr):
    """The per-program partial sums part[p, 0:2, C] added in program order (float64)."""
    s1 = tl.zeros([BLOCK_C], tl.float64)
    s2 = tl.zeros([BLOCK_C], tl.float64)
    for p in range(0, n_parts):
        base = part_ptr + p * 2 * C
        s1 += tl.load(base + cols, mask=cm, other=0.0)
        s2 += tl.load(base + C + cols, mask=cm, other=0.0)
    return s1, s2


@triton.jit
def _grad_coefficients(s1, s2, mean, invstd, scale, n, rep, A: tl.constexpr):
    """From sum(g_Z) and sum(g_Z y): sum(g_Z x_hat) (gamma's gradient) and the coefficients of
    the input gradient g_Y = a g_Z + b (y - mu) + d under batch statistics."""
    gzxhat = invstd * (s2 - mean * s1)
    n64 = tl.cast(n, tl.float64)
    r64 = tl.cast(rep, tl.float64)
    return (gzxhat, scale.to(A), (-scale * invstd * gzxhat / n64 * r64).to(A), mean.to(A),
            (-scale * s1 / n64 * r64).to(A))


@triton.jit
def _apply_coefficients(sums_ptr, n_sums, mean, invstd, scale, n, rep, g_gamma_ptr, g_beta_ptr,
                        C, cols, cm, APPLY: tl.constexpr, WANT_GAMMA: tl.constexpr,
                        WANT_BETA: tl.constexpr, FULL_BN: tl.constexpr, BLOCK_C: tl.constexpr,
                        A: tl.constexpr):
    """With APPLY the coefficients (a, b, mu, d) of the input gradient as [1, BLOCK_C] rows
    (b, mu, d None without FULL_BN), from the sums pass's partial sums, the first row of
    programs writing the gradients of gamma and beta; else all None."""
    if APPLY:  # (an early return would not end the compiled function: if / else)
        t1, t2 = _sum_parts(sums_ptr, n_sums, C, cols, cm, BLOCK_C)
        gzxhat, a, b, mu, d = _grad_coefficients(t1, t2, mean, invstd, scale, n, rep, A)
        if tl.program_id(0) == 0:
            if WANT_GAMMA:
                tl.store(g_gamma_ptr + cols, gzxhat.to(g_gamma_ptr.dtype.element_ty), mask=cm)
            if WANT_BETA:
                tl.store(g_beta_ptr + cols, t1.to(g_beta_ptr.dtype.element_ty), mask=cm)
        if FULL_BN:
            return a[None, :], b[None, :], mu[None, :], d[None, :]
        else:
            return a[None, :], None, None, None
    else:
        return None, None, None, None


@triton.jit
def _store_parts(part_ptr, p, C, cols, cm, s1, s2):
    """This program's per-channel partial sums into part[p, 0:2, C]."""
    base = part_ptr + p.to(tl.int64) * 2 * C
    tl.store(base + cols, s1, mask=cm)
    tl.store(base + C + cols, s2, mask=cm)


@triton.jit
def _finish_column_sums(part_ptr, done_ptr, out_ptr, s, C, cols, cm, ROUND: tl.constexpr):
    """This program's column sums ``s`` (float64) into part[p, C]; the last program of its
    block of channels to get here (counted on done[block], zeroed before the launch) adds the
    rows of part in program order, so the result does not depend on which program that is,
    and writes the totals to out, rounded through ROUND (the type of the summed values)."""
    p = tl.program_id(0)
    tl.store(part_ptr + p.to(tl.int64) * C + cols, s, mask=cm)
    tl.debug_barrier()  # every thread's share stored before the count says so
    if tl.atomic_add(done_ptr + tl.program_id(1), 1, sem="acq_rel") == tl.num_programs(0) - 1:
        total = tl.zeros(s.shape, tl.float64)
        for q in range(0, tl.num_programs(0)):
            total += tl.load(part_ptr + q * C + cols, mask=cm, other=0.0, cache_modifier=".cg")
        if ROUND != tl.float64:  # through float32, as torch sums 16-bit and float32 values
            total = total.to(tl.float32)
        tl.store(out_ptr + cols, total.to(ROUND).to(out_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _pooled_outputs(B, Ho, Wo, C, BLOCK: tl.constexpr):
    """This program's block of pooled outputs [B, Ho, Wo, C]: offsets, mask, and indices."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < B * Ho * Wo * C
    return (offs, m, offs // (C * Wo * Ho), (offs // (C * Wo)) % Ho, (offs // C) % Wo,
            offs % C)


# --------------------------------------------------------------------------------------------
# BatchNorm statistics
@triton.jit
def colstats_kernel(y_ptr, ref_ptr, part_ptr, R, C, rows_per_prog,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, A: tl.constexpr):
    """Per-channel sums of d = y - ref and d^2 over this program's rows, tiles summed in A and
    added in float64: part[p, 0, c], part[p, 1, c]."""
    p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < C
    ref = tl.load(ref_ptr + cols, mask=cm, other=0.0).to(A)
    s1 = tl.zeros([BLOCK_C], tl.float64)
    s2 = tl.zeros([BLOCK_C], tl.float64)
    r0 = p.to(tl.int64) * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, R)
    for r in range(r0, r1, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R).to(tl.int64)
        m = (rows < r1)[:, None] & cm[None, :]
        v = tl.load(y_ptr + rows[:, None] * C + cols[None, :], mask=m, other=0.0).to(A)
        d = tl.where(m, v - ref[None, :], 0.0)
        s1 += tl.sum(d, axis=0).to(tl.float64)
        s2 += tl.sum(d * d, axis=0).to(tl.float64)
    _store_parts(part_ptr, p, C, cols, cm, s1, s2)


@triton.jit
def _bn_stats(part_ptr, n_parts, count, ref_ptr, rmean_ptr, rvar_ptr, eps_ptr, C, cols, cm,
              BATCH: tl.constexpr, BLOCK_C: tl.constexpr):
    """Mean, biased variance and 1/std in float64: from the partial sums of d = y - ref over
    ``count`` rows (BATCH), or the running statistics."""
    if BATCH:
        s1, s2 = _sum_parts(part_ptr, n_parts, C, cols, cm, BLOCK_C)
        rows = tl.cast(count, tl.float64)
        d = s1 / rows
        d2 = s2 / rows
        mean = tl.load(ref_ptr + cols, mask=cm, other=0.0).to(tl.float64) + d
        var = tl.maximum(d2 - d * d, 0.0)
    else:
        mean = tl.load(rmean_ptr + cols, mask=cm, other=0.0).to(tl.float64)
        var = tl.load(rvar_ptr + cols, mask=cm, other=0.0).to(tl.float64)
    invstd = 1.0 / tl.sqrt(var + tl.load(eps_ptr))  # eps in float64, as torch adds it
    return mean, var, invstd


@triton.jit
def bn_coefficients_kernel(part_ptr, n_parts, count, ref_ptr, rmean_ptr, rvar_ptr, gamma_ptr,
                           beta_ptr, eps_ptr, mean_ptr, var_ptr, invstd_ptr, rm0, rv0, rc0, rm1,
                           rv1, rc1, rm2, rv2, rc2, momentum_ptr, group_width, n_running,
                           scale_ptr, shift_ptr, C, BATCH: tl.constexpr, HAS_GAMMA: tl.constexpr,
                           HAS_BETA: tl.constexpr, RUNNING: tl.constexpr, COUNT: tl.constexpr,
                           BLOCK_C: tl.constexpr, A: tl.constexpr):
    """Mean, biased variance and 1/std in float64 (:func:`_bn_stats`), and the affine
    scale = gamma/std, shift = beta - mean scale in A; with RUNNING the running statistics
    updated (:func:`_running_groups`)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < C
    mean, var, invstd = _bn_stats(part_ptr, n_parts, count, ref_ptr, rmean_ptr, rvar_ptr,
                                  eps_ptr, C, cols, cm, BATCH, BLOCK_C)
    scale, shift = _bn_affine(gamma_ptr, beta_ptr, mean, invstd, cols, cm, HAS_GAMMA, HAS_BETA)
    tl.store(mean_ptr + cols, mean, mask=cm)
    tl.store(var_ptr + cols, var, mask=cm)
    tl.store(invstd_ptr + cols, invstd, mask=cm)
    tl.store(scale_ptr + cols, scale.to(A), mask=cm)
    tl.store(shift_ptr + cols, shift.to(A), mask=cm)
    if RUNNING > 0:
        _running_groups(rm0, rv0, rc0, rm1, rv1, rc1, rm2, rv2, rc2, mean, var, cols, cm,
                        group_width, momentum_ptr, n_running, RUNNING, COUNT)


@triton.jit
def bn_affine_kernel(gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, C,
                     HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK_C: tl.constexpr,
                     A: tl.constexpr):
    """scale = gamma / std, shift = beta - mean scale (float64, stored in A), from the mean and
    1/std the forward pass kept."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < C
    invstd = tl.load(invstd_ptr + cols, mask=cm, other=0.0)
    mean = tl.load(mean_ptr + cols, mask=cm, other=0.0)
    scale, shift = _bn_affine(gamma_ptr, beta_ptr, mean, invstd, cols, cm, HAS_GAMMA, HAS_BETA)
    tl.store(scale_ptr + cols, scale.to(A), mask=cm)
    tl.store(shift_ptr + cols, shift.to(A), mask=cm)


@triton.jit
def _running_store(rmean_ptr, rvar_ptr, count_ptr, mean, var, cols, cm, lo, width, momentum_ptr,
                   n, COUNT: tl.constexpr):
    """nn.BatchNorm's update of the buffers of channels [lo, lo + width) (the batch statistics
    ``mean``/``var`` of ``cols``, float64): running = (1 - m) running + m batch, the variance
    unbiased, in the buffers' type; and with COUNT the batch counter + 1 (by the program whose
    block holds channel lo)."""
    T = rmean_ptr.dtype.element_ty
    gm = cm & (cols >= lo) & (cols < lo + width)
    at = cols - lo
    momentum = tl.load(momentum_ptr)  # float64 (a scalar argument would be float32)
    keep = 1.0 - momentum
    unbias = tl.cast(n, tl.float64) / tl.cast(tl.maximum(n - 1, 1), tl.float64)  # as Python
    rm = tl.load(rmean_ptr + at, mask=gm, other=0.0)
    tl.store(rmean_ptr + at, rm * keep.to(T) + mean.to(T) * momentum.to(T), mask=gm)
    rv = tl.load(rvar_ptr + at, mask=gm, other=0.0)
    tl.store(rvar_ptr + at, rv * keep.to(T) + (var * unbias).to(T) * momentum.to(T), mask=gm)
    if COUNT:
        if tl.max(tl.where(cols == lo, 1, 0), axis=0) == 1:
            tl.store(count_ptr, tl.load(count_ptr) + 1)


@triton.jit
def _running_groups(rm0, rv0, rc0, rm1, rv1, rc1, rm2, rv2, rc2, mean, var, cols, cm, width,
                    momentum_ptr, n, GROUPS: tl.constexpr, COUNT: tl.constexpr):
    """:func:`_running_store` for 1 to 3 BatchNorms side by side on the channels (a stacked
    projection), ``width`` channels each, with buffers (rm_i, rv_i, rc_i)."""
    _running_store(rm0, rv0, rc0, mean, var, cols, cm, 0, width, momentum_ptr, n, COUNT)
    if GROUPS > 1:
        _running_store(rm1, rv1, rc1, mean, var, cols, cm, width, width, momentum_ptr, n, COUNT)
    if GROUPS > 2:
        _running_store(rm2, rv2, rc2, mean, var, cols, cm, 2 * width, width, momentum_ptr, n,
                       COUNT)


@triton.jit
def running_update_kernel(rmean_ptr, rvar_ptr, count_ptr, mean_ptr, var_ptr, momentum_ptr, n, C,
                          COUNT: tl.constexpr, BLOCK_C: tl.constexpr):
    """:func:`_running_store` of one BatchNorm, from the statistics another kernel wrote."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < C
    _running_store(rmean_ptr, rvar_ptr, count_ptr, tl.load(mean_ptr + cols, mask=cm, other=0.0),
                   tl.load(var_ptr + cols, mask=cm, other=0.0), cols, cm, 0, C, momentum_ptr,
                   n, COUNT)


# --------------------------------------------------------------------------------------------
# BN affine + LIF (no pool)
@triton.jit
def _store_bits(bits_ptr, fired, t, rows, r1, C, MC, BLOCK_R: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """A tile of spikes as bits, 8 channels a byte (bit i: channel 8j + i), where the flat
    [steps, M, C] layout puts them (C a multiple of 8)."""
    grouped = tl.reshape(fired.to(tl.int32), (BLOCK_R, BLOCK_C // 8, 8))
    weights = tl.full([8], 1, tl.int32) << tl.arange(0, 8)
    byte = tl.sum(grouped * weights[None, None, :], axis=2)
    bcols = tl.program_id(1) * (BLOCK_C // 8) + tl.arange(0, BLOCK_C // 8)
    bm = (rows < r1)[:, None] & (bcols < C // 8)[None, :]
    tl.store(bits_ptr + t * (MC // 8) + rows[:, None] * (C // 8) + bcols[None, :],
             byte.to(tl.uint8), mask=bm)


@triton.jit
def bn_lif_fwd_kernel(y_ptr, s_ptr, bits_ptr, scale_ptr, shift_ptr, part_ptr, n_parts, count,
                      ref_ptr, rmean_ptr, rvar_ptr, gamma_ptr, beta_ptr, eps_ptr, mean_ptr,
                      var_ptr, invstd_ptr, rm0, rv0, rc0, rm1, rv1, rc1, rm2, rv2, rc2,
                      momentum_ptr, group_width, n_running, steps, M, C, y_step, rows_per_prog,
                      tau, inv_tau, v_th, AFFINE: tl.constexpr, FROM_BN: tl.constexpr,
                      BATCH: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                      RUNNING: tl.constexpr, COUNT: tl.constexpr, BITS: tl.constexpr, EXACT: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, A: tl.constexpr):
    """Spikes of LIF(y scale + shift) over rows [p rows_per_prog, ...) and a block of channels,
    and with BITS the same spikes packed (the compact copy the backward pass keeps, written here
    instead of read back by a packing pass). With FROM_BN the affine is BatchNorm's, from the
    statistics pass's partial sums (BATCH) or the running statistics, and the first row of
    programs writes mean, var and 1/std, and with RUNNING (1 to 3 BatchNorms of group_width
    channels) updates their running statistics (:func:`_running_groups`)."""
    p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < C
    if FROM_BN:
        mean, var, invstd = _bn_stats(part_ptr, n_parts, count, ref_ptr, rmean_ptr, rvar_ptr,
                                      eps_ptr, C, cols, cm, BATCH, BLOCK_C)
        scale, shift = _bn_affine(gamma_ptr, beta_ptr, mean, invstd, cols, cm, HAS_GAMMA,
                                  HAS_BETA)
        if p == 0:
            tl.store(mean_ptr + cols, mean, mask=cm)
            tl.store(var_ptr + cols, var, mask=cm)
            tl.store(invstd_ptr + cols, invstd, mask=cm)
            if RUNNING > 0:
                _running_groups(rm0, rv0, rc0, rm1, rv1, rc1, rm2, rv2, rc2, mean, var, cols, cm,
                                group_width, momentum_ptr, n_running, RUNNING, COUNT)
        sc = scale.to(A)[None, :]
        sh = shift.to(A)[None, :]
    else:
        sc = tl.load(scale_ptr + cols, mask=cm, other=0.0)[None, :] if AFFINE else None
        sh = tl.load(shift_ptr + cols, mask=cm, other=0.0)[None, :] if AFFINE else None
    MC = M * C
    r0 = p.to(tl.int64) * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, M)
    for r in range(r0, r1, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R).to(tl.int64)
        m = (rows < r1)[:, None] & cm[None, :]
        offs = rows[:, None] * C + cols[None, :]
        v = tl.zeros([BLOCK_R, BLOCK_C], A)
        for t in range(0, steps):
            y = tl.load(y_ptr + t * y_step + offs, mask=m, other=0.0).to(A)
            h, fired, v = _charge(_affine(y, sc, sh, AFFINE), v, tau, inv_tau, v_th, EXACT)
            tl.store(s_ptr + t * MC + offs, fired.to(s_ptr.dtype.element_ty), mask=m)
            if BITS:
                _store_bits(bits_ptr, fired, t, rows, r1, C, MC, BLOCK_R, BLOCK_C)


@triton.jit
def bn_lif_bwd_kernel(gs_ptr, y_ptr, out_ptr, part_ptr, scale_ptr, shift_ptr, gamma_ptr, beta_ptr,
                      mean_ptr, invstd_ptr, sums_ptr, n_sums, n, rep, g_gamma_ptr, g_beta_ptr,
                      bias_part_ptr, done_ptr, g_bias_ptr,
                      M, C, y_step, rows_per_prog, tau, inv_tau, v_th, alpha, decay,
                      STEPS: tl.constexpr, BCAST: tl.constexpr, AFFINE: tl.constexpr,
                      FROM_BN: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                      SUMS: tl.constexpr, WRITE: tl.constexpr, APPLY: tl.constexpr,
                      FULL_BN: tl.constexpr, WANT_GAMMA: tl.constexpr, WANT_BETA: tl.constexpr,
                      NEED_Y: tl.constexpr, BIAS: tl.constexpr, EXACT: tl.constexpr,
                      DETACH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                      A: tl.constexpr):
    """Backward of bn_lif_fwd over rows [p rows_per_prog, ...) and a block of channels.

    The charges are recomputed from y: Z = y scale + shift (AFFINE), with scale and shift given,
    or (FROM_BN) computed here from BatchNorm's gamma, beta, mean and 1/std. Per element, g_Z
    (summed over the steps with BCAST) is
    * with SUMS: added into part[p] = [sum g_Z, sum g_Z y] per channel (float64 per tile);
    * with WRITE: written to out, as g_Z (APPLY off: the arithmetic type), or as the BatchNorm
      input gradient a g_Z (+ b (y - mu) + d with FULL_BN) in out's type, its coefficients
      from the first pass's partial sums (sums, n_sums programs), of which the first row of
      programs also writes the gradients of gamma and beta; and with BIAS the gradient of the
      convolution's bias, the column sums of what was written (:func:`_finish_column_sums`).
    """
    p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < C
    if FROM_BN:
        mean = tl.load(mean_ptr + cols, mask=cm, other=0.0)
        invstd = tl.load(invstd_ptr + cols, mask=cm, other=0.0)
        scale, shift = _bn_affine(gamma_ptr, beta_ptr, mean, invstd, cols, cm, HAS_GAMMA,
                                  HAS_BETA)
        sc = scale.to(A)[None, :]
        sh = shift.to(A)[None, :]
    else:
        mean = None  # (APPLY comes with FROM_BN)
        invstd = None
        scale = None
        sc = tl.load(scale_ptr + cols, mask=cm, other=0.0)[None, :] if AFFINE else None
        sh = tl.load(shift_ptr + cols, mask=cm, other=0.0)[None, :] if AFFINE else None
    ca, cb, cmu, cd = _apply_coefficients(sums_ptr, n_sums, mean, invstd, scale, n, rep,
                                          g_gamma_ptr, g_beta_ptr, C, cols, cm, APPLY,
                                          WANT_GAMMA, WANT_BETA, FULL_BN, BLOCK_C, A)
    s1 = tl.zeros([BLOCK_C], tl.float64)
    s2 = tl.zeros([BLOCK_C], tl.float64)
    s_bias = tl.zeros([BLOCK_C], tl.float64)
    MC = M * C
    r0 = p.to(tl.int64) * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, M)
    for r in range(r0, r1, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R).to(tl.int64)
        m = (rows < r1)[:, None] & cm[None, :]
        offs = rows[:, None] * C + cols[None, :]
        v = tl.zeros([BLOCK_R, BLOCK_C], A)
        t_bias = tl.zeros([BLOCK_R, BLOCK_C], A)
        hs = ()
        for t in tl.static_range(STEPS):
            y = tl.load(y_ptr + t * y_step + offs, mask=m, other=0.0).to(A)
            h, fired, v = _charge(_affine(y, sc, sh, AFFINE), v, tau, inv_tau, v_th, EXACT)
            hs = hs + (h,)
        carry = tl.zeros([BLOCK_R, BLOCK_C], A)
        acc = tl.zeros([BLOCK_R, BLOCK_C], A)
        t1 = tl.zeros([BLOCK_R, BLOCK_C], A)
        t2 = tl.zeros([BLOCK_R, BLOCK_C], A)
        for t in tl.static_range(STEPS - 1, -1, -1):
            g_s = tl.load(gs_ptr + t * MC + offs, mask=m, other=0.0).to(A)
            g, carry = _grad(g_s, hs[t], carry, tau, inv_tau, v_th, alpha, decay, EXACT, DETACH)
            yt = tl.load(y_ptr + t * y_step + offs, mask=m, other=0.0).to(A) if NEED_Y else None
            if SUMS:  # per step, as the CPU kernel sums (also when the steps share one y)
                t1 += g
                t2 += g * yt
            if BCAST:
                acc += g
            elif WRITE:
                o = _bn_input_grad(g, yt, ca, cb, cmu, cd, APPLY,
                                   FULL_BN).to(out_ptr.dtype.element_ty)
                tl.store(out_ptr + t * MC + offs, o, mask=m)
                if BIAS:
                    t_bias += tl.where(m, o.to(A), 0.0)
        if BCAST and WRITE:
            yt = tl.load(y_ptr + offs, mask=m, other=0.0).to(A) if NEED_Y else None
            o = _bn_input_grad(acc, yt, ca, cb, cmu, cd, APPLY,
                               FULL_BN).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + offs, o, mask=m)
            if BIAS:
                t_bias += tl.where(m, o.to(A), 0.0)
        if SUMS:
            s1 += tl.sum(tl.where(m, t1, 0.0), axis=0).to(tl.float64)
            s2 += tl.sum(tl.where(m, t2, 0.0), axis=0).to(tl.float64)
        if BIAS:
            s_bias += tl.sum(t_bias, axis=0).to(tl.float64)
    if SUMS:
        _store_parts(part_ptr, p, C, cols, cm, s1, s2)
    if BIAS:
        _finish_column_sums(bias_part_ptr, done_ptr, g_bias_ptr, s_bias, C, cols, cm,
                            out_ptr.dtype.element_ty)


# --------------------------------------------------------------------------------------------
# BN affine -> MaxPool2d(3, 2, 1) -> LIF
@triton.jit
def _window_max(y_ptr, base, oh, ow, H, W, C, sc, sh, m, AFFINE: tl.constexpr, A: tl.constexpr):
    """Max of the affine map over the 3x3 window (stride 2, padding 1) and its position in it
    (0..8, row-major): the first of equal values, NaN winning, as torch's max_pool2d."""
    best = tl.full(oh.shape, float("-inf"), A)
    arg = tl.zeros(oh.shape, tl.int32)
    first = tl.full(oh.shape, 1, tl.int1)
    for k in tl.static_range(9):
        ih = 2 * oh - 1 + k // 3
        iw = 2 * ow - 1 + k % 3
        inside = m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        z = _affine(tl.load(y_ptr + base + (ih * W + iw) * C, mask=inside, other=0.0).to(A),
                    sc, sh, AFFINE)
        take = inside & (first | (z > best) | (z != z))
        best = tl.where(take, z, best)
        arg = tl.where(take, k, arg)
        first = first & ~inside
    return tl.where(m, best, 0.0), arg


@triton.jit
def bn_pool_lif_fwd_kernel(y_ptr, s_ptr, scale_ptr, shift_ptr, steps, B, H, W, C, Ho, Wo, y_step,
                           tau, inv_tau, v_th, AFFINE: tl.constexpr, EXACT: tl.constexpr,
                           BLOCK: tl.constexpr, A: tl.constexpr):
    offs, m, b, oh, ow, c = _pooled_outputs(B, Ho, Wo, C, BLOCK)
    n_out = B * Ho * Wo * C
    sc = tl.load(scale_ptr + c, mask=m, other=0.0) if AFFINE else None
    sh = tl.load(shift_ptr + c, mask=m, other=0.0) if AFFINE else None
    v = tl.zeros([BLOCK], A)
    for t in range(0, steps):
        z, _ = _window_max(y_ptr, t * y_step + b * H * W * C + c, oh, ow, H, W, C, sc, sh, m,
                           AFFINE, A)
        h, fired, v = _charge(z, v, tau, inv_tau, v_th, EXACT)
        tl.store(s_ptr + t * n_out + offs, fired.to(s_ptr.dtype.element_ty), mask=m)


@triton.jit
def pool_lif_bwd_kernel(gs_ptr, y_ptr, gp_ptr, arg_ptr, scale_ptr, shift_ptr, B, H, W, C, Ho, Wo,
                        y_step, tau, inv_tau, v_th, alpha, decay, STEPS: tl.constexpr,
                        AFFINE: tl.constexpr, EXACT: tl.constexpr, DETACH: tl.constexpr,
                        BLOCK: tl.constexpr, A: tl.constexpr):
    """First half of the pooled backward, per pooled output: the LIF's g_Z of the pooled map
    into gp [steps, B, Ho, Wo, C] (A) and the window position of each max into arg (int8)."""
    offs, m, b, oh, ow, c = _pooled_outputs(B, Ho, Wo, C, BLOCK)
    n_out = B * Ho * Wo * C
    sc = tl.load(scale_ptr + c, mask=m, other=0.0) if AFFINE else None
    sh = tl.load(shift_ptr + c, mask=m, other=0.0) if AFFINE else None
    v = tl.zeros([BLOCK], A)
    hs = ()
    for t in tl.static_range(STEPS):
        z, arg = _window_max(y_ptr, t * y_step + b * H * W * C + c, oh, ow, H, W, C, sc, sh, m,
                             AFFINE, A)
        tl.store(arg_ptr + t * n_out + offs, arg.to(tl.int8), mask=m)
        h, fired, v = _charge(z, v, tau, inv_tau, v_th, EXACT)
        hs = hs + (h,)
    carry = tl.zeros([BLOCK], A)
    for t in tl.static_range(STEPS - 1, -1, -1):
        g_s = tl.load(gs_ptr + t * n_out + offs, mask=m, other=0.0).to(A)
        g, carry = _grad(g_s, hs[t], carry, tau, inv_tau, v_th, alpha, decay, EXACT, DETACH)
        tl.store(gp_ptr + t * n_out + offs, g, mask=m)


@triton.jit
def pool_scatter_kernel(gp_ptr, arg_ptr, y_ptr, out_ptr, part_ptr, sums_ptr, n_sums, mean_ptr,
                        invstd_ptr, gamma_ptr, n, rep, g_gamma_ptr, g_beta_ptr, B, H, W, C, Ho,
                        Wo, y_step, rows_per_prog, STEPS: tl.constexpr, BCAST: tl.constexpr,
                        SUMS: tl.constexpr, WRITE: tl.constexpr, APPLY: tl.constexpr,
                        FULL_BN: tl.constexpr, HAS_GAMMA: tl.constexpr,
                        WANT_GAMMA: tl.constexpr, WANT_BETA: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, A: tl.constexpr):
    """Second half, per pre-pool element (rows = (b, ih, iw)): g_Z, the sum of the pooled
    gradients whose max it was, gathered from the (at most 2 x 2) windows that hold it in
    ascending window order (the order in which a scatter over the windows adds them), per step
    ([steps, B, H, W, C]; summed over the steps with BCAST, steps descending within each
    window). With SUMS the per-channel [sum g_Z, sum g_Z y] of this program into part[p]; with
    WRITE g_Z written to out, or with APPLY the BatchNorm input gradient a g_Z (+ b (y - mu) + d
    with FULL_BN) in out's type, its coefficients from the sums pass's partial sums (sums,
    n_sums programs): the gather is done again rather than g_Z kept between the passes."""
    p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < C
    R = B * H * W
    n_out = B * Ho * Wo * C
    mean = tl.load(mean_ptr + cols, mask=cm, other=0.0) if APPLY else None
    invstd = tl.load(invstd_ptr + cols, mask=cm, other=0.0) if APPLY else None
    scale = (_bn_affine(gamma_ptr, gamma_ptr, mean, invstd, cols, cm, HAS_GAMMA, False)[0]
             if APPLY else None)
    ca, cb, cmu, cd = _apply_coefficients(sums_ptr, n_sums, mean, invstd, scale, n, rep,
                                          g_gamma_ptr, g_beta_ptr, C, cols, cm, APPLY,
                                          WANT_GAMMA, WANT_BETA, FULL_BN, BLOCK_C, A)
    s1 = tl.zeros([BLOCK_C], tl.float64)
    s2 = tl.zeros([BLOCK_C], tl.float64)
    r0 = p.to(tl.int64) * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, R)
    for r in range(r0, r1, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R).to(tl.int64)
        rm = rows < r1
        m = rm[:, None] & cm[None, :]
        iw = (rows % W)[:, None]
        ih = ((rows // W) % H)[:, None]
        b = (rows // (W * H))[:, None]
        oh0 = ih // 2  # the windows holding row ih: oh0, and oh0 + 1 when ih is odd
        ow0 = iw // 2
        t1 = tl.zeros([BLOCK_R, BLOCK_C], A)
        t2 = tl.zeros([BLOCK_R, BLOCK_C], A)
        for tt in tl.static_range(1 if BCAST else STEPS):
            g = tl.zeros([BLOCK_R, BLOCK_C], A)
            for k in tl.static_range(4):
                oh = oh0 + k // 2
                ow = ow0 + k % 2
                ok = m & (oh < Ho) & (ow < Wo) & ((k // 2 == 0) | (ih % 2 == 1)) \
                    & ((k % 2 == 0) | (iw % 2 == 1))
                pos = ((ih - (2 * oh - 1)) * 3 + (iw - (2 * ow - 1))).to(tl.int8)
                o = ((b * Ho + oh) * Wo + ow) * C + cols[None, :]
                if BCAST:
                    for t in tl.static_range(STEPS - 1, -1, -1):
                        hit = ok & (tl.load(arg_ptr + t * n_out + o, mask=ok, other=-1) == pos)
                        g += tl.where(hit, tl.load(gp_ptr + t * n_out + o, mask=hit, other=0.0),
                                      0.0)
                else:
                    hit = ok & (tl.load(arg_ptr + tt * n_out + o, mask=ok, other=-1) == pos)
                    g += tl.where(hit, tl.load(gp_ptr + tt * n_out + o, mask=hit, other=0.0),
                                  0.0)
            out = rows[:, None] * C + cols[None, :]
            y = (tl.load(y_ptr + tt * y_step + out, mask=m, other=0.0).to(A)
                 if SUMS or FULL_BN else None)
            if WRITE:
                tl.store(out_ptr + tt * R * C + out,
                         _bn_input_grad(g, y, ca, cb, cmu, cd, APPLY,
                                        FULL_BN).to(out_ptr.dtype.element_ty), mask=m)
            if SUMS:
                t1 += g
                t2 += g * y
        if SUMS:
            s1 += tl.sum(tl.where(m, t1, 0.0), axis=0).to(tl.float64)
            s2 += tl.sum(tl.where(m, t2, 0.0), axis=0).to(tl.float64)
    if SUMS:
        _store_parts(part_ptr, p, C, cols, cm, s1, s2)


# --------------------------------------------------------------------------------------------
# compact storage: element i in bit i % 8 of byte i // 8; a device flag counts what did not fit
@triton.jit
def to_bits_kernel(x_ptr, out_ptr, flag_ptr, n, BLOCK: tl.constexpr, A: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    k = tl.arange(0, 8)
    idx = j[:, None] * 8 + k[None, :]
    m = idx < n
    x = tl.load(x_ptr + idx, mask=m, other=0.0).to(A)  # exact: A is at least as wide
    one = x == 1.0
    bad = m & ~(one | (x == 0.0))
    byte = tl.sum(tl.where(one & m, 1 << k[None, :], 0), axis=1)
    tl.store(out_ptr + j, byte.to(tl.uint8), mask=j * 8 < n)
    tl.atomic_max(flag_ptr, tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0))


@triton.jit
def from_bits_kernel(in_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    byte = tl.load(in_ptr + offs // 8, mask=m, other=0).to(tl.int32)
    bit = (byte >> (offs % 8).to(tl.int32)) & 1
    # through float32: the interpreter converts integers to bfloat16 bit for bit
    tl.store(out_ptr + offs, bit.to(tl.float32).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _store_u8(x, offs, m, out_ptr, flag_ptr):
    """x (in A) as bytes; the flag raised where a value is not an integer 0-255."""
    low = tl.where(x > 0.0, x, 0.0)  # NaN -> 0, then flagged
    q = tl.where(low < 255.0, low, 255.0).to(tl.int32)
    bad = m & (q.to(x.dtype) != x)
    tl.store(out_ptr + offs, q.to(tl.uint8), mask=m)
    tl.atomic_max(flag_ptr, tl.max(bad.to(tl.int32), axis=0))


@triton.jit
def to_u8_kernel(x_ptr, out_ptr, flag_ptr, n, BLOCK: tl.constexpr, A: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    _store_u8(tl.load(x_ptr + offs, mask=m, other=0.0).to(A), offs, m, out_ptr, flag_ptr)


@triton.jit
def add_u8_kernel(a_ptr, b_ptr, out_ptr, u8_ptr, flag_ptr, n, BLOCK: tl.constexpr,
                  A: tl.constexpr):
    """out = a + b (rounded to out's type, as torch adds), and out as bytes (to_u8_kernel's):
    a residual sum of spike counts, packed for the unit that takes it as its input."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    s = (tl.load(a_ptr + offs, mask=m, other=0.0).to(A)
         + tl.load(b_ptr + offs, mask=m, other=0.0).to(A)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, s, mask=m)
    _store_u8(s.to(A), offs, m, u8_ptr, flag_ptr)


@triton.jit
def from_u8_kernel(in_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    v = tl.load(in_ptr + offs, mask=m, other=0).to(tl.float32)  # (see from_bits_kernel)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------
# Q-K token attention (QKTA): per head, Q summed over its channels -> LIF -> mask of K
@triton.jit
def qk_token_fwd_kernel(qk_ptr, out_ptr, qs_ptr, R, C, H, D, tau, inv_tau, v_th,
                        STEPS: tl.constexpr, EXACT: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_D: tl.constexpr, A: tl.constexpr):
    """qk [steps, R, 2C] (q | k spikes), rows R = B N, head j = program_id(1) of H heads of D
    channels: out [steps, R, C] = LIF(sum_d q) * k per head, and the sums qs [steps, R, H] (in A)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    m = (rows < R)[:, None] & (d < D)[None, :]
    cols = j * D + d
    v = tl.zeros([BLOCK_R], A)
    for t in range(0, STEPS):
        base = (t * R + rows)[:, None]
        q = tl.load(qk_ptr + base * 2 * C + cols[None, :], mask=m, other=0.0).to(A)
        qs = tl.sum(q, axis=1)  # sums of spikes: exact in any order
        tl.store(qs_ptr + (t * R + rows) * H + j, qs, mask=rows < R)
        h, fired, v = _charge(qs, v, tau, inv_tau, v_th, EXACT)
        k = tl.load(qk_ptr + base * 2 * C + C + cols[None, :], mask=m, other=0.0).to(A)
        tl.store(out_ptr + base * C + cols[None, :],
                 (fired[:, None] * k).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def qk_token_bwd_kernel(g_ptr, k_ptr, qs_ptr, out_ptr, R, C, H, D, tau, inv_tau, v_th, alpha,
                        decay, STEPS: tl.constexpr, EXACT: tl.constexpr, DETACH: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, A: tl.constexpr):
    """Backward of qk_token_fwd_kernel: g [steps, R, C], k [steps, R, C], qs [steps, R, H] ->
    out [steps, R, 2C] = [g_q | g_k]: g_k = LIF(qs) g, and g_q the LIF gradient of qs (from
    sum_d g k) on each channel of the head."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    rm = rows < R
    m = rm[:, None] & (d < D)[None, :]
    cols = j * D + d
    v = tl.zeros([BLOCK_R], A)
    hs = ()
    for t in tl.static_range(STEPS):
        qs = tl.load(qs_ptr + (t * R + rows) * H + j, mask=rm, other=0.0)
        h, fired, v = _charge(qs, v, tau, inv_tau, v_th, EXACT)
        hs = hs + (h,)
    carry = tl.zeros([BLOCK_R], A)
    for t in tl.static_range(STEPS - 1, -1, -1):
        base = (t * R + rows)[:, None]
        g = tl.load(g_ptr + base * C + cols[None, :], mask=m, other=0.0).to(A)
        k = tl.load(k_ptr + base * C + cols[None, :], mask=m, other=0.0).to(A)
        g_qs, carry = _grad(tl.sum(g * k, axis=1), hs[t], carry, tau, inv_tau, v_th, alpha, decay,
                            EXACT, DETACH)
        a = tl.where(hs[t] >= v_th, 1.0, 0.0)[:, None]
        g_q = tl.zeros([BLOCK_R, BLOCK_D], A) + g_qs[:, None]
        tl.store(out_ptr + base * 2 * C + cols[None, :], g_q.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(out_ptr + base * 2 * C + C + cols[None, :], (a * g).to(out_ptr.dtype.element_ty),
                 mask=m)


# --------------------------------------------------------------------------------------------
# Spikformer's SSA core: per head, LIF((q (kᵀ v)) scale), read from and written to token-major
# layouts (no head-major copies). Products of spikes are integer sums, exact in any order and
# in TF32; those with a gradient are float32 products (IEEE, as torch's float32 GEMMs).
# Program (b, head, block of tokens); kᵀ v needs every token, so each program sums it over all
# blocks itself (re-reading k and v, which stay in cache) rather than exchanging it.
@triton.jit
def _ssa_tile(qkv_ptr, t, b, B, N, C, col0, n, d, D, which: tl.constexpr, A: tl.constexpr):
    """q (which 0), k (1) or v (2) of head columns col0 + d, step t, batch b, tokens n:
    [BLOCK_N, BLOCK_D] in A; and the tokens' rows of the [steps, B, N] layout."""
    rows = (t * B + b).to(tl.int64) * N + n
    m = (n < N)[:, None] & (d < D)[None, :]
    ptr = qkv_ptr + rows[:, None] * 3 * C + which * C + (col0 + d)[None, :]
    return tl.load(ptr, mask=m, other=0.0).to(A), rows, m


@triton.jit
def _exact_dot(a, b, A: tl.constexpr):
    """a b for operands holding integers up to 2048 (spikes, kᵀ v of at most 2048 tokens):
    exact in TF32 (tensor cores), accumulated in A; float64 in float64."""
    if A == tl.float64:
        return tl.dot(a, b, input_precision="ieee", out_dtype=A)
    else:
        return tl.dot(a, b, input_precision="tf32", out_dtype=A)


@triton.jit
def _ssa_kv(qkv_ptr, t, b, B, N, C, col0, d, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            A: tl.constexpr):
    """kᵀ v of one head at step t, over all tokens: [BLOCK_D, BLOCK_D] in A."""
    kv = tl.zeros([BLOCK_D, BLOCK_D], A)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        k, _, _ = _ssa_tile(qkv_ptr, t, b, B, N, C, col0, n, d, D, 1, A)
        v, _, _ = _ssa_tile(qkv_ptr, t, b, B, N, C, col0, n, d, D, 2, A)
        kv += _exact_dot(tl.trans(k), v, A)
    return kv


@triton.jit
def ssa_fwd_kernel(qkv_ptr, out_ptr, scale_ptr, B, N, C, D, tau, inv_tau, v_th,
                   STEPS: tl.constexpr, EXACT: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, A: tl.constexpr):
    """qkv [steps, B, N, 3C] (q | k | v spikes), program (b, head of D channels, block of
    tokens): out [steps, B, N, C] = LIF((q (kᵀ v)) scale) over the steps."""
    b = tl.program_id(0)
    col0 = tl.program_id(1) * D
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    scale = tl.load(scale_ptr).to(A)
    v_mem = tl.zeros([BLOCK_N, BLOCK_D], A)
    for t in range(0, STEPS):
        kv = _ssa_kv(qkv_ptr, t, b, B, N, C, col0, d, D, BLOCK_N, BLOCK_D, A)
        q, rows, m = _ssa_tile(qkv_ptr, t, b, B, N, C, col0, n, d, D, 0, A)
        x = _exact_dot(q, kv, A) * scale
        h, fired, v_mem = _charge(x, v_mem, tau, inv_tau, v_th, EXACT)
        tl.store(out_ptr + rows[:, None] * C + (col0 + d)[None, :],
                 fired.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _ssa_store_kv_grads(qkv_ptr, out_ptr, g_kv, t, b, B, N, C, col0, n, d, D, A: tl.constexpr):
    """g_k = v g_kvᵀ and g_v = k g_kv of a block of tokens into out's k and v columns."""
    k, rows, m = _ssa_tile(qkv_ptr, t, b, B, N, C, col0, n, d, D, 1, A)
    v, _, _ = _ssa_tile(qkv_ptr, t, b, B, N, C, col0, n, d, D, 2, A)
    base = out_ptr + rows[:, None] * 3 * C + (col0 + d)[None, :]
    T = out_ptr.dtype.element_ty
    tl.store(base + C, tl.dot(v, tl.trans(g_kv), input_precision="ieee", out_dtype=A).to(T),
             mask=m)
    tl.store(base + 2 * C, tl.dot(k, g_kv, input_precision="ieee", out_dtype=A).to(T), mask=m)


@triton.jit
def ssa_bwd_kernel(g_ptr, qkv_ptr, out_ptr, part_ptr, scale_ptr, B, N, C, D, n_blocks, tau,
                   inv_tau, v_th, alpha, decay, STEPS: tl.constexpr, EXACT: tl.constexpr,
                   DETACH: tl.constexpr, WHOLE: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, A: tl.constexpr):
    """Backward of ssa_fwd_kernel: g [steps, B, N, C] -> out [steps, B, N, 3C] = [g_q | g_k |
    g_v]. The charges are recomputed (integer scores, so exactly); with G = g_X scale:
    g_q = G (kᵀ v)ᵀ, g_kv = qᵀ G, g_k = v g_kvᵀ, g_v = k g_kv. g_kv sums over every token:
    with WHOLE (one block holds them all) this program finishes; otherwise it writes its
    block's share of g_kv into part [B, heads, n_blocks, steps, D, D] (A) and
    ssa_bwd_kv_kernel finishes."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    col0 = j * D
    blk = tl.program_id(2)
    n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    scale = tl.load(scale_ptr).to(A)
    v_mem = tl.zeros([BLOCK_N, BLOCK_D], A)
    hs = ()
    for t in tl.static_range(STEPS):
        kv = _ssa_kv(qkv_ptr, t, b, B, N, C, col0, d, D, BLOCK_N, BLOCK_D, A)
        q, rows, m = _ssa_tile(qkv_ptr, t, b, B, N, C, col0, n, d, D, 0, A)
        h, fired, v_mem = _charge(_exact_dot(q, kv, A) * scale,
                                  v_mem, tau, inv_tau, v_th, EXACT)
        hs = hs + (h,)
    carry = tl.zeros([BLOCK_N, BLOCK_D], A)
    for t in tl.static_range(STEPS - 1, -1, -1):
        kv = _ssa_kv(qkv_ptr, t, b, B, N, C, col0, d, D, BLOCK_N, BLOCK_D, A)
        q, rows, m = _ssa_tile(qkv_ptr, t, b, B, N, C, col0, n, d, D, 0, A)
        g_s = tl.load(g_ptr + rows[:, None] * C + (col0 + d)[None, :], mask=m, other=0.0).to(A)
        g_x, carry = _grad(g_s, hs[t], carry, tau, inv_tau, v_th, alpha, decay, EXACT, DETACH)
        gh = tl.where(m, g_x * scale, 0.0)
        tl.store(out_ptr + rows[:, None] * 3 * C + (col0 + d)[None, :],
                 tl.dot(gh, tl.trans(kv), input_precision="ieee",
                        out_dtype=A).to(out_ptr.dtype.element_ty), mask=m)
        g_kv = tl.dot(tl.trans(q), gh, input_precision="ieee", out_dtype=A)
        if WHOLE:
            _ssa_store_kv_grads(qkv_ptr, out_ptr, g_kv, t, b, B, N, C, col0, n, d, D, A)
        else:
            base = (((b * tl.num_programs(1) + j) * n_blocks + blk) * STEPS + t).to(tl.int64)
            tl.store(part_ptr + base * D * D + d[:, None] * D + d[None, :], g_kv,
                     mask=(d < D)[:, None] & (d < D)[None, :])


@triton.jit
def ssa_bwd_kv_kernel(qkv_ptr, out_ptr, part_ptr, B, N, C, D, n_blocks, STEPS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, A: tl.constexpr):
    """Second half of ssa_bwd_kernel for heads split over blocks of tokens: g_kv summed over
    the blocks in block order, then g_k and g_v of this program's block."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    col0 = j * D
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    tile = d[:, None] * D + d[None, :]
    tm = (d < D)[:, None] & (d < D)[None, :]
    for t in range(0, STEPS):
        g_kv = tl.zeros([BLOCK_D, BLOCK_D], A)
        for p in range(0, n_blocks):
            base = (((b * tl.num_programs(1) + j) * n_blocks + p) * STEPS + t).to(tl.int64)
            g_kv += tl.load(part_ptr + base * D * D + tile, mask=tm, other=0.0)
        _ssa_store_kv_grads(qkv_ptr, out_ptr, g_kv, t, b, B, N, C, col0, n, d, D, A)


# --------------------------------------------------------------------------------------------
# GEMMs that take part in the unit (a measured decision on a GPU: benchmarks/gpu_gemm_fusion.py)
@triton.jit
def _gemm_operand(ptr, flat, m, PACKED: tl.constexpr, T: tl.constexpr):
    """A tile of an operand in type T: loaded as it is stored (PACKED 0), from bits (1:
    element ``flat`` is bit flat % 8 of byte flat // 8, as to_bits_kernel packs a tensor) or
    from bytes (2: counts, as to_u8_kernel packs them)."""
    if PACKED == 1:
        byte = tl.load(ptr + flat // 8, mask=m, other=0).to(tl.int32)
        bit = (byte >> (flat % 8).to(tl.int32)) & 1
        return bit.to(tl.float32).to(T)  # through float32, as from_bits_kernel
    elif PACKED == 2:
        return tl.load(ptr + flat, mask=m, other=0).to(tl.float32).to(T)
    else:
        return tl.load(ptr + flat, mask=m, other=0.0).to(T)


@triton.jit
def gemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, ref_ptr, part_ptr, I, J, K, k_per,
                sa_i, sa_k, sb_k, sb_j, A_PACKED: tl.constexpr, B_PACKED: tl.constexpr,
                BIAS: tl.constexpr, STATS: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                T: tl.constexpr, A: tl.constexpr):
    """C[I, J] = A[I, K] B[K, J] (+ bias[J]), operands in T, accumulated in A, stored in C's
    type. Operands are read through their strides (in elements), as stored or packed
    (A_PACKED/B_PACKED, see _gemm_operand: spikes and counts as compact storage keeps them, so
    no 16-bit copy is made for the product). Program (i, j, s) sums k over [s k_per, (s + 1) k_per) into C[s] (split-K for
    a long K, such as the rows of a weight gradient; the caller adds the C[s] in order). With
    STATS the epilogue also writes this program's per-column sums of d = c - ref and d^2 over
    its rows (of the stored, rounded values, as colstats_kernel reads them) to
    part[pid_i, 0:2, J]: BatchNorm's batch statistics without a pass over C."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    ri = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mi = ri < I
    mj = rj < J
    k_lo = pid_s.to(tl.int64) * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    acc = tl.zeros([BLOCK_I, BLOCK_J], A)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mk = rk < k_hi
        a = _gemm_operand(a_ptr, ri[:, None] * sa_i + rk[None, :] * sa_k,
                          mi[:, None] & mk[None, :], A_PACKED, T)
        b = _gemm_operand(b_ptr, rk[:, None] * sb_k + rj[None, :] * sb_j,
                          mk[:, None] & mj[None, :], B_PACKED, T)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee", out_dtype=A)
        elif T == tl.bfloat16:  # bfloat16 values are exact in TF32 (and the interpreter has no
            # bfloat16 product)
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32",
                          out_dtype=A)
        else:
            acc += tl.dot(a, b, out_dtype=A)
    if BIAS:
        acc += tl.load(bias_ptr + rj, mask=mj, other=0.0).to(A)[None, :]
    c = acc.to(c_ptr.dtype.element_ty)
    m = mi[:, None] & mj[None, :]
    tl.store(c_ptr + pid_s.to(tl.int64) * I * J + ri[:, None] * J + rj[None, :], c, mask=m)
    if STATS:
        ref = tl.load(ref_ptr + rj, mask=mj, other=0.0).to(A)
        d = tl.where(m, c.to(A) - ref[None, :], 0.0)
        _store_parts(part_ptr, pid_i, J, rj, mj, tl.sum(d, axis=0).to(tl.float64),
                     tl.sum(d * d, axis=0).to(tl.float64))
