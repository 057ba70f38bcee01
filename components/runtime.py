"""Process-level tuning applied once when the ``vitrine`` script starts.

PyTorch on the CPU allocates and frees activation buffers of tens of MB every training step.
glibc serves blocks that large with ``mmap`` and hands them back with ``munmap``, so each step
pays page faults and page zeroing: about half of all CPU time went to the kernel in our CPU
training runs. Raising glibc's mmap and trim thresholds keeps those buffers in the heap for
reuse. glibc reads these variables only at start-up, so the script re-executes itself once
with them set (``bench/bench_allocator.py`` measures the effect).

Where jemalloc is installed (Debian's ``libjemalloc2``, which ``make test`` installs), the
re-executed process also preloads it in place of glibc's malloc, set to keep the pages it
frees. A service's model threads forward batches of every size, and after a burst of large
batches a thread's forward of one photo ran 15-30 % slower for minutes; a fresh thread of
the same process did not, unless glibc had one arena for all threads: the allocator's
per-thread state is part of it. jemalloc shrinks the slowdown but does not remove it
(``bench/bench_allocator.py``, 2026-11-25: one photo after the burst 12.7-13.4 ms under
jemalloc against 14.5-15.7 under tuned glibc; training 1.08x the images/s).
``VITRINE_ALLOCATOR=glibc`` keeps glibc's malloc (with the settings above);
``VITRINE_ALLOCATOR_TUNED=0`` turns all of this off.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(4 * 1024**3),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 1024**3),
    "MALLOC_TOP_PAD_": str(1024**3),
}
# jemalloc keeps the pages it frees instead of handing them back to the system after a few
# seconds (its default): what the glibc settings do, and for the same reason (training at
# jemalloc's defaults: 0.52x the images/s, half the CPU time in the kernel).
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
_MARKER = "VITRINE_ALLOCATOR_TUNED"
# Which malloc the tuned process runs: "auto" (jemalloc where installed, else glibc's),
# "jemalloc" or "glibc".
ALLOCATOR_CHOICE = "VITRINE_ALLOCATOR"
JEMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


def find_jemalloc(candidates: Iterable[str] = JEMALLOC_CANDIDATES) -> str | None:
    """The first jemalloc shared library that exists, or None."""
    return next((path for path in candidates if Path(path).is_file()), None)


def tuned_environment(
    environ: Mapping[str, str], jemalloc: str | None
) -> tuple[dict[str, str], str]:
    """``environ`` with the allocator settings added, and which malloc it selects.

    The glibc settings are always added (they are inert under jemalloc, and keep glibc tuned
    wherever jemalloc is absent); values the user set win. jemalloc (the library at
    ``jemalloc``, None where absent) is put first in ``LD_PRELOAD``, with ``MALLOC_CONF``
    :data:`JEMALLOC_CONF`, unless ``VITRINE_ALLOCATOR`` says ``glibc``.

    Raises:
        ValueError: ``VITRINE_ALLOCATOR`` is not ``auto``, ``jemalloc`` or ``glibc``.
    """
    choice = _allocator_choice(environ)
    if choice not in ("auto", "jemalloc", "glibc"):
        raise ValueError(
            f"{ALLOCATOR_CHOICE}={environ[ALLOCATOR_CHOICE]!r}: use auto, jemalloc or glibc"
        )
    env = dict(environ)
    for key, value in ALLOCATOR_ENV.items():
        env.setdefault(key, value)
    env[_MARKER] = "1"
    if choice == "glibc" or jemalloc is None:
        return env, "glibc"
    preloaded = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    if jemalloc not in preloaded:
        env["LD_PRELOAD"] = " ".join([jemalloc, *preloaded])
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env, "jemalloc"


def _allocator_choice(environ: Mapping[str, str]) -> str:
    """``VITRINE_ALLOCATOR`` as given (any case, spaces around), ``auto`` when unset."""
    return environ.get(ALLOCATOR_CHOICE, "").strip().lower() or "auto"


def reexec_with_tuned_allocator() -> None:
    """Re-run the current command with the allocator settings (Linux/glibc only).

    Does nothing when already tuned, when the user opted out with ``VITRINE_ALLOCATOR_TUNED=0``,
    or on platforms without glibc. ``VITRINE_ALLOCATOR=jemalloc`` where jemalloc is not
    installed says so on stderr and runs with glibc's malloc, tuned.
    """
    if os.environ.get(_MARKER) is not None:
        return
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    jemalloc = find_jemalloc()
    env, chosen = tuned_environment(os.environ, jemalloc)
    if _allocator_choice(os.environ) == "jemalloc" and chosen != "jemalloc":
        print(
            f"{ALLOCATOR_CHOICE}=jemalloc but no jemalloc library was found (looked for "
            f"{', '.join(JEMALLOC_CANDIDATES)}); install libjemalloc2 (make test does). "
            "Running with glibc's malloc.",
            file=sys.stderr,
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
