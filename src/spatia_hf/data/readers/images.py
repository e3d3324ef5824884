"""Lazy ``(C, H, W)`` access to whole-slide morphology images: a window read never loads the slide.

Instrument images are tens of thousands of pixels square (a 50k x 50k uint16 stain is 5 GB), so
readers hand the builder objects that only support what it needs: ``shape``, ``dtype``, ``ndim``
and ``image[c, r0:r1, c0:c1]`` (steps allowed, for thumbnails). Each reads only the window asked for:

- uncompressed, contiguous TIFF -> ``np.memmap`` (MERSCOPE mosaics; zero decoding);
- tiled / compressed / pyramidal (OME-)TIFF -> tifffile ``aszarr=True`` + zarr, level 0 by default
  (Xenium morphology; only the tiles touched are decoded; JPEG 2000 needs ``imagecodecs``);
- ``.npy`` -> ``np.load(mmap_mode="r")``;
- several single-channel files -> :class:`ChannelStack` (Xenium >= 2.0 ``morphology_focus_000N``);
- one small image per field of view -> :class:`FovMosaic`, a virtual mosaic (CosMx).
"""

from __future__ import annotations

import contextlib
import logging
import math
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf2", ".tf8")
RASTER_SUFFIXES = (".jpg", ".jpeg", ".png")
_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "Å": 1e-4, "pm": 1e-6}
_CHANNEL_AXES = ("C", "S")
_GENERIC_AXES = ("Q", "I")  # tifffile's names for an unlabelled stack of pages; read as channels


@dataclass
class ImageInfo:
    """What was opened and how (recorded in ``Section.uns`` for provenance)."""

    path: str
    axes: str
    shape: tuple[int, int, int]
    dtype: str
    access: str  # "memmap" | "zarr" | "npy" | "stack" | "mosaic" | "memory"
    pixel_size_um: float | None = None
    channel_names: list[str] | None = None
    n_levels: int = 1
    compression: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"path": self.path, "axes": self.axes, "shape": list(self.shape), "dtype": self.dtype,
                "access": self.access, "pixel_size_um": self.pixel_size_um, "channel_names": self.channel_names,
                "n_levels": self.n_levels, "compression": self.compression, **self.extra}


def _as_slice(k, size: int, axis: str) -> tuple[slice, bool]:
    """A key on one axis as a positive-step slice clipped to ``size``, and whether it was an int."""
    if isinstance(k, (int, np.integer)):
        i = int(k) + size if k < 0 else int(k)
        if not 0 <= i < size:
            raise IndexError(f"index {k} out of range for {axis} axis of size {size}")
        return slice(i, i + 1, 1), True
    if not isinstance(k, slice):
        raise TypeError(f"lazy images take ints and slices only, got {type(k).__name__} on the {axis} axis")
    start, stop, step = k.indices(size)
    if step <= 0:
        raise ValueError(f"negative slice steps are not supported on the {axis} axis")
    return slice(start, max(stop, start), step), False


def normalise_key(key, shape: Sequence[int]) -> tuple[tuple[slice, slice, slice], tuple[bool, bool, bool]]:
    """``image[...]`` key -> three positive-step slices over (C, H, W) and which axes were ints."""
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (3 - len(key) + 1) + key[i + 1 :]
    if len(key) > 3:
        raise IndexError(f"too many indices ({len(key)}) for a (C, H, W) image")
    key = key + (slice(None),) * (3 - len(key))
    pairs = [_as_slice(k, int(n), a) for k, n, a in zip(key, shape, "CHW")]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)  # type: ignore[return-value]


def _squeeze(out: np.ndarray, scalar: Sequence[bool]) -> np.ndarray:
    return out[tuple(0 if s else slice(None) for s in scalar)]


def _slice_len(s: slice) -> int:
    return max(0, math.ceil((s.stop - s.start) / s.step))


class LazyImage:
    """Base of the lazy ``(C, H, W)`` images: subclasses implement ``_read(c, rows, cols)``."""

    shape: tuple[int, int, int]
    dtype: np.dtype
    ndim = 3

    def __getitem__(self, key) -> np.ndarray:
        (cs, rs, ws), scalar = normalise_key(key, self.shape)
        return _squeeze(self._read(cs, rs, ws), scalar)

    def _read(self, c: slice, rows: slice, cols: slice) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __array__(self, dtype=None, copy=None):
        """Materialise the whole image (only for small images; the builder never calls this)."""
        out = self[:, :, :]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


class AxesView(LazyImage):
    """A ``(C, H, W)`` view of an array stored with other axes (YX, YXS, ZCYX, TCZYX, ...).

    Axes other than channel / Y / X must have size 1, be fixed with ``fixed={"Z": 3}``, or be
    max-projected with ``project="Z"`` (a lazy maximum-intensity projection: each window reads
    every plane of that window only).
    """

    def __init__(self, array, axes: str, *, fixed: dict[str, int] | None = None, project: str | None = None,
                 source: str = "image"):
        axes = axes.upper()
        if len(axes) != len(array.shape):
            raise ValueError(f"{source}: axes {axes!r} do not match the array shape {tuple(array.shape)}")
        if "Y" not in axes or "X" not in axes:
            raise ValueError(f"{source}: axes {axes!r} have no Y and X. Fix: pass a 2-D image (optionally with "
                             "channels)")
        fixed = {k.upper(): int(v) for k, v in (fixed or {}).items()}
        self.array, self.axes, self.source = array, axes, source
        chans = [i for i, a in enumerate(axes) if a in _CHANNEL_AXES]
        if not chans:
            chans = [i for i, a in enumerate(axes) if a in _GENERIC_AXES][:1]
        if len(chans) > 1:  # C and S both present: keep the one that is not a singleton
            big = [i for i in chans if array.shape[i] > 1]
            if len(big) > 1:
                raise ValueError(f"{source}: both channel axes {axes!r} {tuple(array.shape)} have several planes. "
                                 "Fix: export the stains as (C, Y, X)")
            chans = big or chans[:1]
        self._c = chans[0] if chans else None
        self._y, self._x = axes.index("Y"), axes.index("X")
        self._index: dict[int, Any] = {}
        self._project: int | None = None
        for i, a in enumerate(axes):
            if i in (self._c, self._y, self._x):
                continue
            n = int(array.shape[i])
            if a in fixed:
                if not 0 <= fixed[a] < n:
                    raise ValueError(f"{source}: {a}={fixed[a]} is out of range (axis {a} has {n} planes). "
                                     f"Fix: choose {a} in 0..{n - 1}")
                self._index[i] = fixed[a]
            elif project is not None and a == project.upper():
                self._project = i
            elif n == 1:
                self._index[i] = 0
            else:
                raise ValueError(f"{source}: axis {a!r} has {n} planes (axes {axes!r}, shape {tuple(array.shape)}). "
                                 f"Fix: pick one plane ({a.lower()}=N) or a max projection (project={a!r})")
        c = int(array.shape[self._c]) if self._c is not None else 1
        self.shape = (c, int(array.shape[self._y]), int(array.shape[self._x]))
        self.dtype = np.dtype(array.dtype)

    reopen: tuple[str, dict] | None = None  # (path, open_tiff kwargs) when opened from a file

    def __reduce__(self):
        """An image opened from a file pickles as "open it again" (a few bytes, no pixels): how a section
        reaches a ``spatia convert --num-proc`` worker. Others pickle their array."""
        if self.reopen is not None:
            return _reopen_tiff, self.reopen
        return super().__reduce__()

    @property
    def chunks(self) -> tuple[int, int, int] | None:
        """(C, Y, X) shape of the stored chunks (TIFF tiles / strips), or None: the builder reads
        whole chunks so that each is decoded once (``crops.storage_block``)."""
        ch = getattr(self.array, "chunks", None)
        if ch is None or len(ch) != len(self.axes):
            return None
        return (int(ch[self._c]) if self._c is not None else 1, int(ch[self._y]), int(ch[self._x]))

    def _read(self, c: slice, rows: slice, cols: slice) -> np.ndarray:
        index: list[Any] = [slice(None)] * len(self.axes)
        for i, v in self._index.items():
            index[i] = v
        if self._c is not None:
            index[self._c] = c
        index[self._y], index[self._x] = rows, cols
        try:
            out = np.asarray(self.array[tuple(index)])
        except Exception as err:  # a codec's or zarr's error on damaged tiles (DeflateError, TiffFileError, ...)
            raise ValueError(f"{self.source}: its pixel data cannot be decoded ({type(err).__name__}: {err}). Fix: "
                             "re-copy or re-export the file; it looks corrupt") from None
        kept = [i for i in range(len(self.axes)) if i not in self._index]  # axes still present in ``out``
        if self._project is not None:
            out = out.max(axis=kept.index(self._project))
            kept.remove(self._project)
        order = [kept.index(i) for i in (self._c, self._y, self._x) if i is not None]
        out = np.transpose(out, order)
        if self._c is None:
            out = out[None][c]
        return out


class ChannelStack(LazyImage):
    """Several ``(C_i, H, W)`` lazy images of one section, stacked along channels (one file per stain)."""

    def __init__(self, images: Sequence[Any], sources: Sequence[str] | None = None):
        if not images:
            raise ValueError("ChannelStack: no images given")
        sources = list(sources) if sources is not None else [f"image {i}" for i in range(len(images))]
        h, w = (int(v) for v in images[0].shape[1:])
        dtype = np.dtype(images[0].dtype)
        for img, src in zip(images, sources):
            if tuple(int(v) for v in img.shape[1:]) != (h, w):
                raise ValueError(f"{src}: shape {tuple(img.shape)} differs from {sources[0]} ({h} x {w} px). "
                                 "Fix: stack only stains registered to the same pixel grid")
            if np.dtype(img.dtype) != dtype:
                raise ValueError(f"{src}: dtype {img.dtype} differs from {sources[0]} ({dtype}). Fix: convert the "
                                 "stains to one dtype")
        self.images, self.sources = list(images), sources
        self._first = np.cumsum([0] + [int(img.shape[0]) for img in images])
        self.shape = (int(self._first[-1]), h, w)
        self.dtype = dtype

    def _read(self, c: slice, rows: slice, cols: slice) -> np.ndarray:
        parts = []
        for ch in range(c.start, c.stop, c.step):
            k = int(np.searchsorted(self._first, ch, side="right") - 1)
            j = ch - int(self._first[k])
            parts.append(np.asarray(self.images[k][j : j + 1, rows, cols]))
        if not parts:
            return np.zeros((0, _slice_len(rows), _slice_len(cols)), dtype=self.dtype)
        return np.concatenate(parts, axis=0)


class ChannelSelect(LazyImage):
    """Some channels of a lazy image, in the given order (reads only those channels)."""

    def __init__(self, image, channels: Sequence[int]):
        n = int(image.shape[0])
        bad = [c for c in channels if not 0 <= int(c) < n]
        if bad or not len(channels):
            raise ValueError(f"channels {list(channels)}: expected indices in 0..{n - 1}")
        self.image, self.channels = image, [int(c) for c in channels]
        self.shape = (len(self.channels), int(image.shape[1]), int(image.shape[2]))
        self.dtype = np.dtype(image.dtype)

    def _read(self, c: slice, rows: slice, cols: slice) -> np.ndarray:
        picked = self.channels[c]
        if not picked:
            return np.zeros((0, _slice_len(rows), _slice_len(cols)), dtype=self.dtype)
        return np.concatenate([np.asarray(self.image[k : k + 1, rows, cols]) for k in picked], axis=0)


# ----------------------------------------------------------------------------- opening files


def ome_pixels(path: str | Path) -> tuple[float | None, list[str] | None]:
    """OME ``PhysicalSizeX`` (µm) and channel names recorded in a TIFF's OME-XML (None when absent)."""
    import tifffile

    try:
        with tifffile_messages(), tifffile.TiffFile(path) as tf:
            return _ome_pixels(tf)
    except Exception as err:  # TiffFileError, struct.error, ... on a damaged file
        raise ValueError(f"image {path}: not a readable TIFF ({type(err).__name__}: {err}). Fix: re-export or "
                         "re-copy the file") from None


def _ome_pixels(tf) -> tuple[float | None, list[str] | None]:
    """OME ``PhysicalSizeX`` (µm) and channel names of the first image, when recorded."""
    if not tf.is_ome or not tf.ome_metadata:
        return None, None
    try:
        root = ET.fromstring(tf.ome_metadata)
    except ET.ParseError:
        return None, None
    pixels = next((e for e in root.iter() if e.tag.endswith("Pixels")), None)
    if pixels is None:
        return None, None
    size = pixels.get("PhysicalSizeX")
    unit = pixels.get("PhysicalSizeXUnit", "µm")
    try:
        px = float(size) * _UNIT_TO_UM.get(unit, 1.0) if size else None
    except ValueError:  # an unreadable PhysicalSizeX counts as absent: the caller asks for the pixel size
        px = None
    if px is not None and not (np.isfinite(px) and px > 0):
        px = None
    names = [c.get("Name") for c in pixels if c.tag.endswith("Channel")]
    return px, (names if names and all(names) else None)


def _check_codec(path: Path, compression) -> None:
    import tifffile

    code = int(compression)
    if code == 1:
        return
    try:
        tifffile.TIFF.DECOMPRESSORS[code]
    except (KeyError, ValueError, ImportError) as err:
        raise ValueError(f"image {path}: compression {getattr(compression, 'name', code)} cannot be decoded here "
                         f"({err}). Fix: pip install imagecodecs (Xenium stains are JPEG 2000 compressed)") from None


def _check_complete(level, path: Path) -> None:
    """Refuse a truncated copy now: tiles/strips that end past the end of their file would otherwise
    fail to decode (or decode as zeros) deep inside the builder, naming neither the file nor a fix."""
    for page in level.pages:
        if page is None or not len(page.dataoffsets):
            continue
        fh = page.parent.filehandle
        end = int(max(int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts)))
        if end > fh.size:
            raise ValueError(f"image {Path(fh.dirname) / fh.name if fh.dirname else path}: truncated: its pixel data "
                             f"end at byte {end} but the file has {fh.size} bytes. Fix: re-copy or re-export the file")


@contextlib.contextmanager
def tifffile_messages() -> Iterator[list[str]]:
    """Collect what tifffile logs while a file is opened instead of printing it.

    Real instrument mosaics carry OME descriptions tifffile cannot parse: it logs "OME series raised
    ParseError" (once per open, and again when the zarr store reopens the file) and falls back to the
    plain TIFF pages, which is what the readers use anyway. The messages are kept (``ImageInfo.extra``,
    hence the dataset's provenance) rather than shown; a failure that matters raises an error of ours.
    """
    logger = logging.getLogger("tifffile")
    seen: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if text not in seen:
                seen.append(text)

    handler, propagate = _Collect(level=logging.DEBUG), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def open_tiff(path: str | Path, *, series: int = 0, level: int = 0, fixed: dict[str, int] | None = None,
              project: str | None = None, memmap: bool = True, ome: bool = True) -> tuple[Any, ImageInfo]:
    """Open a (OME-)TIFF lazily as ``(C, H, W)``; level 0 of a pyramid unless ``level`` is given.

    Uncompressed contiguous data becomes an ``np.memmap``; anything else a zarr array over
    tifffile's store, so only the tiles/strips a window touches are read and decoded.

    Args:
        path: the TIFF file.
        series, level: tifffile series and pyramid level (0 = full resolution).
        fixed: planes to pick on extra axes, e.g. ``{"Z": 3}``.
        project: an extra axis to max-project lazily (``"Z"`` for a z-stack such as Xenium's
            ``morphology.ome.tif``).
        memmap: allow the memory-map fast path (set False to force zarr, e.g. to test it).
        ome: interpret OME metadata. A file of a multi-file OME set (Xenium >= 2.0 writes one
            stain per file, each carrying the XML of all) opens as the whole set; ``ome=False``
            reads only this file's own planes and pyramid.

    What tifffile logs while opening (e.g. an OME description it cannot parse) is kept in
    ``info.extra["tifffile_messages"]``, not printed (see :func:`tifffile_messages`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist. Fix: check the path (and the instrument bundle layout)")
    with tifffile_messages() as messages:
        image, info = _open_tiff(path, series, level, fixed, project, memmap, ome)
    if messages:
        info.extra["tifffile_messages"] = list(messages)
    return image, info


def _open_tiff(path: Path, series: int, level: int, fixed: dict[str, int] | None, project: str | None,
               memmap: bool, ome: bool) -> tuple[Any, ImageInfo]:
    import tifffile

    try:
        tf = tifffile.TiffFile(path, is_ome=ome)
    except Exception as err:  # tifffile raises TiffFileError, struct.error, ValueError on broken files
        raise ValueError(f"image {path}: not a readable TIFF ({type(err).__name__}: {err}). Fix: re-export or "
                         "re-copy the file") from None
    try:
        return _open_level(tf, path, series, level, fixed, project, memmap, ome)
    except ValueError as err:
        if "Fix:" in str(err) and type(err).__module__ == "builtins":
            raise
        raise ValueError(f"image {path}: not a readable TIFF ({type(err).__name__}: {err}). Fix: re-export or "
                         "re-copy the file") from None
    except Exception as err:  # tifffile reads tags and pages lazily: TiffFileError, struct.error, KeyError, ...
        raise ValueError(f"image {path}: not a readable TIFF ({type(err).__name__}: {err}). Fix: re-export or "
                         "re-copy the file") from None


def _open_level(tf, path: Path, series: int, level: int, fixed, project, memmap: bool, ome: bool):
    import tifffile

    with tf:
        if not tf.series:
            raise ValueError(f"image {path}: not a readable TIFF (no image in it). Fix: re-export or re-copy the file")
        if not 0 <= series < len(tf.series):
            raise ValueError(f"image {path}: series={series} but the file has {len(tf.series)} series. Fix: choose "
                             f"series 0..{len(tf.series) - 1}")
        s = tf.series[series]
        if not 0 <= level < len(s.levels):
            raise ValueError(f"image {path}: level={level} but the pyramid has {len(s.levels)} levels. Fix: choose "
                             f"level 0..{len(s.levels) - 1}")
        lv = s.levels[level]
        _check_complete(lv, path)
        axes, shape, n_levels = lv.axes.upper(), tuple(int(v) for v in lv.shape), len(s.levels)
        downsample = float(s.levels[0].shape[axes.index("X")]) / shape[axes.index("X")] if "X" in axes else 1.0
        page = lv.keyframe
        compression = page.compression
        offset = lv.dataoffset if memmap and int(compression) == 1 else None
        dtype = np.dtype(lv.dtype).newbyteorder(tf.byteorder)
        px, names = _ome_pixels(tf)
    _check_codec(path, compression)
    if offset is not None:
        array, access = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape), "memmap"
    else:
        import zarr

        store = tifffile.imread(path, aszarr=True, series=series, level=level, is_ome=ome)
        array, access = zarr.open(store, mode="r"), "zarr"
    image = AxesView(array, axes, fixed=fixed, project=project, source=f"image {path}")
    # Pickling (to a conversion worker process) re-opens the file there instead of copying the pixels or
    # failing on tifffile's lock: see AxesView.__reduce__.
    image.reopen = (str(path), {"series": series, "level": level, "fixed": fixed, "project": project,
                                "memmap": memmap, "ome": ome})
    if names is not None and len(names) != image.shape[0]:
        names = None
    info = ImageInfo(str(path), axes, image.shape, str(image.dtype), access, px, names, n_levels,
                     getattr(compression, "name", str(compression)), {"level": level, "downsample": downsample})
    return image, info


def _reopen_tiff(path: str, kwargs: dict) -> "AxesView":
    return open_tiff(path, **kwargs)[0]


def open_image(path: str | Path, **kwargs) -> tuple[Any, ImageInfo]:
    """Open any supported morphology image lazily: TIFF/OME-TIFF, ``.npy`` (memory-mapped), or a
    small JPEG/PNG (decoded in memory; fine for CosMx FOV composites, not for whole slides)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return open_tiff(path, **kwargs)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist. Fix: check the path")
    if suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        axes = {2: "YX", 3: "CYX"}.get(arr.ndim)
        if axes is None:
            raise ValueError(f"image {path}: {arr.ndim}-D array. Fix: save (C, H, W) or (H, W)")
        image = AxesView(arr, axes, source=f"image {path}")
        return image, ImageInfo(str(path), axes, image.shape, str(image.dtype), "npy")
    if suffix in RASTER_SUFFIXES:
        arr = read_raster(path)
        return arr, ImageInfo(str(path), "CYX", tuple(arr.shape), str(arr.dtype), "memory")
    raise ValueError(f"image {path}: unsupported extension {path.suffix!r}. Fix: pass a .tif/.ome.tif, .npy, "
                     ".jpg or .png image")


def read_raster(path: str | Path) -> np.ndarray:
    """A JPEG/PNG decoded to ``(C, H, W)`` (RGB -> 3 channels, grey -> 1)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except Exception as err:
        raise ValueError(f"image {path}: cannot be decoded ({type(err).__name__}: {err}). Fix: re-copy the file") \
            from None
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(np.moveaxis(arr, -1, 0))


# ----------------------------------------------------------------------------- virtual mosaic


@dataclass(frozen=True)
class FovTile:
    """Where one field-of-view image sits in the mosaic.

    Attributes:
        fov: the FOV number.
        path: its image file (TIFF opened lazily; JPEG/PNG decoded on first use and cached).
        row0, col0: mosaic pixel of the tile's top-left corner (may be negative before shifting).
        height, width: tile size in pixels.
        flip_y: the file's rows run opposite to the mosaic's (row ``i`` of the file lands on
            mosaic row ``row0 + height - 1 - i``).
    """

    fov: int
    path: str
    row0: int
    col0: int
    height: int
    width: int
    flip_y: bool = False


class FovMosaic(LazyImage):
    """A virtual ``(C, H, W)`` mosaic served from per-FOV image files (CosMx ``CellComposite``).

    Nothing is stitched on disk: a window read finds the tiles it overlaps, reads only their part
    of the window (flipped in y where the tile says so) and pastes it; pixels no tile covers are 0,
    and where tiles overlap the later FOV in ``tiles`` wins. Decoded JPEG/PNG tiles are kept in an
    LRU cache of at most ``cache_bytes``; TIFF tiles are read lazily (memmap/zarr) without caching.
    """

    def __init__(self, tiles: Sequence[FovTile], n_channels: int, dtype, *, cache_bytes: int = 512 * 2**20,
                 opener: Callable[[str], Any] | None = None):
        if not tiles:
            raise ValueError("FovMosaic: no FOV tiles given")
        self.tiles = list(tiles)
        r0 = min(t.row0 for t in self.tiles)
        c0 = min(t.col0 for t in self.tiles)
        if (r0, c0) != (0, 0):
            raise ValueError(f"FovMosaic: tiles must start at row/col 0 (min row0={r0}, col0={c0}); shift them")
        h = max(t.row0 + t.height for t in self.tiles)
        w = max(t.col0 + t.width for t in self.tiles)
        self.shape = (int(n_channels), int(h), int(w))
        self.dtype = np.dtype(dtype)
        self._rows = np.array([[t.row0, t.row0 + t.height] for t in self.tiles], dtype=np.int64)
        self._cols = np.array([[t.col0, t.col0 + t.width] for t in self.tiles], dtype=np.int64)
        self._opener = opener or (lambda p: open_image(p)[0])
        self._lazy: dict[str, Any] = {}
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_bytes = int(cache_bytes)
        self.n_file_reads = 0  # how many times a tile file was opened or decoded (for tests / benchmarks)

    def _source(self, tile: FovTile):
        key = tile.path
        if key in self._lazy:
            return self._lazy[key]
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        self.n_file_reads += 1
        src = self._opener(key)
        shape = tuple(int(v) for v in src.shape)
        if shape != (self.shape[0], tile.height, tile.width):
            raise ValueError(f"FOV {tile.fov} image {key}: shape {shape}, expected ({self.shape[0]}, {tile.height}, "
                             f"{tile.width}) like the other FOVs. Fix: use one image folder (same stains, same size)")
        if isinstance(src, np.ndarray) and not isinstance(src, np.memmap):
            self._cache[key] = src
            total = sum(a.nbytes for a in self._cache.values())
            while total > self._cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                total -= old.nbytes
        else:
            self._lazy[key] = src
        return src

    def _read(self, c: slice, rows: slice, cols: slice) -> np.ndarray:
        rr = np.arange(rows.start, rows.stop, rows.step, dtype=np.int64)
        cc = np.arange(cols.start, cols.stop, cols.step, dtype=np.int64)
        out = np.zeros((_slice_len(c), len(rr), len(cc)), dtype=self.dtype)
        if not len(rr) or not len(cc) or not out.shape[0]:
            return out
        hit = np.flatnonzero((self._rows[:, 0] <= rr[-1]) & (self._rows[:, 1] > rr[0])
                             & (self._cols[:, 0] <= cc[-1]) & (self._cols[:, 1] > cc[0]))
        for i in hit:
            t = self.tiles[i]
            ri = np.flatnonzero((rr >= t.row0) & (rr < t.row0 + t.height))
            ci = np.flatnonzero((cc >= t.col0) & (cc < t.col0 + t.width))
            if not len(ri) or not len(ci):
                continue
            local_r = rr[ri] - t.row0
            file_r = (t.height - 1 - local_r) if t.flip_y else local_r
            file_c = cc[ci] - t.col0
            lo_r, hi_r = int(file_r.min()), int(file_r.max()) + 1
            lo_c, hi_c = int(file_c.min()), int(file_c.max()) + 1
            box = np.asarray(self._source(t)[c, lo_r:hi_r, lo_c:hi_c])
            out[np.ix_(np.arange(out.shape[0]), ri, ci)] = box[np.ix_(np.arange(box.shape[0]), file_r - lo_r,
                                                                       file_c - lo_c)]
        return out
