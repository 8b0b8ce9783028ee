"""qkformer.cpu.memory: the CPU entry points' allocator setting really stops the page faults."""
import os
import platform
import subprocess
import sys

import pytest

from qkformer.cpu import memory

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="glibc only")

# allocate, touch and free a 64 MiB tensor a few times; print the setting and the fewest page
# faults of five later cycles (after the first two, which page the memory in whatever the
# setting; the fewest, because this machine's kernel may page idle memory out at any time)
_PROBE = """
import resource, torch
from qkformer.cpu import memory
print(memory.setup_for("cpu"))
def cycle():
    t = torch.empty(16 * 2 ** 20)
    t.fill_(1.0)
for _ in range(2):
    cycle()
faults = []
for _ in range(5):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cycle()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(min(faults))
"""


def _probe(keep: bool):
    env = dict(os.environ, **{memory.ENV: "1" if keep else "0"})
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env,
                         check=True).stdout.split("\n")
    return out[0], int(out[1])


@glibc
def test_freed_memory_is_reused_without_page_faults():
    # the best of three processes: on a loaded host one probe process now and then pages its
    # tensor in afresh in every cycle; a setting that does not work does so in all three
    probes = [_probe(keep=True) for _ in range(3)]
    assert all("keeps freed memory" in line for line, _ in probes)
    faults = min(f for _, f in probes)
    assert faults < 200, probes  # 16384 pages of 4 KiB when glibc maps the tensor afresh
    line, faults = _probe(keep=False)
    assert line == f"allocator: as it was ({memory.ENV}=0)"
    assert faults > 8000  # the default really pays them, so the check above means something


def test_setup_only_on_cpu():
    assert memory.setup_for("meta") is None
    assert memory.setup_for("cuda") is None  # a device name, nothing allocated there
