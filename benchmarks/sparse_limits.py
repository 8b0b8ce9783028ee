"""The spike-driven products against the dense ones on this machine, and the limits it uses.

Prints the sparse / dense time ratio per operation and shape at each density (below 1: the
spike-driven product is faster) and the densities up to which the fast path uses them
(qkformer.sparse_limits: measured once per machine and thread count, kept beside the kernels).

    python benchmarks/sparse_limits.py [--threads 2] [--remeasure]

With ``QKFORMER_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2`` the same on the AVX2 code paths (a stand-in for an AVX2-only CPU).
"""
from __future__ import annotations

import argparse

import torch

import _common  # noqa: F401  (the repository on sys.path)
from qkformer import sparse, sparse_limits
from train_step import cpu_isa_line


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--remeasure", action="store_true", help="measure again and store the record")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    forward, weight_grad, source = sparse_limits.limits(sparse.timing_pairs,
                                                        remeasure=args.remeasure)
    print(cpu_isa_line())
    print(f"limits: {forward:.0%} forward, {weight_grad:.0%} weight gradient ({source}; "
          f"{args.threads} threads)")
    path = sparse_limits.record_path()
    record = sparse_limits._load(path) if path is not None else None
    if record is None:
        return
    print(f"sparse / dense time (measured in {record['seconds']} s) at densities "
          + " ".join(f"{d:5.2f}" for d in record["densities"]))
    for op, per in record["ratios"].items():
        for name, ratios in per.items():
            print(f"  {op:12s} {name:22s} " + " ".join(f"{r:5.2f}" for r in ratios))


if __name__ == "__main__":
    main()
