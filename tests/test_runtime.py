"""The allocator the `vitrine` script re-executes itself with (components/runtime.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.runtime import (
    ALLOCATOR_CHOICE,
    ALLOCATOR_ENV,
    JEMALLOC_CONF,
    find_jemalloc,
    tuned_environment,
)

REPO = Path(__file__).resolve().parents[1]


def test_jemalloc_goes_first_in_ld_preload_with_the_glibc_settings_beside_it() -> None:
    env, chosen = tuned_environment({"LD_PRELOAD": "/opt/other.so", "PATH": "/bin"}, "/j.so")
    assert chosen == "jemalloc"
    assert env["LD_PRELOAD"] == "/j.so /opt/other.so"
    assert env["MALLOC_CONF"] == JEMALLOC_CONF  # freed pages kept, as the glibc settings do
    assert env["PATH"] == "/bin"
    assert all(env[key] == value for key, value in ALLOCATOR_ENV.items())
    assert env["VITRINE_ALLOCATOR_TUNED"] == "1"  # not re-executed twice


def test_glibc_is_kept_when_asked_or_when_jemalloc_is_absent() -> None:
    for environ, jemalloc in (({ALLOCATOR_CHOICE: "glibc"}, "/j.so"), ({}, None)):
        env, chosen = tuned_environment(environ, jemalloc)
        assert chosen == "glibc" and "LD_PRELOAD" not in env and "MALLOC_CONF" not in env
        assert all(env[key] == value for key, value in ALLOCATOR_ENV.items())


def test_user_settings_win_and_jemalloc_is_not_preloaded_twice() -> None:
    environ = {"MALLOC_TOP_PAD_": "7", "LD_PRELOAD": "/j.so", ALLOCATOR_CHOICE: "JEMALLOC"}
    environ["MALLOC_CONF"] = "narenas:2"
    env, chosen = tuned_environment(environ, "/j.so")
    assert chosen == "jemalloc" and env["LD_PRELOAD"] == "/j.so"
    assert env["MALLOC_TOP_PAD_"] == "7" and env["MALLOC_CONF"] == "narenas:2"


def test_an_unknown_allocator_choice_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="auto, jemalloc or glibc"):
        tuned_environment({ALLOCATOR_CHOICE: "tcmalloc"}, None)


def test_find_jemalloc_takes_the_first_library_that_exists(tmp_path: Path) -> None:
    library = tmp_path / "libjemalloc.so.2"
    library.write_bytes(b"")
    assert find_jemalloc([str(tmp_path / "missing.so"), str(library)]) == str(library)
    assert find_jemalloc([str(tmp_path / "missing.so")]) is None


def _maps_after_reexec(environ: dict[str, str]) -> str:
    """/proc/self/maps of a Python that re-executed itself as the `vitrine` script does."""
    code = (
        "from components.runtime import reexec_with_tuned_allocator\n"
        "reexec_with_tuned_allocator()\n"
        "import os\n"
        "print(os.environ.get('VITRINE_ALLOCATOR_TUNED'))\n"
        "print(open('/proc/self/maps').read())\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VITRINE_ALLOCATOR_TUNED")
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, **environ},
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_the_reexecuted_process_runs_on_jemalloc_where_it_is_installed() -> None:
    jemalloc = find_jemalloc()
    if jemalloc is None:
        pytest.skip("jemalloc is not installed (Debian: libjemalloc2; make test installs it)")
    maps = _maps_after_reexec({})
    assert maps.splitlines()[0] == "1"
    assert "libjemalloc" in maps
    assert "libjemalloc" not in _maps_after_reexec({ALLOCATOR_CHOICE: "glibc"})
