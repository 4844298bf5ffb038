"""Keep freed memory in the process so large tensors are reused without page faults (glibc).

A probe pass allocates large tensors a training step does not: per-layer float64 sums, the
per-example squares' work buffers, the reference's activations. glibc hands blocks above its
(adaptive) mmap threshold straight back to the kernel when they are freed and trims the heap top
beyond twice that, so the next batch's allocation of the same size page-faults through fresh,
zero-filled pages again: measured on resnet18 at batch 64, 65k-260k minor faults per 16-batch pass
against none for a training step over the same batches, and up to 0.2 of a training step.
:func:`keep_freed_memory` fixes the thresholds (``mallopt``): blocks up to 32 MB (glibc's ceiling)
come from the heap and up to ``trim_bytes`` of free heap stay mapped for reuse. The process's
resident size no longer shrinks after a pass; the peak is unchanged.

The CLI calls it once at start; a training script can too. Elsewhere than glibc (macOS, musl,
Windows) it does nothing and returns False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_CEILING = 32 * 2**20   # glibc refuses larger mmap thresholds on 64-bit (HEAP_MAX_SIZE / 2)


def keep_freed_memory(trim_bytes: int = 1 << 30, top_pad_bytes: int = 64 * 2**20) -> bool:
    """Set glibc's malloc thresholds for reuse of large blocks; True if they were applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_CEILING)
                and mallopt(_M_TRIM_THRESHOLD, min(trim_bytes, 2**31 - 1))
                and mallopt(_M_TOP_PAD, min(top_pad_bytes, 2**31 - 1)))
