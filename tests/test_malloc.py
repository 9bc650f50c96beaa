"""lightning_mav.malloc: glibc keeps freed memory (what the mav / lightning commands set at start-up)."""

import os
import platform
import subprocess
import sys

import pytest

from lightning_mav.malloc import keep_freed_memory

# Each case runs in a fresh interpreter: mallopt settings are process-wide and cannot be undone.
PROBE = """
import ctypes
from lightning_mav.malloc import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
applied = keep_freed_memory()
before = libc.mallinfo2().hblks
block = libc.malloc(64 << 20)            # above glibc's default mmap threshold
mmapped = libc.mallinfo2().hblks - before
libc.free(block)
print(applied, mmapped)
"""


def probe(env_value: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "MAV_MALLOC"}
    if env_value:
        env["MAV_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, mmapped = out.stdout.split()
    return applied, int(mmapped)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_large_blocks_come_from_the_heap_not_mmap() -> None:
    assert probe(None) == ("True", 0)            # the heap serves 64 MiB: nothing to unmap and fault in again
    assert probe("default") == ("False", 1)      # glibc's default: a fresh mmap per large block


def test_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAV_MALLOC", "default")
    assert keep_freed_memory() is False
