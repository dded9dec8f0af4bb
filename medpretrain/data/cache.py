"""The on-disk image cache (``data.cache``): decoded, resized images written once as uint8 / uint16 memory maps,
read back one image at a time, re-used by every stage and run.

How a cached source is read (:func:`read_cached`):

1. **Plan.** The source's reader runs with every per-file decode (:func:`medpretrain.data.base.decode_file`)
   recorded instead of performed: the files, in the reader's order, with the path each is known by. The
   reader's own checks (missing folders, manifest rows and columns) run and fail as they always do.
2. **Key.** The cache folder is ``<cache_dir>/<key>``, the key a hash of the data stamp
   (:func:`medpretrain.data.data_stamp`: every file's path, size and mtime), the options that change pixels or
   group keys (``image_size``, ``channels``, ``window``, ``slice_axis``, ``max_pixels``, the retinal options,
   the salt, through a salted hash), the planned files and the source of the decoding modules. Changing any of
   them builds a new cache; nothing is ever reused across them.
3. **Build.** Missing chunks (:data:`CHUNK_FILES` files each) are decoded in ``data.cache_workers`` processes
   (a tqdm bar on a terminal). Each chunk is written to a temporary file, renamed into place, then marked done
   by its ``<k>.json``; an interrupted build (a kill, Ctrl-C) keeps its finished chunks and a rerun decodes only
   the rest. A lock file lets one process build while others (other ranks) wait.
4. **Serve.** The reader runs again with every decode answered from the cache (names, group keys, thumbnails,
   the errors of unreadable files, which it then raises or skips under ``skip_bad`` exactly as when decoding),
   and its images become :class:`CachedImages`: the chunk files as ``np.memmap``, each item converted to
   float32 on access.

Index only: ``data.stream`` (:mod:`medpretrain.data.stream`) builds the same cache without ``<k>.bin`` pixel files
(``pixels: false`` in its key, so in its own folder) and serves it the same way, its images then decoded on access.

Pixels: quantised after resizing, round to nearest, ``q = rint(x * M)`` with ``M = 255`` for chunks whose files
are all 8-bit image files (PIL modes L, RGB, P, ...) and ``M = 65535`` otherwise (DICOM, NIfTI, 16-bit images),
then read back as ``q / M``: at most 0.5/255 or 0.5/65535 from the in-memory float32 values (:func:`quantise`,
:func:`dequantise`).

Privacy: the cache holds pixels, the salted group keys of the in-memory path, thumbnails, and per file only the
suffix its sample names add to the file name (``#<frame>``) and the reason an unreadable file failed (the
readers' scrubbed text). No path, file name, patient name or identifier is written.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medpretrain.config import ConfigError, DataConfig
from medpretrain.data import retina
from medpretrain.data.base import PROGRESS_MIN_FILES, DatasetSpec, Decoded, LazyImages, Source, decoding_with
from medpretrain.data.errors import DataError, SkipLog
from medpretrain.data.privacy import salted_key
from medpretrain.data.readers import READERS, Reader
from medpretrain.utils import PROJECT_ROOT, atomic_path, atomic_write_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHUNK_FILES = 128
"""Files per chunk (the unit of parallel work and of resuming). A cache keeps the chunking it was begun with."""
CACHE_ENV = "MEDPRETRAIN_CACHE"
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB",
                             "HSV"})
"""PIL modes of 8-bit image files (cached as uint8); anything else (``I;16``, ``I``, ``F``) is cached as uint16."""
_IMAGE_DECODER = "medpretrain.data.folder:decode_image_file"
_DECODING_MODULES = ("medpretrain.data.base", "medpretrain.data.transforms", "medpretrain.data.retina")


# --------------------------------------------------------------------------------------------
# Quantisation
# --------------------------------------------------------------------------------------------


def quantise(x: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """float values in [0, 1] as ``dtype`` (uint8 / uint16): ``rint(clip(x, 0, 1) * max)``."""
    top = np.iinfo(dtype).max
    return np.rint(np.clip(x, 0.0, 1.0) * np.float64(top)).astype(dtype)


def dequantise(q: np.ndarray) -> np.ndarray:
    """uint8 / uint16 pixels back to float32 in [0, 1]: ``q / max``."""
    return q.astype(np.float32) / np.float32(np.iinfo(q.dtype).max)


# --------------------------------------------------------------------------------------------
# Planned decodes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileTask:
    """One per-file decode a reader asked for: ``fn(path, cfg, rel, **kwargs)``, ``fn`` named ``module:name``."""

    fn: str
    path: str
    rel: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def call(self, cfg: DataConfig) -> Decoded:
        module, name = self.fn.split(":")
        decoded: Decoded = getattr(importlib.import_module(module), name)(Path(self.path), cfg, self.rel,
                                                                          **dict(self.kwargs))
        return decoded


def _task(fn: Callable[..., Decoded], path: Path, rel: str, kwargs: dict[str, Any]) -> FileTask:
    return FileTask(f"{fn.__module__}:{fn.__qualname__}", str(path), rel, tuple(sorted(kwargs.items())))


@contextmanager
def _quiet_readers() -> Iterator[None]:
    """The data loggers silenced while a reader runs on planned (not decoded) files: their counts are not real."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith("medpretrain.data")]
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, saved, strict=True):
            lg.disabled = was


def plan(spec: DatasetSpec, reader: Reader, cfg: DataConfig) -> list[FileTask]:
    """The per-file decodes ``reader`` makes for ``spec``, in order, without decoding (see the module docstring).
    Raises what the reader raises before decoding (DataError, ConfigError)."""
    tasks: list[FileTask] = []

    def record(fn: Callable[..., Decoded], path: Path, cfg: Any, rel: str, kwargs: dict[str, Any]) -> Decoded:
        tasks.append(_task(fn, path, rel, kwargs))
        return Decoded(images=np.zeros((1, 1, 1, 1), np.int64), names=[Path(path).name],
                       thumbs=np.zeros((1, 32, 32), np.float32))

    with decoding_with(record), _quiet_readers():
        reader.read(spec, cfg, SkipLog(skip_bad=cfg.skip_bad))
    return tasks


# --------------------------------------------------------------------------------------------
# Where, and under which key
# --------------------------------------------------------------------------------------------


def cache_root(cfg: DataConfig) -> Path:
    """``data.cache_dir`` (relative: against the project), else ``$MEDPRETRAIN_CACHE``, else ``runs/cache``."""
    text = cfg.cache_dir or os.environ.get(CACHE_ENV)
    if not text:
        return PROJECT_ROOT / "runs" / "cache"
    p = Path(text).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p


def _code_hash(tasks: list[FileTask]) -> str:
    """sha256 of the source of the decoding modules (a decoder fix must not be hidden by an old cache)."""
    h = hashlib.sha256()
    for name in sorted({t.fn.split(":")[0] for t in tasks} | set(_DECODING_MODULES)):
        file = getattr(importlib.import_module(name), "__file__", None)
        if file:
            h.update(Path(file).read_bytes())
    return h.hexdigest()


def cache_key(cfg: DataConfig, tasks: list[FileTask], pixels: bool = True) -> str:
    """16 hex digits naming the cache of ``cfg``'s source (see the module docstring for what goes in);
    ``pixels=False``: its index without pixels (``data.stream``, :mod:`medpretrain.data.stream`)."""
    from medpretrain.data.dataset import data_stamp

    h = hashlib.sha256()
    material = {
        "format": FORMAT_VERSION, "stamp": data_stamp(cfg), "image_size": cfg.image_size, "channels": cfg.channels,
        "window": cfg.window, "slice_axis": cfg.slice_axis, "max_pixels": cfg.max_pixels,
        "retina": [str(v) for v in retina.cache_key(cfg)], "salt": salted_key("medpretrain-cache"),
        "code": _code_hash(tasks),
    }
    if not pixels:  # only then: the keys of existing pixel caches stay what they were
        material["pixels"] = False
    h.update(json.dumps(material, sort_keys=True).encode())
    for t in tasks:
        h.update(json.dumps([t.fn, t.path, t.rel, [list(kv) for kv in t.kwargs]], default=str).encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def _wide(task: FileTask) -> bool:
    """True when the file needs uint16: anything but an 8-bit image file (its mode read from the header only).
    A file PIL cannot open gives no samples (its decoder fails with the reason), so it does not count."""
    if task.fn != _IMAGE_DECODER:
        return True
    from PIL import Image

    try:
        with Image.open(task.path) as im:
            return im.mode not in EIGHT_BIT_MODES
    except Exception:  # noqa: BLE001 - any failure to open is the decoder's to report
        return False


def _name_suffix(name: str, file_name: str) -> str:
    """What a sample's name adds to its file's name (``#3``); the whole name when it does not start with it."""
    return name[len(file_name):] if name.startswith(file_name) else "\0" + name


def _build_chunk(folder: str, k: int, tasks: list[FileTask], cfg: DataConfig, pixels: bool = True) -> int:
    """Decode ``tasks`` into chunk ``k`` of ``folder``: ``<k>.bin`` (pixels; not written when ``pixels`` is
    false), ``<k>.thumbs`` (float32 32x32 thumbnails, when any file has them), then ``<k>.json`` (what each file
    gave; its presence marks the chunk done). Runs in a worker process. Returns the number of samples."""
    try:
        import torch

        torch.set_num_threads(1)  # one core per worker
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    chunks = Path(folder) / "chunks"
    dtype = np.dtype(np.uint16 if not pixels or any(_wide(t) for t in tasks) else np.uint8)
    files: list[dict[str, Any]] = []
    shape: list[int] | None = None
    count = 0
    any_thumbs = False
    with atomic_path(chunks / f"{k:06d}.bin") as tmp_px, atomic_path(chunks / f"{k:06d}.thumbs") as tmp_th, \
            open(tmp_px, "wb") as px, open(tmp_th, "wb") as th:
        for t in tasks:
            try:
                d = t.call(cfg)
            except DataError as err:
                files.append({"n": 0, "error": err.reason})
                continue
            images = np.asarray(d.images)
            if shape is None:
                shape = list(images.shape[1:])
            elif list(images.shape[1:]) != shape:
                raise RuntimeError(f"{t.path}: decoded to {images.shape[1:]}, not {tuple(shape)} as the rest")
            if pixels:
                px.write(np.ascontiguousarray(quantise(images, dtype)).tobytes())
            thumbs = d.thumbs is not None
            any_thumbs |= thumbs
            th.write(np.ascontiguousarray(d.thumbs if thumbs else np.zeros((len(d), 32, 32)),
                                          dtype=np.float32).tobytes())
            name = Path(t.path).name
            files.append({"n": len(d), "names": [_name_suffix(s, name) for s in d.names], "group": d.group,
                          "thumbs": thumbs})
            count += len(d)
    if not any_thumbs:
        (chunks / f"{k:06d}.thumbs").unlink(missing_ok=True)
    if not pixels:
        (chunks / f"{k:06d}.bin").unlink(missing_ok=True)
    atomic_write_text(chunks / f"{k:06d}.json", json.dumps(
        {"samples": count, "shape": shape, "dtype": dtype.name, "thumbs": any_thumbs, "files": files}))
    return count


@dataclass
class CacheInfo:
    """What :func:`build_cache` found or did: the cache ``folder``, ``files`` planned, ``samples``, ``chunks``
    in all, chunks ``built`` by this call (0: all reused), ``seconds`` spent building, ``bytes`` on disk."""

    folder: Path
    files: int
    samples: int
    chunks: int
    built: int
    seconds: float
    bytes: int


def _workers(cfg: DataConfig) -> int:
    if cfg.cache_workers is not None and cfg.cache_workers < 1:
        raise ConfigError(f"config key 'data.cache_workers': must be >= 1 (or null), got {cfg.cache_workers}")
    return cfg.cache_workers or min(4, os.cpu_count() or 1)


@contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (one builder; other processes wait, then find the chunks done)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _done(chunks: Path, k: int, pixels: bool = True) -> bool:
    try:
        json.loads((chunks / f"{k:06d}.json").read_text())
    except (OSError, ValueError):
        return False
    return not pixels or (chunks / f"{k:06d}.bin").is_file()


def build_cache(cfg: DataConfig, *, on_chunk: Callable[[int], None] | None = None) -> CacheInfo:
    """Build (or finish) the on-disk cache of ``cfg``'s source and describe it; nothing is read into memory.

    ``on_chunk(k)`` is called after each chunk is written (tests interrupt a build with it). Raises ConfigError
    for a source that is not cached or bad cache options, DataError as its reader does.
    """
    from medpretrain.data.spec import data_root, parse_spec

    spec = parse_spec(cfg.dataset, data_root(cfg))
    reader = READERS[spec.scheme]
    _check_cacheable(reader)
    tasks = plan(spec, reader, cfg)
    return _build(cfg, tasks, on_chunk=on_chunk)


def _check_cacheable(reader: Reader) -> None:
    if not reader.cacheable:
        cached = ", ".join(f"{r.scheme}:" for r in READERS.values() if r.cacheable)
        raise ConfigError(f"config key 'data.cache': {reader.scheme}: sources are not cached on disk (cached: "
                          f"{cached}); set data.cache=off")


def _build(cfg: DataConfig, tasks: list[FileTask], *, on_chunk: Callable[[int], None] | None = None,
           pixels: bool = True) -> CacheInfo:
    """Build (or finish) the cache of the planned ``tasks``; ``pixels=False``: its index only (sample counts,
    names' suffixes, group keys, thumbnails, errors), for ``data.stream``."""
    workers = _workers(cfg)
    folder = cache_root(cfg) / cache_key(cfg, tasks, pixels)
    chunks = folder / "chunks"
    start = time.perf_counter()
    built = 0
    with _lock(folder):
        meta_file = folder / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
        if meta is None:
            # No dataset spec: its path may name a patient (an export folder per patient).
            meta = {"format": FORMAT_VERSION, "image_size": cfg.image_size,
                    "channels": cfg.channels, "window": cfg.window, "slice_axis": cfg.slice_axis,
                    "files": len(tasks), "chunk_files": CHUNK_FILES, **({} if pixels else {"pixels": False})}
            atomic_write_text(meta_file, json.dumps(meta, indent=1))
        size = int(meta["chunk_files"])
        parts = [tasks[i:i + size] for i in range(0, len(tasks), size)]
        chunks.mkdir(parents=True, exist_ok=True)
        for stale in chunks.glob(".*.tmp"):  # an interrupted write's temporary file
            stale.unlink(missing_ok=True)
        todo = [k for k in range(len(parts)) if not _done(chunks, k, pixels)]
        if todo:
            bar = tqdm(total=sum(len(parts[k]) for k in todo), desc="cache" if pixels else "index", unit="file",
                       leave=False,
                       disable=len(tasks) < PROGRESS_MIN_FILES or not sys.stderr.isatty())
            try:
                for k in _run(str(folder), parts, todo, cfg, workers, pixels):
                    built += 1
                    bar.update(len(parts[k]))
                    if on_chunk is not None:
                        on_chunk(k)
            finally:
                bar.close()
        index = _index(folder, len(parts))
    seconds = time.perf_counter() - start
    disk = sum(f.stat().st_size for f in chunks.iterdir() if f.is_file())
    if built:
        log.info("%s: %s %d file(s) (%d chunk(s) of %d) in %.1fs, %.0f file(s)/s, %.1f MB in %s", cfg.dataset,
                 "cached" if pixels else "indexed (no pixels)",
                 sum(len(parts[k]) for k in todo), built, len(parts), seconds,
                 sum(len(parts[k]) for k in todo) / max(seconds, 1e-9), disk / 2**20, folder)
    return CacheInfo(folder, len(tasks), int(index["samples"]), len(parts), built, seconds, disk)


def _run(folder: str, parts: list[list[FileTask]], todo: list[int], cfg: DataConfig,
         workers: int, pixels: bool = True) -> Iterator[int]:
    """Build the chunks ``todo``; yields each chunk's number when it is written."""
    if workers == 1 or len(todo) == 1:
        for k in todo:
            _build_chunk(folder, k, parts[k], cfg, pixels)
            yield k
        return
    # Not fork: the parent holds torch's thread pools, which a forked child may find locked. A fork server that
    # has imported the decoders starts each worker in milliseconds (spawn would import torch in every one).
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload(["medpretrain.data.cache"])
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx)
    try:
        pending: dict[Future[int], int] = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < 2 * workers:  # a bounded queue: a kill loses little work
                k = queue.pop(0)
                pending[pool.submit(_build_chunk, folder, k, parts[k], cfg, pixels)] = k
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                k = pending.pop(fut)
                fut.result()
                yield k
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _index(folder: Path, n_chunks: int) -> dict[str, Any]:
    """The finished chunks' records combined (``index.json``, written once all are done)."""
    file = folder / "index.json"
    if file.is_file():
        index: dict[str, Any] = json.loads(file.read_text())
        if index.get("chunks") == n_chunks:
            return index
    records = [json.loads((folder / "chunks" / f"{k:06d}.json").read_text()) for k in range(n_chunks)]
    shapes = {tuple(r["shape"]) for r in records if r["shape"] is not None}
    if len(shapes) > 1:
        raise RuntimeError(f"{folder}: chunks of different image shapes {sorted(shapes)}")
    index = {"chunks": n_chunks, "samples": sum(r["samples"] for r in records),
             "shape": list(shapes.pop()) if shapes else None, "records": records}
    atomic_write_text(file, json.dumps(index))
    return index


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class CachedImages(LazyImages):
    """The images of an on-disk cache as a read-only sequence: ``images[j]`` is float32 ``[C, H, W]`` in [0, 1]
    (one item read from the memory-mapped chunk and dequantised); ``rows`` maps a source sample to its row
    in the cache. Pickles as its file names (DataLoader workers re-open the maps)."""

    what = "cached images"

    def __init__(self, folder: Path, records: list[dict[str, Any]], shape: list[int], rows: np.ndarray):
        self.folder = Path(folder)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.item_shape = tuple(int(s) for s in shape)
        self._chunks = [(k, int(r["samples"]), np.dtype(r["dtype"])) for k, r in enumerate(records)]
        self._starts = np.cumsum([0] + [n for _, n, _ in self._chunks])
        self._maps: list[np.memmap | None] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def arrays(self) -> list[np.memmap | None]:
        """The chunk files as read-only ``np.memmap`` ``[n, C, H, W]`` uint8 / uint16 (``None``: an empty chunk)."""
        if self._maps is None:
            self._maps = [np.memmap(self.folder / "chunks" / f"{k:06d}.bin", dtype=dt, mode="r",
                                    shape=(n, *self.item_shape)) if n else None for k, n, dt in self._chunks]
        return self._maps

    def quantised(self, j: int) -> np.ndarray:
        """Sample ``j``'s stored pixels (uint8 / uint16), without conversion."""
        row = int(self.rows[j])
        c = int(np.searchsorted(self._starts, row, side="right")) - 1
        chunk = self.arrays()[c]
        assert chunk is not None
        return np.asarray(chunk[row - self._starts[c]])

    def item(self, j: int) -> np.ndarray:
        return dequantise(self.quantised(j))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    def __repr__(self) -> str:
        return f"CachedImages({len(self)} x {self.item_shape}, {self.folder})"


def estimated_mb(cfg: DataConfig, files: int) -> float:
    """MB of float32 images for ``files`` decoded files at one sample each (a lower bound for volumes)."""
    side = cfg.image_size or 224
    return files * cfg.channels * side * side * 4 / 2**20


def read_cached(spec: DatasetSpec, reader: Reader, cfg: DataConfig, skips: SkipLog) -> Source | None:
    """The :class:`Source` of ``spec`` with its images in the on-disk cache (built or finished first), or
    ``None`` when ``data.cache`` is ``auto`` and the set is small enough for memory (or not cacheable).

    Raises ConfigError for ``cache: on`` on a source that is not cached or bad cache options; DataError as the
    reader does (unreadable files: when serving, as when decoding, unless ``skip_bad``).
    """
    if cfg.cache_above_mb < 0:
        raise ConfigError(f"config key 'data.cache_above_mb': must be >= 0, got {cfg.cache_above_mb}")
    _workers(cfg)
    if not reader.cacheable:
        if cfg.cache == "auto":
            return None
        _check_cacheable(reader)
    tasks = plan(spec, reader, cfg)
    if cfg.cache == "auto" and estimated_mb(cfg, len(tasks)) <= cfg.cache_above_mb:
        return None
    info = _build(cfg, tasks)
    source, rows, index = serve_source(spec, reader, cfg, skips, tasks, info.folder)
    source.images = CachedImages(info.folder, index["records"], index["shape"], rows)
    log.info("%s: %d sample(s) read from the cache %s", cfg.dataset, len(rows), info.folder)
    return source


def serve_source(spec: DatasetSpec, reader: Reader, cfg: DataConfig, skips: SkipLog, tasks: list[FileTask],
                 folder: Path) -> tuple[Source, np.ndarray, dict[str, Any]]:
    """Run ``reader`` with every decode answered from the built cache (or index) in ``folder``: the
    :class:`Source` (its ``images`` not yet set), each sample's row in the cache (``[N]`` int64; rows number
    the planned files' samples in plan order) and the cache's ``index.json``. Unreadable files raise or are
    skipped as when decoding."""
    index = json.loads((folder / "index.json").read_text())
    records = index["records"]
    offsets: list[tuple[int, int, int, dict[str, Any]]] = []  # per planned file: (row, chunk, local row, record)
    row = 0
    for k, rec in enumerate(records):
        local = 0
        for f in rec["files"]:
            offsets.append((row, k, local, f))
            row += f["n"]
            local += f["n"]
    lookup = {t: i for i, t in enumerate(tasks)}
    thumb_maps: dict[int, np.memmap] = {}

    def thumbs(k: int, local: int, n: int) -> np.ndarray:
        if k not in thumb_maps:
            thumb_maps[k] = np.memmap(folder / "chunks" / f"{k:06d}.thumbs", dtype=np.float32, mode="r",
                                      shape=(records[k]["samples"], 32, 32))
        return np.array(thumb_maps[k][local:local + n])

    def serve(fn: Callable[..., Decoded], path: Path, cfg: Any, rel: str, kwargs: dict[str, Any]) -> Decoded:
        i = lookup.get(_task(fn, path, rel, kwargs))
        if i is None:  # the reader asked for a file it did not plan: a reader that is not deterministic
            raise RuntimeError(f"{path}: not in the cache planned for {cfg.dataset}")
        start, k, local, f = offsets[i]
        if f["n"] == 0:
            raise DataError(path, f["error"])
        name = Path(path).name
        names = [s[1:] if s.startswith("\0") else name + s for s in f["names"]]
        return Decoded(images=np.arange(start, start + f["n"], dtype=np.int64).reshape(-1, 1, 1, 1), names=names,
                       group=f["group"], thumbs=thumbs(k, local, f["n"]) if f["thumbs"] else None)

    with decoding_with(serve):
        source = reader.read(spec, cfg, skips)
    rows = np.asarray(source.images).reshape(-1)
    if len(rows) != len(source.names):
        raise RuntimeError(f"{cfg.dataset}: {len(rows)} cached rows for {len(source.names)} samples")
    return source, rows, index
