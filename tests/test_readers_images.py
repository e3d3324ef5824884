"""Lazy (C, H, W) images: views equal numpy, windows are read without loading the slide, mosaics stitch."""

import tracemalloc

import numpy as np
import pytest
import tifffile

from instrument_fixtures import write_ome_tiff
from spatia_hf.data.readers.images import (
    AxesView,
    ChannelSelect,
    ChannelStack,
    FovMosaic,
    FovTile,
    _check_codec,
    open_image,
    open_tiff,
)

KEYS = [np.s_[:, 3:17, 5:29], np.s_[1, 4:9, 2:30:3], np.s_[0:2, ::4, ::5], np.s_[:, 7, 3:8], np.s_[-1], np.s_[..., 2:4]]


@pytest.mark.parametrize("axes,fixed,project", [
    ("YX", None, None), ("YXS", None, None), ("CYX", None, None), ("ZCYX", {"Z": 1}, None), ("ZCYX", None, "Z"),
    ("TCZYX", {"Z": 2}, None),
])
def test_axes_view_equals_numpy(axes, fixed, project):
    rng = np.random.default_rng(0)
    sizes = {"Y": 20, "X": 30, "C": 3, "S": 3, "Z": 3, "T": 1}
    arr = rng.integers(0, 1000, size=[sizes[a] for a in axes]).astype(np.uint16)
    ref = arr
    order = axes
    if "T" in order:
        ref, order = ref[0], order.replace("T", "")
    if "Z" in order:
        ref = ref.max(axis=order.index("Z")) if project else np.take(ref, fixed["Z"], axis=order.index("Z"))
        order = order.replace("Z", "")
    if order == "YX":
        ref = ref[None]
    elif order == "YXS":
        ref = np.moveaxis(ref, -1, 0)
    view = AxesView(arr, axes, fixed=fixed, project=project)
    assert view.shape == ref.shape and view.dtype == np.uint16
    for key in KEYS:
        if view.shape[0] == 1 and key in (KEYS[1], KEYS[2], KEYS[4]):
            continue
        np.testing.assert_array_equal(view[key], ref[key])


def test_axes_view_refuses_ambiguous_planes():
    with pytest.raises(ValueError, match="axis 'Z' has 3 planes.*z=N.*project='Z'"):
        AxesView(np.zeros((3, 4, 5)), "ZYX")


def test_open_tiff_memmaps_plain_and_zarrs_tiled_pyramids(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 60000, size=(2, 96, 130)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "plain.tif", img)
    write_ome_tiff(tmp_path / "pyr.ome.tif", img, "CYX", 0.2125, channel_names=["DAPI", "18S"], levels=3, tile=32)
    plain, pinfo = open_tiff(tmp_path / "plain.tif")
    pyr, info = open_tiff(tmp_path / "pyr.ome.tif")
    assert pinfo.access == "memmap" and info.access == "zarr"
    assert info.pixel_size_um == pytest.approx(0.2125) and info.channel_names == ["DAPI", "18S"] and info.n_levels == 3
    for key in KEYS:
        np.testing.assert_array_equal(plain[key], img[key])
        np.testing.assert_array_equal(pyr[key], img[key])
    lvl1, info1 = open_tiff(tmp_path / "pyr.ome.tif", level=1)
    np.testing.assert_array_equal(lvl1[:, :, :], img[:, ::2, ::2])
    assert info1.extra["downsample"] == 2.0
    forced, finfo = open_tiff(tmp_path / "plain.tif", memmap=False)
    assert finfo.access == "zarr" and np.array_equal(forced[:, 5:9, 1:60:7], img[:, 5:9, 1:60:7])


@pytest.mark.parametrize("tiled", [True, False])
def test_window_reads_do_not_load_the_slide(tmp_path, tiled):
    """A 10 x 10 window of a 64 MB stain allocates well under 1% of it."""
    h = w = 4096
    path = tmp_path / "big.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        if tiled:  # streamed tile by tile, as a slide scanner writes it
            tiles = (np.full((256, 256), k, dtype=np.uint16) for k in range((h // 256) * (w // 256)))
            tw.write(tiles, shape=(h, w), dtype=np.uint16, tile=(256, 256), compression="zlib")
        else:
            tw.write(np.zeros((h, w), np.uint16))
    image, info = open_tiff(path)
    assert info.access == ("zarr" if tiled else "memmap")
    tracemalloc.start()
    window = image[:, 3000:3010, 1000:1010]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert window.shape == (1, 10, 10)
    if tiled:
        assert (window == (3000 // 256) * (w // 256) + 1000 // 256).all()  # the right tile was decoded
    assert peak < 0.01 * h * w * 2, peak


def test_channel_stack_and_select():
    a, b = np.arange(2 * 6 * 7).reshape(2, 6, 7), 100 + np.arange(6 * 7).reshape(1, 6, 7)
    stack = ChannelStack([a, b], ["a.tif", "b.tif"])
    ref = np.concatenate([a, b])
    for key in (np.s_[:, 1:4, 2:6], np.s_[2, ::2, ::3], np.s_[1:3, 5, :]):
        np.testing.assert_array_equal(stack[key], ref[key])
    np.testing.assert_array_equal(ChannelSelect(stack, [2, 0])[:, :, :], ref[[2, 0]])
    with pytest.raises(ValueError, match=r"b.tif: shape \(1, 5, 7\) differs from a.tif"):
        ChannelStack([a, b[:, :5]], ["a.tif", "b.tif"])


def test_fov_mosaic_equals_an_explicit_stitch(tmp_path):
    """Overlapping, flipped tiles from TIFF and PNG files equal a numpy mosaic painted in the same order."""
    from PIL import Image

    rng = np.random.default_rng(2)
    tiles, ref = [], np.zeros((3, 70, 90), np.uint8)
    for k, (r0, c0, flip) in enumerate([(0, 0, True), (0, 40, False), (30, 10, True), (35, 50, False)]):
        data = rng.integers(0, 255, size=(3, 35, 40), dtype=np.uint8)
        path = tmp_path / (f"F{k:03d}.png" if k % 2 else f"F{k:03d}.tif")
        if k % 2:
            Image.fromarray(np.moveaxis(data, 0, -1)).save(path)
        else:
            tifffile.imwrite(path, data)
        tiles.append(FovTile(k, str(path), r0, c0, 35, 40, flip))
        ref[:, r0 : r0 + 35, c0 : c0 + 40] = data[:, ::-1] if flip else data
    mosaic = FovMosaic(tiles, 3, np.uint8, cache_bytes=5000)
    assert mosaic.shape == (3, 70, 90)
    for key in (np.s_[:, :, :], np.s_[:, 20:50, 30:60], np.s_[1, 3:69:4, ::7], np.s_[0:2, 34, 39:52], np.s_[:, 65:70, 0:5]):
        np.testing.assert_array_equal(mosaic[key], ref[key])


def test_open_image_npy_and_codec_errors(tmp_path):
    arr = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)
    np.save(tmp_path / "a.npy", arr)
    img, info = open_image(tmp_path / "a.npy")
    assert info.access == "npy" and np.array_equal(img[:, 1:3, ::2], arr[:, 1:3, ::2])
    with pytest.raises(ValueError, match="cannot be decoded here.*pip install imagecodecs"):
        _check_codec(tmp_path / "x.tif", 12345)  # a compression code no codec knows
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ValueError, match="bad.tif: not a readable TIFF"):
        open_tiff(tmp_path / "bad.tif")
    with pytest.raises(FileNotFoundError, match="missing.tif does not exist"):
        open_image(tmp_path / "missing.tif")
