"""qkformer.cpu.memory: with the CPU entry points' allocator setting, freed large tensors stay
mapped in the heap and, once warm, later ones of their size reuse them without page faults;
without it, glibc maps each afresh and unmaps it on free.

The warm-up is glibc's: torch asks for 64-byte-aligned blocks, and the slivers glibc splits off
to align them sit between freed blocks, so the heap grows by a block now and then until enough
freed blocks exist to serve every request (2 to 8 blocks of 64 MiB within the first 9 cycles on
the project's machine; training steps settle within a few steps the same way).
"""
import os
import platform
import subprocess
import sys

import pytest

from qkformer.cpu import memory

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="glibc only")

_NUMEL = 16 * 2 ** 20  # float32: 64 MiB, above glibc's largest mmap threshold (32 MiB)
_PAGES = _NUMEL * 4 // 4096
_WARM, _STEADY = 16, 8

# allocate, touch and free a 64 MiB tensor _WARM + _STEADY times, as a training step's tensors
# of one size come and go; print the setting, then per cycle the tensor's address and page
# faults, then whether each address lay in the brk heap and is still mapped at the end
_PROBE = f"""
import resource, torch
from qkformer.cpu import memory
print(memory.setup_for("cpu"))
cycles = []
for _ in range({_WARM + _STEADY}):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty({_NUMEL})
    t.fill_(1.0)
    cycles.append((t.data_ptr(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
    del t
with open("/proc/self/maps") as f:
    maps = [(tuple(int(x, 16) for x in l.split()[0].split("-")), l.rstrip().endswith("[heap]"))
            for l in f]
for addr, faults in cycles:
    mapped = [heap for (lo, hi), heap in maps if lo <= addr < hi]
    print(addr, faults, int(any(mapped)), int(bool(mapped)))
"""


def _probe(keep: bool):
    env = dict(os.environ, **{memory.ENV: "1" if keep else "0"})
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env,
                         check=True).stdout.strip().split("\n")
    return out[0], [tuple(int(v) for v in line.split()) for line in out[1:]]


@glibc
def test_freed_memory_stays_mapped_and_is_reused_without_page_faults():
    line, cycles = _probe(keep=True)
    assert "keeps freed memory" in line
    addrs, faults, in_heap, mapped = zip(*cycles)
    assert all(in_heap), cycles  # carved from the brk heap, which is still mapped at the end
    assert set(addrs[_WARM:]) <= set(addrs[:_WARM]), cycles  # warm: only blocks seen before
    # the fewest faults of the warm cycles: a mapped page faults again only where the kernel
    # paged it out meanwhile, which it may do to any idle page, never to all of them each cycle
    assert min(faults[_WARM:]) < _PAGES // 64, cycles


@glibc
def test_default_allocator_unmaps_and_pays_the_faults_again():
    # the contrast that makes the checks above mean something
    line, cycles = _probe(keep=False)
    assert line == f"allocator: as it was ({memory.ENV}=0)"
    addrs, faults, in_heap, mapped = zip(*cycles)
    assert not any(in_heap) and not any(mapped), cycles  # its own mapping, gone on free
    assert min(faults) > _PAGES // 2, cycles  # every cycle pages it in (half: huge pages would do)


def test_setup_only_on_cpu():
    assert memory.setup_for("meta") is None
    assert memory.setup_for("cuda") is None  # a device name, nothing allocated there
