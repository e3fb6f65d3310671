"""retain_freed_memory and huge pages: applied on glibc/Linux, switchable off, and they remove
repeated page faults."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.reference_cm3 import reference_env
from cm3_pyg import _hugepages
from cm3_pyg._hugepages import OPT_OUT_ENV, TORCH_ENV, request_huge_pages
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


def _run_child(script: str) -> list[str]:
    """The words ``script`` prints in a child process with 4 KiB pages (so it counts glibc's
    reuse only) and no allocator setting inherited."""
    env = {**os.environ, OPT_OUT_ENV: "0"}
    env.pop(TORCH_ENV, None)
    env.pop(RETAIN_ENV, None)
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=env,
    ).stdout.split()


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
    out = _run_child(script)
    applied, before, after = out[0] == "True", float(out[1]), float(out[2])
    if not applied:
        pytest.skip("this C library does not take mallopt settings")
    pages = 24 * 2**20 / 4096
    assert before > 0.5 * pages
    assert after < 0.05 * pages


@glibc_linux
def test_blocks_above_the_mmap_cap_are_reused_when_heap_only():
    # A child process: a 64 MiB tensor, above glibc's 32 MiB cap on the mmap threshold, is
    # mapped afresh every round (16k faults at 4 KiB pages) unless heap_only keeps it in the
    # heap, where the next round reuses the freed block.
    script = textwrap.dedent(
        """
        import resource, torch
        from cm3_pyg.training.memory import retain_freed_memory
        def faults_per_round():
            x = torch.empty(16 * 2**20); x.fill_(1.0); del x
            counts = []
            for _ in range(5):
                start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                x = torch.empty(16 * 2**20); x.fill_(1.0); del x
                counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
            return sorted(counts)[2]
        mapped = retain_freed_memory(heap_only=False) and faults_per_round()
        heap = retain_freed_memory() and faults_per_round()
        print(mapped, heap)
        """
    )
    out = _run_child(script)
    if out[0] == "False":
        pytest.skip("this C library does not take mallopt settings")
    pages = 64 * 2**20 / 4096
    mapped, heap = float(out[0]), float(out[1])
    assert mapped > 0.5 * pages
    assert heap < 0.05 * pages


# --- huge pages for torch's large CPU tensors --------------------------------------------


def test_request_sets_the_torch_switch_once_and_respects_the_user(monkeypatch):
    monkeypatch.setattr(_hugepages, "SET_BY_CM3", False)
    monkeypatch.delenv(TORCH_ENV, raising=False)
    monkeypatch.delenv(OPT_OUT_ENV, raising=False)
    assert request_huge_pages() is True
    assert os.environ[TORCH_ENV] == "1" and _hugepages.SET_BY_CM3
    # already set (here by the call above): left as it is
    assert request_huge_pages() is False

    monkeypatch.setattr(_hugepages, "SET_BY_CM3", False)
    monkeypatch.setenv(TORCH_ENV, "0")  # the user's choice
    assert request_huge_pages() is False
    assert os.environ[TORCH_ENV] == "0" and not _hugepages.SET_BY_CM3

    monkeypatch.delenv(TORCH_ENV)
    monkeypatch.setenv(OPT_OUT_ENV, "0")
    assert request_huge_pages() is False
    assert TORCH_ENV not in os.environ


def test_reference_children_run_as_shipped_unless_asked(monkeypatch):
    monkeypatch.setenv(TORCH_ENV, "1")
    monkeypatch.setattr(_hugepages, "SET_BY_CM3", True)
    assert TORCH_ENV not in reference_env()
    assert reference_env(huge_pages=True)[TORCH_ENV] == "1"
    monkeypatch.setattr(_hugepages, "SET_BY_CM3", False)  # the user exported it
    assert reference_env()[TORCH_ENV] == "1"
    assert reference_env()["PYTHONDONTWRITEBYTECODE"] == "1"


def _thp_mode() -> str | None:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not sys.platform.startswith("linux") or not path.exists():
        return None
    text = path.read_text()
    return text[text.index("[") + 1 : text.index("]")]


@pytest.mark.skipif(
    _thp_mode() in (None, "never"), reason="no transparent huge pages on this system"
)
def test_importing_cm3_pyg_maps_large_tensors_in_huge_pages():
    # A fresh 64 MiB tensor (above glibc's 32 MiB mmap cap, so mapped anew every time)
    # faults once per 4 KiB page, 16k times, unless torch marks it MADV_HUGEPAGE; then once
    # per 2 MiB. Importing cm3_pyg before torch allocates is what sets that up.
    script = textwrap.dedent(
        """
        import os, resource
        import cm3_pyg, torch
        counts = []
        for _ in range(5):
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            x = torch.empty(16 * 2**20); x.fill_(1.0); del x
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
        print(os.environ.get("THP_MEM_ALLOC_ENABLE"), sorted(counts)[2])
        """
    )

    def child(**extra: str) -> tuple[str, float]:
        env = {k: v for k, v in os.environ.items() if k not in (TORCH_ENV, OPT_OUT_ENV)}
        env.update(extra)
        out = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
            env=env,
        ).stdout.split()
        return out[0], float(out[1])

    pages = 64 * 2**20 / 4096
    switch, faults = child()
    assert switch == "1"
    assert faults < 0.1 * pages
    switch, faults = child(**{OPT_OUT_ENV: "0"})
    assert switch == "None"
    if _thp_mode() == "madvise":  # with "always" the kernel uses huge pages anyway
        assert faults > 0.5 * pages
