"""retain_freed_memory: applied on glibc, switchable off, and it removes repeated page faults."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from cm3_pyg.training.memory import RETAIN_ENV, retain_freed_memory

glibc_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only"
)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(RETAIN_ENV, "0")
    assert retain_freed_memory() is False


def test_rejects_values_glibc_cannot_take():
    with pytest.raises(ValueError, match="mmap_threshold"):
        retain_freed_memory(mmap_threshold=64 * 2**20)
    with pytest.raises(ValueError, match="trim_threshold"):
        retain_freed_memory(trim_threshold=-1)


@glibc_linux
def test_freed_buffers_are_reused_without_page_faults():
    # A child process: allocate, touch and free a 24 MiB tensor 6 times. With glibc's
    # thresholds pinned at 128 KiB every round maps fresh pages (about 6k faults); after
    # retain_freed_memory the rounds reuse the first one's pages (the median round is
    # compared: on this VM a single round now and then still faults its pages in).
    script = textwrap.dedent(
        """
        import ctypes, resource, sys, torch
        from cm3_pyg.training.memory import retain_freed_memory
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024); libc.mallopt(-1, 128 * 1024)
        def faults_per_round():
            # the median round: a one-off heap growth does not count
            x = torch.empty(6 * 2**20); x.fill_(1.0); del x
            counts = []
            for _ in range(5):
                start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                x = torch.empty(6 * 2**20); x.fill_(1.0); del x
                counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
            return sorted(counts)[2]
        before = faults_per_round()
        applied = retain_freed_memory()
        after = faults_per_round()
        print(applied, before, after)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    applied, before, after = out[0] == "True", float(out[1]), float(out[2])
    if not applied:
        pytest.skip("this C library does not take mallopt settings")
    pages = 24 * 2**20 / 4096
    assert before > 0.5 * pages
    assert after < 0.05 * pages
