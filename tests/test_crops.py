"""Crop loop speed-ups keep the bytes: in-place window resizing, chunk-aligned tile reads, threads."""

from dataclasses import replace

import numpy as np
import pytest

from spatia_hf.data.builder import build_multiscale_dataset
from spatia_hf.data.crops import WINDOW_GEMM_MIN_PX, CropResampler, Tile, TileGrid, _rectangles, storage_block
from spatia_hf.data.synthetic import make_synthetic_sections


def _tile(rng, c: int, size: int, r0: int = -7, c0: int = 5) -> Tile:
    data = rng.integers(0, 65535, size=(c, size, size)).astype(np.uint16).astype(np.float32)
    data[:, : size // 5] = 0  # a zero-padded band, as at an image border
    return Tile(0, 0, r0, c0, data)


@pytest.mark.parametrize("c,size_in,size_out", [(1, 151, 64), (2, 235, 64), (3, WINDOW_GEMM_MIN_PX, 20),
                                                (2, 40, 64), (1, 64, 32), (2, 32, 32)])
def test_resizing_in_the_tile_gives_the_bytes_of_the_gathered_windows(c, size_in, size_out):
    rng = np.random.default_rng(0)
    tile = _tile(rng, c, 600)
    rows0 = tile.r0 + rng.integers(0, 600 - size_in + 1, 40)
    cols0 = tile.c0 + rng.integers(0, 600 - size_in + 1, 40)
    low, high = rng.uniform(0, 500, c), rng.uniform(20000, 60000, c)
    resample = CropResampler(size_in, size_out)
    got = resample.from_tile(tile, rows0, cols0, low, high)
    ref = resample(tile.gather(rows0, cols0, size_in), low, high)
    assert got.dtype == np.uint8 and got.shape == (40, c, size_out, size_out)
    assert np.array_equal(got, ref)
    assert np.array_equal(resample.from_tile(tile, rows0[:0], cols0[:0], low, high), ref[:0])


def test_windows_outside_the_tile_are_refused():
    rng = np.random.default_rng(1)
    tile = _tile(rng, 1, 300)
    resample = CropResampler(151, 64)
    for rows0, cols0 in (([tile.r0 - 1], [tile.c0]), ([tile.r0], [tile.c0 + 300 - 150])):
        with pytest.raises(ValueError, match="leave the tile"):
            resample.from_tile(tile, np.array(rows0), np.array(cols0), np.zeros(1), np.ones(1))


@pytest.mark.parametrize("seed", range(5))
def test_rectangles_cover_exactly_the_missing_chunks(seed):
    mask = np.random.default_rng(seed).random((6, 7)) < 0.6
    mask[2:5, 1:4] = True
    cover = np.zeros(mask.shape, dtype=int)
    for i0, i1, j0, j1 in _rectangles(mask):
        cover[i0:i1, j0:j1] += 1
    assert np.array_equal(cover, mask.astype(int))  # every missing chunk read once, nothing else
    assert len(_rectangles(np.ones((5, 4), bool))) == 1


class _ChunkedImage:
    """A (C, H, W) array stored in ``chunks``, counting how often each chunk is decoded by a read."""

    def __init__(self, arr: np.ndarray, chunks: tuple[int, int]):
        self.arr, self.shape, self.dtype, self.ndim = arr, arr.shape, arr.dtype, 3
        self.chunks = (arr.shape[0], *chunks)
        self.decoded = np.zeros((-(-arr.shape[1] // chunks[0]), -(-arr.shape[2] // chunks[1])), dtype=int)

    def __getitem__(self, key):
        _, rows, cols = key
        bh, bw = self.chunks[1:]
        r1, c1 = min(rows.stop, self.shape[1]), min(cols.stop, self.shape[2])
        self.decoded[rows.start // bh : (r1 - 1) // bh + 1, cols.start // bw : (c1 - 1) // bw + 1] += 1
        return self.arr[key]


@pytest.mark.parametrize("chunks,cache_bytes", [((32, 32), 2**30), ((24, 40), 2**30), ((32, 32), 20_000)])
def test_chunk_aligned_reads_equal_direct_reads_and_decode_each_chunk_once(chunks, cache_bytes):
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 4000, size=(2, 250, 310)).astype(np.uint16)
    direct_img, cached_img = _ChunkedImage(arr, chunks), _ChunkedImage(arr, chunks)
    direct = TileGrid(direct_img, 64, 13)
    cached = TileGrid(cached_img, 64, 13, block=storage_block(cached_img), cache_bytes=cache_bytes)
    need = (-40, 10, 90, 120)  # a tile grown past its margin (positions clamped onto the grid)
    for flat in range(direct.n_rows * direct.n_cols):
        a, b = direct.read(flat, need if flat == 3 else None), cached.read(flat, need if flat == 3 else None)
        assert (a.r0, a.c0) == (b.r0, b.c0) and b.data.dtype == arr.dtype and np.array_equal(a.data, b.data)
        assert sum(v.nbytes for v in cached.cache.blocks.values()) <= cache_bytes
    assert direct_img.decoded.max() >= 4  # margins overlap: direct reads decode chunks several times
    if cache_bytes > 2**20:
        assert cached_img.decoded.max() <= 2 and cached_img.decoded.mean() < 1.2  # the grown tile 3 reaches back
    assert not cached.cache.blocks  # nothing is kept once the last tile is read


def test_chunk_block_comes_from_the_image():
    assert storage_block(np.zeros((1, 8, 8))) is None
    assert storage_block(_ChunkedImage(np.zeros((2, 64, 64), np.uint16), (16, 32))) == (16, 32)


def test_threaded_chunked_build_writes_the_bytes_of_a_sequential_plain_build(tmp_path, monkeypatch):
    """Chunk-aligned reads, the crop threads and concurrent shard writes do not change a byte."""
    import spatia_hf.data.builder as builder

    s = make_synthetic_sections(1, 200, seed=3)[0]
    chunked = replace(s, image=_ChunkedImage(np.asarray(s.image), (48, 40)))
    kw = dict(crop_um=60.0, crop_px=24, niche_um=70.0, niche_px=16, thumb_px=32, tile_px=96, cell_shard_rows=32,
              niche_shard_rows=8, progress=False)  # 120 px cell windows: resized in place in their tile
    with monkeypatch.context() as m:  # one crop thread, one shard at a time
        for name in ("CROP_THREADS", "SHARD_THREADS", "SHARDS_IN_FLIGHT"):
            m.setattr(builder, name, 1)
        a = build_multiscale_dataset([s], tmp_path / "plain", **kw)
    b = build_multiscale_dataset([chunked], tmp_path / "chunked", **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    assert len(files) >= 8 and files == sorted(p.relative_to(b) for p in b.rglob("*.parquet"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    uncached = replace(s, image=_ChunkedImage(np.asarray(s.image), (48, 40)))
    monkeypatch.setattr(builder, "storage_block", lambda image: None)
    build_multiscale_dataset([uncached], tmp_path / "uncached", **kw)
    # the same reads elsewhere (validation, normalisation, thumbnail), fewer chunk decodes for the crops
    assert chunked.image.decoded.sum() < 0.75 * uncached.image.decoded.sum()
