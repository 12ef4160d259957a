"""glibc malloc settings for a process that trains: freed tensor memory is kept for the next step.

A training step allocates and frees the same few megabytes of activations and gradients again and
again. Dask's nanny starts every worker with MALLOC_TRIM_THRESHOLD_=65536, so that memory goes back
to the OS; setting any glibc threshold also switches off glibc's dynamic mmap threshold. Each step
then gets fresh pages from the kernel and page-faults them in: a fused step of 128 MLPs took 29.9 ms
with 6,370 page faults that way, 12.6 ms with 992 with only the mmap threshold fixed, and 9.1 ms with
10 with both thresholds below (`python -m benchmarks.malloc_step`, one thread, this 2-core machine).
The settings are those glibc's own dynamic rule reaches at its ceiling: mmap above 32 MiB, trim
above twice that.
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
MMAP_THRESHOLD = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


def keep_freed_memory() -> bool:
    """Set this process's glibc mmap and trim thresholds for training (see the module docstring).

    Returns False, changing nothing, where the C library has no `mallopt` (macOS, musl's may lack
    it) or refuses a setting. Call it once per worker process: it lasts for the process.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        logger.warning("mallopt refused the training thresholds; training steps may page-fault their tensors")
    return done
