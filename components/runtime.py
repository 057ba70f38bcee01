"""Process-level tuning applied once when the ``vitrine`` script starts.

PyTorch on the CPU allocates and frees activation buffers of tens of MB every training step.
glibc serves blocks that large with ``mmap`` and hands them back with ``munmap``, so each step
pays page faults and page zeroing: about half of all CPU time went to the kernel in our CPU
training runs. Raising glibc's mmap and trim thresholds keeps those buffers in the heap for
reuse. glibc reads these variables only at start-up, so the script re-executes itself once
with them set (``bench/bench_allocator.py`` measures the effect).
"""

from __future__ import annotations

import os
import platform
import sys

ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(4 * 1024**3),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 1024**3),
    "MALLOC_TOP_PAD_": str(1024**3),
}
_MARKER = "VITRINE_ALLOCATOR_TUNED"


def reexec_with_tuned_allocator() -> None:
    """Re-run the current command with the allocator variables set (Linux/glibc only).

    Does nothing when already tuned, when the user opted out with ``VITRINE_ALLOCATOR_TUNED=0``,
    or on platforms without glibc.
    """
    if os.environ.get(_MARKER) is not None:
        return
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    env = dict(os.environ)
    for key, value in ALLOCATOR_ENV.items():
        env.setdefault(key, value)
    env[_MARKER] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
