"""Huge pages for PyTorch's large CPU tensors, requested before torch allocates anything.

glibc serves every block above its mmap threshold (at most 32 MiB, so beyond the reach of
:func:`cm3_pyg.training.memory.retain_freed_memory`) with fresh ``mmap`` pages and unmaps
it on free. A training step that allocates a ``[7050, 4096]`` gradient table or a
``[U + I, F]`` propagation output therefore pays a page fault per 4 KiB of it, every step:
on baby-shaped data FREEDOM's step spent about 70 ms zero-filling its 115 MB feature
gradient, about 4x what the same fill costs in memory already mapped. With
``THP_MEM_ALLOC_ENABLE=1`` PyTorch aligns CPU allocations of 2 MiB and more to 2 MiB and
marks them ``MADV_HUGEPAGE``, so the kernel maps them 2 MiB at a time. Computation is
unchanged.

PyTorch reads the variable once, at its first CPU allocation, which is why importing
``cm3_pyg`` sets it (the package's ``__init__`` runs this before any of its modules import
torch). It has no effect when torch already allocated a tensor in this process, and none
where the kernel's ``transparent_hugepage`` mode is ``never``. A value the user set is
left alone (``THP_MEM_ALLOC_ENABLE=0`` keeps 4 KiB pages); ``CM3_HUGE_PAGES=0`` stops
``cm3_pyg`` from setting it. Child processes inherit it, so benchmark harnesses that time
another project's code remove it from that child's environment unless asked
(:data:`SET_BY_CM3`).
"""

from __future__ import annotations

import os

#: PyTorch's switch for huge-page-aligned CPU allocations.
TORCH_ENV = "THP_MEM_ALLOC_ENABLE"
#: ``0`` stops ``cm3_pyg`` from setting :data:`TORCH_ENV`.
OPT_OUT_ENV = "CM3_HUGE_PAGES"

#: Whether :func:`request_huge_pages` set :data:`TORCH_ENV` in this process (rather than
#: the user or nobody).
SET_BY_CM3 = False


def request_huge_pages() -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` unless the user set it or opted out; ``True`` if set
    here. Call it before torch's first CPU allocation (importing ``cm3_pyg`` does)."""
    global SET_BY_CM3
    if TORCH_ENV in os.environ or os.environ.get(OPT_OUT_ENV, "1").strip() == "0":
        return False
    os.environ[TORCH_ENV] = "1"
    SET_BY_CM3 = True
    return True
