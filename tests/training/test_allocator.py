"""cxrlab.training.allocator: freed tensor memory is reused, not faulted in again from the
kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cxrlab.training.allocator import on_glibc, user_chose_allocator

# Touch and free 64 MB, then take 60 MB and print the page faults that took: reused from the
# heap, no fault; from the kernel (glibc maps anything over 32 MB afresh), one per page.
REUSE = """
import resource, torch, cxrlab.training.allocator as a
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(16 * 2**20); del x
f0 = faults(); x = torch.ones(15 * 2**20); f1 = faults()
print(a._applied, f1 - f0)
"""
PAGES = 60 * 2**20 // os.sysconf("SC_PAGE_SIZE")

glibc_linux = pytest.mark.skipif(not on_glibc(), reason="mallopt is glibc's")


def second_allocation(**env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("CXRLAB_MALLOC", "GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", REUSE], env={**environ, **env}, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0], int(out[1])


@glibc_linux
def test_import_keeps_freed_memory_for_the_next_tensor():
    applied, faults = second_allocation()
    assert applied == "True"
    assert faults < PAGES // 10  # the 60 MB come from the heap, not from the kernel


@glibc_linux
def test_opting_out_leaves_glibc_returning_memory_to_the_kernel():
    applied, faults = second_allocation(CXRLAB_MALLOC="system")
    assert applied == "False"
    assert faults > PAGES // 2  # every page faulted in again: what the setting saves


def test_an_allocator_the_user_chose_is_left_alone(monkeypatch):
    for name in ("CXRLAB_MALLOC", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    assert user_chose_allocator() is None
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert user_chose_allocator() == "LD_PRELOAD allocator"
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1000000")
    assert user_chose_allocator() == "GLIBC_TUNABLES sets malloc"
    monkeypatch.setenv("CXRLAB_MALLOC", "System")
    assert user_chose_allocator() == "CXRLAB_MALLOC=system"
