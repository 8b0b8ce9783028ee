"""Figure 3b benchmark: memory/time of QKTA, QKCA and SSA vs the token count N.

Adds, for this benchmark only, "SSA qk_first": Spikformer SSA evaluated as (q·kᵀ)·v, the N x N
token-token form that the paper's Figure 3b compares against. The package's SSA evaluates
q·(kᵀ·v) like the original code, which is linear in N, so both orders are shown.

    python benchmarks/attention_cost.py [--ns 64 128 ...] [--out attention_cost/] [--device cuda]
                                        [--threads 1]
"""
from __future__ import annotations

import argparse

import torch

from qkformer.analysis.attention_cost import (DEFAULT_MODULES, DEFAULT_NS, measure_attention_cost,
                                              print_slopes, save_attention_cost)
from qkformer.attention import SpikingSelfAttention

QK_FIRST = "SSA qk_first"


def SSAQKFirst(dim, num_heads):
    """SSA with the N x N attention matrix materialised: x = ((q·kᵀ)·v)·0.125 per head."""
    return SpikingSelfAttention(dim, num_heads, kv_first=False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ns", type=int, nargs="+", default=list(DEFAULT_NS))
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); 1 gives steadier times on a busy machine")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--qk-first-max-n", type=int, default=4096,
                   help="largest N for the N x N form (its attention matrix is T*B*heads*N^2 "
                        "floats, and backward holds ~3 of them: 8192 needs ~13 GB)")
    p.add_argument("--out", default="attention_cost")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modules = {**DEFAULT_MODULES, QK_FIRST: SSAQKFirst}
    points = measure_attention_cost(modules, args.ns, args.dim, args.heads, args.T,
                                    device=args.device, repeats=args.repeats,
                                    max_n={QK_FIRST: args.qk_first_max_n}, verbose=True)
    print_slopes(points)
    n_max = max(p.N for p in points)
    at = {p.module: p for p in points if p.N == n_max}
    print(f"SSA/QKTA at N={n_max}: memory x{at['SSA'].memory_bytes / at['QKTA'].memory_bytes:.2f}, "
          f"time x{at['SSA'].time_s / at['QKTA'].time_s:.2f}")
    n_qk = max(p.N for p in points if p.module == QK_FIRST)
    at = {p.module: p for p in points if p.N == n_qk}
    qk, qkta = at[QK_FIRST], at["QKTA"]
    print(f"{QK_FIRST}/QKTA at N={n_qk}: memory x{qk.memory_bytes / qkta.memory_bytes:.2f}, "
          f"time x{qk.time_s / qkta.time_s:.2f}")
    for kind, path in save_attention_cost(points, args.out).items():
        print(f"wrote {kind}: {path}")


if __name__ == "__main__":
    main()
