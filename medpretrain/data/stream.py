"""Streaming (``data.stream``): images read lazily, file by file, where they are used (DataLoader workers), for
sets whose decoded images fit neither in memory nor in the on-disk cache (:mod:`medpretrain.data.cache`).

How a streamed source is read (:func:`read_streamed`):

1. **Index.** The cache's machinery (:func:`medpretrain.data.cache.plan`, the same key, chunks, worker processes,
   lock and resuming) builds the cache *without pixels*: per file its sample count, the suffixes of its sample
   names, its salted group key, its thumbnails and, for an unreadable file, the reason. The folder is
   ``<cache_dir>/<key>`` with ``pixels: false`` in the key, a few KB per file, re-used by later runs.
2. **Serve.** The reader runs with every decode answered from the index, exactly as for a cached source: the
   names, labels, groups, splits, skipped files and errors are those of the in-memory path (an unreadable file
   fails, or is skipped under ``skip_bad``, before training starts, never inside a worker).
3. **Stream.** The images become :class:`StreamedImages`: ``images[j]`` calls the reader's per-file decoder on
   sample ``j``'s file (the same function, the same options as the in-memory path, so the same float32 values)
   and returns its frame / slice. Each process keeps the last decoded file, so consecutive samples of one file
   (an evaluation pass over a multi-frame DICOM) decode it once.

A file that changed since it was indexed (it no longer decodes, or to another number of samples) is a
:class:`StreamReadError` naming it; raised in a DataLoader worker, it reaches the main process as the same
one-line error (DataLoader rebuilds worker exceptions from their message, see :class:`StreamReadError`).

Privacy: the index holds what the cache holds, without pixels (see :mod:`medpretrain.data.cache`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from medpretrain.config import ConfigError, DataConfig
from medpretrain.data.base import DatasetSpec, LazyImages, Source
from medpretrain.data.cache import CacheInfo, FileTask, _build, _workers, plan, serve_source
from medpretrain.data.errors import DataError, SkipLog
from medpretrain.data.readers import READERS, Reader

log = logging.getLogger(__name__)


class StreamReadError(DataError):
    """A file that decoded when the stream was indexed failed when streamed. ``str(err)`` is ``"<file>: <reason>"``.

    DataLoader re-raises a worker's exception as ``type(err)(message)``, the message ending in the worker's
    traceback, whose last line is ``<module>.StreamReadError: <file>: <reason>``; built from one string, this
    class recovers the file and the reason from that line, so the main process gets the one-line error.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str | None = None):
        if reason is None:
            lines = str(path).rstrip().splitlines() or [""]
            _, found, text = lines[-1].partition(f"{type(self).__name__}: ")
            path, _, reason = (text if found else lines[-1]).partition(": ")
        super().__init__(path, reason)


class StreamedImages(LazyImages):
    """The images of a streamed source as a read-only sequence: ``images[j]`` is float32 ``[C, H, W]`` in [0, 1],
    decoded from its file on access (see the module docstring). ``tasks`` are the planned per-file decodes,
    ``files[j]`` / ``frames[j]`` sample ``j``'s task and its sample within the file. Pickles without the
    decoded file it keeps (DataLoader workers start empty)."""

    what = "streamed images"

    def __init__(self, tasks: list[FileTask], files: np.ndarray, frames: np.ndarray, shape: list[int],
                 cfg: DataConfig, counts: np.ndarray):
        self.tasks = tasks
        self.files = np.asarray(files, dtype=np.int64)
        self.frames = np.asarray(frames, dtype=np.int64)
        self.item_shape = tuple(int(s) for s in shape)
        self.cfg = cfg
        self.counts = np.asarray(counts, dtype=np.int64)  # samples per planned file when indexed
        self._last: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def _decoded(self, i: int) -> np.ndarray:
        """Every sample of planned file ``i``, ``[S, C, H, W]`` float32 (the last file is kept)."""
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        task = self.tasks[i]
        # The index key holds every file's size and mtime: the next run indexes a changed file again.
        note = "when data.stream indexed the files; changed since?"
        try:
            images = np.asarray(task.call(self.cfg).images, dtype=np.float32)
        except DataError as err:
            raise StreamReadError(err.path, f"{err.reason} (it decoded {note})") from None
        if len(images) != self.counts[i] or tuple(images.shape[1:]) != self.item_shape:
            raise StreamReadError(task.path, f"decodes to {len(images)} x {tuple(images.shape[1:])}, not "
                                             f"{self.counts[i]} x {self.item_shape} as {note}")
        self._last = (i, images)
        return images

    def item(self, j: int) -> np.ndarray:
        return self._decoded(int(self.files[j]))[int(self.frames[j])]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_last": None}

    def __repr__(self) -> str:
        return f"StreamedImages({len(self)} x {self.item_shape}, {len(self.tasks)} file(s))"


def _check(cfg: DataConfig, reader: Reader) -> None:
    if cfg.cache is not False:
        raise ConfigError(f"config key 'data.stream': streams files instead of caching them; set data.cache=off "
                          f"(got data.cache={cfg.cache})")
    if not reader.cacheable:
        streamed = ", ".join(f"{r.scheme}:" for r in READERS.values() if r.cacheable)
        raise ConfigError(f"config key 'data.stream': {reader.scheme}: sources are not streamed (streamed: "
                          f"{streamed}); set data.stream=false")
    _workers(cfg)


def build_stream_index(cfg: DataConfig) -> CacheInfo:
    """Build (or finish) the index of ``cfg``'s streamed source and describe it (:class:`CacheInfo`; ``bytes``
    is the index on disk). Raises ConfigError for a source that is not streamed or bad options, DataError as
    its reader does."""
    from medpretrain.data.spec import data_root, parse_spec

    spec = parse_spec(cfg.dataset, data_root(cfg))
    reader = READERS[spec.scheme]
    _check(cfg, reader)
    return _build(cfg, plan(spec, reader, cfg), pixels=False)


def read_streamed(spec: DatasetSpec, reader: Reader, cfg: DataConfig, skips: SkipLog) -> Source:
    """The :class:`Source` of ``spec`` with :class:`StreamedImages` (the index built or finished first).

    Raises ConfigError for a source that is not streamed, ``data.cache`` on, or bad cache options; DataError as
    the reader does (unreadable files, found by the index, unless ``skip_bad``).
    """
    _check(cfg, reader)
    tasks = plan(spec, reader, cfg)
    info = _build(cfg, tasks, pixels=False)
    source, rows, index = serve_source(spec, reader, cfg, skips, tasks, info.folder)
    counts = np.asarray([f["n"] for rec in index["records"] for f in rec["files"]], dtype=np.int64)
    if len(counts) != len(tasks):
        raise RuntimeError(f"{info.folder}: an index of {len(counts)} file(s) for {len(tasks)} planned")
    file_of_row = np.repeat(np.arange(len(tasks), dtype=np.int64), counts)
    first_row = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    files = file_of_row[rows]
    source.images = StreamedImages(tasks, files, rows - first_row[files], index["shape"], cfg, counts)
    log.info("%s: %d sample(s) streamed from %d file(s) (index %s)", cfg.dataset, len(rows), len(tasks), info.folder)
    return source

