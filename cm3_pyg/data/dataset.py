"""``MMRecDataset``: an MMRec folder as a PyG ``InMemoryDataset`` with a fingerprinted cache.

The processed file's name carries a sha256 fingerprint of everything that determines its
content (a sha256 of every input file's bytes, the modality list, the duplicate policy,
:data:`FORMAT_VERSION` and the ``pre_transform``), so a stale cache is never reused and no
manual ``force_reload`` is needed after editing inputs, even by an edit that keeps a file's
size and modification time (``cp -p``, ``rsync -a``, tar). Caches are written atomically
(temporary file + rename), read back with ``torch.load(weights_only=True)`` (never
unpickling arbitrary objects), and a corrupt one is rebuilt on load.

The cache is memory-mapped by default (``mmap=True``): the tensors are private
(copy-on-write) mappings of the file, so the feature tables cost page cache, one copy shared
by every process of a machine that loads the same file, instead of a private copy per
process; a trainer on several processes then copies only its block of rows
(:class:`~cm3_pyg.nn.parallel.RowShard`). Writes to a loaded tensor never reach the file.
Because cm3_pyg only ever replaces a cache by rename (and deleting it is safe too), a running
process keeps reading the file it mapped. Truncating or rewriting the file in place under a
running process (no cm3_pyg code does) would end that process with a bus error when it next
reads a lost page; pass ``mmap=False`` where something else may do that.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch_geometric.data import HeteroData, InMemoryDataset

from cm3_pyg.data.hetero import RATES, build_hetero_data
from cm3_pyg.data.mmrec import (
    DUPLICATE_POLICIES,
    discover_modalities,
    feature_path,
    read_mmrec_folder,
)
from cm3_pyg.errors import ConfigError, DataFormatError
from cm3_pyg.io import atomic_torch_save, content_digest

__all__ = ["FORMAT_VERSION", "MMRecDataset", "default_cache_dir"]

#: Bump when the processed layout changes; part of the fingerprint, so old caches are ignored.
#: 2: duplicate (user, item) rows across splits are dropped (see ``check_interactions``).
#: 3: the file carries a content checksum, verified on every load.
FORMAT_VERSION = 3
CACHE_ENV = "CM3_CACHE_DIR"


def _stable_repr(obj: Any) -> str:
    """``repr`` without memory addresses, so e.g. a function's repr is stable across runs."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def default_cache_dir(root: str | os.PathLike[str], name: str) -> Path:
    """``$CM3_CACHE_DIR`` (or ``~/.cache/cm3_pyg``) ``/<name>-<hash of abs root>``."""
    base = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "cm3_pyg")
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:10]
    return Path(base).expanduser() / f"{name}-{digest}"


def _writable_dir(path: Path) -> bool:
    """Whether files may be created in ``path`` (or ``path`` may be created).

    A directory whose mode bits allow nobody to write counts as read-only even when
    ``os.access`` says yes (as it always does for root): such folders hold shared data
    that must not gain a cache.
    """
    target = path if path.exists() else path.parent
    if not target.is_dir() or not os.stat(target).st_mode & 0o222:
        return False
    return os.access(target, os.W_OK | os.X_OK)


class MMRecDataset(InMemoryDataset):
    """A single-graph dataset read from an MMRec folder.

    ``dataset[0]`` is a :class:`~torch_geometric.data.HeteroData` laid out as in
    ``docs/architecture.md`` (built by :func:`~cm3_pyg.data.hetero.build_hetero_data`).

    Args:
        root: the dataset folder itself, holding ``<name>.inter`` and ``<m>_feat.npy``.
        name: file stem of the ``.inter`` file; defaults to the folder's name.
        modalities: feature files to use, in fusion order; defaults to every
            ``<m>_feat.npy`` found (``image`` first, then alphabetical).
        cache_dir: folder (used as is) for the processed file when ``<root>/processed``
            is not writable (or ``cache_in_folder`` is false); when ``None``,
            ``$CM3_CACHE_DIR/<name>-<hash>`` or ``~/.cache/cm3_pyg/<name>-<hash>`` (hash of
            the absolute root).
        cache_in_folder: use ``<root>/processed`` when it is writable (PyG's layout);
            ``False`` never writes under ``root``.
        transform: applied to the HeteroData on every access.
        pre_transform: applied once before caching (its repr is part of the fingerprint).
        force_reload: rebuild the cache even when a valid one exists.
        duplicates: ``"warn"`` (drop repeated (user, item) rows with a
            :class:`~cm3_pyg.errors.DataWarning`) or ``"error"`` (raise).
        mmap: map the processed file (shared, paged in on use; the default) instead of
            reading it into private memory (``False``, e.g. for a cache on a network file
            system that may vanish while the process runs).

    Raises:
        DataFormatError: a missing folder or input file, or malformed inputs (every check
            of :func:`~cm3_pyg.data.mmrec.read_mmrec_folder`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        name: str | None = None,
        modalities: Sequence[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        transform: Callable[[HeteroData], HeteroData] | None = None,
        pre_transform: Callable[[HeteroData], HeteroData] | None = None,
        force_reload: bool = False,
        duplicates: str = "warn",
        cache_in_folder: bool = True,
        mmap: bool = True,
    ) -> None:
        if duplicates not in DUPLICATE_POLICIES:
            raise ConfigError(
                f"duplicate_interactions: expected one of {list(DUPLICATE_POLICIES)}, "
                f"got {duplicates!r}"
            )
        if not isinstance(mmap, bool):
            raise ConfigError(f"mmap: expected True or False, got {mmap!r}")
        self.duplicates = duplicates
        self.mmap = mmap
        folder = Path(root).expanduser().resolve()
        if not folder.is_dir():
            raise DataFormatError(
                f"{folder}: dataset folder not found (expected a directory "
                f"holding an MMRec .inter file)"
            )
        self.name = name or folder.name
        if modalities is None:
            modalities = discover_modalities(folder)
        elif isinstance(modalities, str) or not all(isinstance(m, str) for m in modalities):
            raise DataFormatError(f"modalities: expected a list of names, got {modalities!r}")
        elif len(set(modalities)) != len(modalities):
            raise DataFormatError(f"modalities: expected distinct names, got {list(modalities)}")
        self.modalities: list[str] = list(modalities)
        self._folder = folder
        self._processed = self._choose_processed_dir(cache_dir, cache_in_folder)
        self._fingerprint: str | None = None
        # PyG's __init__ calls download() when inputs are missing, then _process().
        super().__init__(str(folder), transform, pre_transform, force_reload=force_reload)
        self._load_or_rebuild()

    # ------------------------------------------------------------------ locations
    @property
    def raw_dir(self) -> str:
        return str(self._folder)

    @property
    def raw_file_names(self) -> list[str]:
        return [f"{self.name}.inter"] + [
            feature_path(self._folder, m).name for m in self.modalities
        ]

    @property
    def processed_dir(self) -> str:
        return str(self._processed)

    @property
    def processed_file_names(self) -> list[str]:
        return [f"{self.name}_{self.fingerprint[:16]}.pt"]

    def _choose_processed_dir(
        self, cache_dir: str | os.PathLike[str] | None, cache_in_folder: bool
    ) -> Path:
        local = self._folder / "processed"
        if cache_in_folder and _writable_dir(local):
            return local
        if cache_dir is not None:
            return Path(cache_dir).expanduser().resolve()
        return default_cache_dir(self._folder, self.name).resolve()

    @property
    def fingerprint(self) -> str:
        """sha256 hex digest of the inputs and options that determine the processed data.

        Computed once, before processing reads the files, so an input edited mid-build
        yields a different fingerprint next time rather than a silently stale cache.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(f"format={FORMAT_VERSION}\n".encode())
            for path in self.raw_paths:
                h.update(f"{os.path.basename(path)}|{_file_digest(path)}\n".encode())
            h.update(f"modalities={self.modalities!r}\n".encode())
            h.update(f"duplicates={self.duplicates}\n".encode())
            h.update(f"pre_transform={_stable_repr(self.pre_transform)}\n".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # ------------------------------------------------------------------ building
    def download(self) -> None:
        missing = [p for p in self.raw_paths if not os.path.isfile(p)]
        raise DataFormatError(
            f"{self._folder}: missing input file(s) {', '.join(missing)}; expected "
            f"{self.name}.inter and <modality>_feat.npy for modalities {self.modalities} "
            f"(cm3_pyg never downloads data)"
        )

    def _download(self) -> None:
        # PyG's version creates raw_dir first; ours is the user's folder, which must exist.
        if not all(os.path.isfile(p) for p in self.raw_paths):
            self.download()

    def _process(self) -> None:
        # Replaces PyG's version: its pre_transform.pt/pre_filter.pt side files and the
        # "pre_transform differs" warning are redundant with the fingerprinted file name.
        if not self.force_reload and os.path.isfile(self.processed_paths[0]):
            with contextlib.suppress(OSError):  # mark it recently used (see _prune_caches)
                os.utime(self.processed_paths[0])
            return
        os.makedirs(self.processed_dir, exist_ok=True)
        self.process()
        _prune_caches(Path(self.processed_dir), self.name, keep=Path(self.processed_paths[0]))

    def process(self) -> None:
        target = self.processed_paths[0]  # fixes the fingerprint before any input is read
        contents = read_mmrec_folder(
            self._folder, self.name, self.modalities, duplicates=self.duplicates
        )
        assert contents is not None  # the default (fail-fast) log raises instead
        inter = contents.interactions
        data = build_hetero_data(inter.users, inter.items, inter.labels, contents.features)
        if self.pre_transform is not None:
            data = self.pre_transform(data)
        self._atomic_save(data, target)

    def _atomic_save(self, data: HeteroData, path: str) -> None:
        """Write PyG's ``InMemoryDataset.save`` triple plus its content checksum (a 4th
        element, :func:`cm3_pyg.io.content_digest` of the data and slices) via a temp file
        + ``os.replace``."""
        collated, slices = self.collate([data])
        stored = collated.to_dict()
        checksum = content_digest((stored, slices))
        atomic_torch_save((stored, slices, collated.__class__, checksum), path)

    # ------------------------------------------------------------------ loading
    def _load_checked(self, path: str) -> None:
        # PyG's own loader retries with weights_only=False (full unpickling) when the safe
        # load fails; the cache sits in a user-writable folder, so never do that.
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=self.mmap)
        if not (isinstance(loaded, tuple) and len(loaded) == 4 and isinstance(loaded[0], dict)):
            raise DataFormatError(f"{path}: processed cache does not hold an MMRec HeteroData")
        if content_digest((loaded[0], loaded[1])) != loaded[3]:
            # Bytes changed after the write (disk fault, an edit): never train on them.
            raise DataFormatError(f"{path}: processed cache fails its content checksum")
        data = HeteroData.from_dict(loaded[0])
        if not isinstance(getattr(data, "modalities", None), list) or RATES not in data.edge_types:
            raise DataFormatError(f"{path}: processed cache does not hold an MMRec HeteroData")
        self.data, self.slices = data, loaded[1]

    def _load_or_rebuild(self) -> None:
        path = self.processed_paths[0]
        try:
            self._load_checked(path)
        except Exception as exc:  # torch.load fails in many ways on a damaged file
            reason = (str(exc).strip().splitlines() or [""])[0][:200]
            warnings.warn(
                f"{path}: processed cache is unreadable ({type(exc).__name__}: {reason}); "
                f"rebuilding it",
                stacklevel=3,
            )
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            self.process()
            self._load_checked(path)

    def __repr__(self) -> str:
        data = self._data
        if not isinstance(data, HeteroData):
            return f"{self.__class__.__name__}({self.name!r})"
        return (
            f"{self.__class__.__name__}({self.name!r}, users={data['user'].num_nodes}, "
            f"items={data['item'].num_nodes}, train_edges={data[RATES].num_edges}, "
            f"modalities={data.modalities})"
        )


def _file_digest(path: str | os.PathLike[str], chunk: int = 1 << 23) -> str:
    """sha256 of a file's bytes, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


#: processed versions kept per dataset name (other modality selections, older inputs)
CACHES_KEPT = 8
#: a temporary file older than this (seconds) is a killed write's, not a running one's
STALE_TEMPORARY_SECONDS = 3600.0


def _prune_caches(folder: Path, name: str, keep: Path) -> None:
    """Bound the processed versions of ``name`` in ``folder`` to the :data:`CACHES_KEPT`
    most recently used (``keep``, just written, always stays) and delete temporary files
    that killed writes left behind."""
    now = time.time()
    # exactly this name's files: "baby" must not touch "baby_diffmm_split"'s
    version = re.compile(rf"{re.escape(name)}_[0-9a-f]{{16}}\.pt")
    with contextlib.suppress(OSError):
        for tmp in folder.glob(f".{name}_*.pt.*.tmp"):
            stem = tmp.name[1:].split(".pt.")[0] + ".pt"
            if version.fullmatch(stem) and now - tmp.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                tmp.unlink(missing_ok=True)
        versions = [
            p for p in folder.glob(f"{name}_*.pt") if p != keep and version.fullmatch(p.name)
        ]
        versions.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in versions[CACHES_KEPT - 1 :]:
            old.unlink(missing_ok=True)
