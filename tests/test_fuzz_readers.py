"""Property-based fuzzing (hypothesis) of the readers and the processor.

Each example copies a valid instrument bundle (``instrument_fixtures``), damages ONE file of it (random
truncation, bit flips, or an edit of one field: a JSON key, a Parquet / CSV column or cell, an HDF5
dataset, the affine, an OME-XML attribute), reads it, and touches the image pixels. The outcome must be a
valid ``Section`` (it passes ``validate_section``) or ONE clear error of the package: a builtin error type
(not an exception class of h5py / pyarrow / tifffile / pandas / numpy leaking out) whose message carries a
``Fix:`` hint. Nothing may be written next to the input, and no example may hang (a per-example alarm).

Budgets: the ``fuzz-quick`` profile (15 examples per target, derandomised, so CI is repeatable) runs in the
default suite; ``fuzz-deep`` (200 random examples per target) runs under ``-m slow``.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from instrument_fixtures import write_cosmx, write_merscope, write_xenium  # noqa: E402

from spatia_hf.data.validation import validate_section  # noqa: E402

settings.register_profile("fuzz-quick", max_examples=15, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("fuzz-deep", max_examples=200, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
BUDGETS = [pytest.param("fuzz-quick", id="quick"), pytest.param("fuzz-deep", id="deep", marks=pytest.mark.slow)]
EXAMPLE_TIMEOUT_S = 60
LEAKY_MODULES = ("h5py", "pyarrow", "tifffile", "pandas", "numpy", "scipy", "anndata", "PIL", "imagecodecs", "zarr")


# ----------------------------------------------------------------------------- the property
class Hang(Exception):
    pass


@contextmanager
def alarm(seconds: int):
    def fire(signum, frame):
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def clear_error(err: BaseException) -> str | None:
    """None when ``err`` is one clear error of the package, else what is wrong with it."""
    module = type(err).__module__.split(".")[0]
    if isinstance(err, Hang):
        return f"hang: {err}"
    if module in LEAKY_MODULES or not isinstance(err, (ValueError, OSError, KeyError, TypeError)):
        return f"a {type(err).__module__}.{type(err).__name__} leaked out: {err}"
    if module not in ("builtins", "spatia_hf"):
        return f"an error class of {module} leaked out: {type(err).__name__}: {err}"
    if "Fix:" not in str(err):
        return f"no 'Fix:' hint in {type(err).__name__}: {err}"
    return None


def touch_pixels(section) -> None:
    """Read the image's corners and a middle block (lazy images decode here)."""
    c, h, w = section.image.shape
    for r, q in ((0, 0), (max(h - 8, 0), max(w - 8, 0)), (h // 2, w // 2)):
        block = np.asarray(section.image[:, r: r + 8, q: q + 8])
        assert block.shape[0] == c


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def check_outcome(read: Callable[[Path], object], folder: Path) -> None:
    """The property: a valid Section or one clear error; no hang; nothing written."""
    before = listing(folder.parent)
    try:
        with alarm(EXAMPLE_TIMEOUT_S), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            section = read(folder)
            touch_pixels(section)
            validate_section(section, outside="drop")
    except BaseException as err:  # noqa: BLE001 (the property is about which errors get out)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        problem = clear_error(err)
        assert problem is None, problem
    assert listing(folder.parent) == before, "the reader wrote next to its input"


# ----------------------------------------------------------------------------- damage
@st.composite
def truncation(draw, files: list[str]):
    return ("truncate", draw(st.sampled_from(files)), draw(st.floats(0.0, 0.999)))


@st.composite
def bit_flips(draw, files: list[str]):
    name = draw(st.sampled_from(files))
    where = draw(st.lists(st.tuples(st.floats(0.0, 0.999), st.integers(0, 7)), min_size=1, max_size=8))
    head = draw(st.booleans())  # half the examples hit the first 4 KiB: headers, IFDs, HDF5 superblock, CSV header
    return ("flip", name, (head, where))


def apply_damage(folder: Path, damage) -> None:
    kind, name, arg = damage
    path = folder / name
    data = bytearray(path.read_bytes())
    if kind == "truncate":
        path.write_bytes(bytes(data[: int(len(data) * arg)]))
    elif kind == "flip":
        head, where = arg
        span = min(len(data), 4096) if head else len(data)
        for frac, bit in where:
            if span:
                data[int(frac * span)] ^= 1 << bit
        path.write_bytes(bytes(data))
    else:
        arg(path)


@contextmanager
def damaged_copy(template: Path, damage):
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        folder = root / template.name
        shutil.copytree(template, folder)
        apply_damage(folder, damage)
        yield folder
    finally:
        shutil.rmtree(root)


class Edit:
    """A named edit of one file (the name is what hypothesis prints for a falsifying example)."""

    def __init__(self, description: str, fn: Callable[[Path], None]):
        self.description, self.fn = description, fn

    def __call__(self, target):
        return self.fn(target)

    def __repr__(self) -> str:
        return self.description


WEIRD_VALUES = st.sampled_from([None, "", "abc", -1, 0, 1e308, float("nan"), float("inf"), -0.5, [], {}, True,
                                "0.5", 2**63])


def json_edit(draw, keys: list[str]):
    key = draw(st.sampled_from(keys + ["__all__"]))
    value = draw(WEIRD_VALUES)
    delete = draw(st.booleans())

    def edit(path: Path) -> None:
        if key == "__all__":
            path.write_text(json.dumps(value))
            return
        meta = json.loads(path.read_text())
        if delete:
            meta.pop(key, None)
        else:
            meta[key] = value
        path.write_text(json.dumps(meta))

    return Edit(f"json {'delete' if delete else 'set'} {key}={value!r}", edit)


def frame_edit(draw, columns: list[str], n_rows: int):
    """An edit of a table: drop / rename a column, overwrite one cell or a whole column with a weird value,
    duplicate a row, or keep only the header."""
    op = draw(st.sampled_from(["drop", "rename", "cell", "column", "duplicate", "header-only", "shuffle-cols"]))
    col = draw(st.sampled_from(columns))
    row = draw(st.integers(0, max(n_rows - 1, 0)))
    value = draw(st.sampled_from([None, "", "x;y", "nan", "inf", "-inf", -5, 1e30, "1,5", "\u00e9\u00e8", 3.7]))

    def edit(df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        if op == "drop":
            return df.drop(columns=[col])
        if op == "rename":
            return df.rename(columns={col: col + "_x"})
        if op == "cell":
            df[col] = df[col].astype(object)
            df.iloc[min(row, len(df) - 1), df.columns.get_loc(col)] = value
            return df
        if op == "column":
            df[col] = [value] * len(df)
            return df
        if op == "duplicate":
            return pd.concat([df, df.iloc[[min(row, len(df) - 1)]]])
        if op == "header-only":
            return df.iloc[:0]
        return df[list(reversed(df.columns))]

    return Edit(f"table {op} {col} row {row} value {value!r}", edit)


# ----------------------------------------------------------------------------- Xenium
@pytest.fixture(scope="module")
def xenium_template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xenium") / "bundle"
    write_xenium(folder, n_cells=20, n_genes=6, image_hw=(96, 128), layout="v2")
    return folder


XENIUM_FILES = ["cell_feature_matrix.h5", "cells.parquet", "experiment.xenium",
                "morphology_focus/morphology_focus_0000.ome.tif", "morphology_focus/morphology_focus_0002.ome.tif"]
H5_FIELDS = ["matrix/data", "matrix/indices", "matrix/indptr", "matrix/shape", "matrix/barcodes", "matrix/features/id",
             "matrix/features/name", "matrix/features/feature_type"]


@st.composite
def xenium_damage(draw):
    kind = draw(st.sampled_from(["truncate", "flip", "h5", "parquet", "json", "ome-xml"]))
    if kind == "truncate":
        return draw(truncation(XENIUM_FILES))
    if kind == "flip":
        return draw(bit_flips(XENIUM_FILES))
    if kind == "json":
        return ("edit", "experiment.xenium", json_edit(draw, ["pixel_size", "region_name", "num_cells",
                                                              "analysis_sw_version"]))
    if kind == "h5":
        field = draw(st.sampled_from(H5_FIELDS))
        op = draw(st.sampled_from(["delete", "shorten", "negate", "strings", "scalar"]))

        def edit_h5(path: Path) -> None:
            import h5py

            with h5py.File(path, "r+") as f:
                data = f[field][()]
                del f[field]
                if op == "delete":
                    return
                if op == "shorten":
                    f[field] = data[: max(len(data) - 1, 0)] if np.ndim(data) else data
                elif op == "negate":
                    f[field] = -data.astype(np.int64) if np.issubdtype(np.asarray(data).dtype, np.number) else data
                elif op == "strings":
                    f[field] = np.array([b"x"] * max(int(np.size(data)), 1))
                else:
                    f[field] = 7

        return ("edit", "cell_feature_matrix.h5", Edit(f"h5 {op} {field}", edit_h5))
    if kind == "parquet":
        table_edit = frame_edit(draw, ["cell_id", "x_centroid", "y_centroid", "cell_area", "nucleus_area"], 20)

        def edit_parquet(path: Path) -> None:
            df = table_edit(pd.read_parquet(path))
            df.astype({c: str for c in df.columns if df[c].dtype == object}).to_parquet(path, index=False)

        return ("edit", "cells.parquet", Edit(f"parquet {table_edit!r}", edit_parquet))
    attr = draw(st.sampled_from(["PhysicalSizeX", "SizeC", "SizeX", "Name", "UUID", "DimensionOrder", "Type"]))
    value = draw(st.sampled_from(["", "-1", "abc", "0", "1e400", "99999", "\u00e9"]))
    target = draw(st.sampled_from(XENIUM_FILES[3:]))

    def edit_ome(path: Path) -> None:  # rewrite one attribute of the OME-XML in place (same byte length if possible)
        import re

        data = path.read_bytes()
        m = re.search(rb'%s="([^"]*)"' % attr.encode(), data)
        if m:
            new = value.encode("utf-8")
            old = m.group(1)
            new = new.ljust(len(old))[: len(old)] if len(new) <= len(old) else new[: len(old)]
            data = data[: m.start(1)] + new + data[m.end(1):]
        path.write_bytes(data)

    return ("edit", target, Edit(f"ome-xml {attr}={value!r}", edit_ome))


def read_xenium_folder(folder: Path):
    from spatia_hf.data.readers.xenium import read_xenium

    return read_xenium(folder, quiet=True)


@pytest.mark.parametrize("profile", BUDGETS)
def test_fuzzed_xenium_bundles_read_or_fail_clearly(xenium_template, profile):
    @settings(settings.get_profile(profile))
    @given(xenium_damage())
    def run(damage):
        with damaged_copy(xenium_template, damage) as folder:
            check_outcome(read_xenium_folder, folder)

    run()


# ----------------------------------------------------------------------------- CosMx
@pytest.fixture(scope="module")
def cosmx_template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cosmx") / "flat"
    write_cosmx(folder, grid=(1, 2), fov_px=64, cells_per_fov=5, n_genes=6, image_format="png")
    return folder


COSMX_CSVS = {"Run5_S1_exprMat_file.csv": ["fov", "cell_ID", "Gene0", "NegPrb1"],
              "Run5_S1_metadata_file.csv": ["fov", "cell_ID", "CenterX_local_px", "CenterY_local_px",
                                            "CenterX_global_px", "CenterY_global_px"],
              "Run5_S1_fov_positions_file.csv": ["FOV", "x_global_px", "y_global_px"]}
COSMX_FILES = list(COSMX_CSVS) + ["CellComposite/CellComposite_F001.png"]


@st.composite
def csv_damage(draw, tables: dict[str, list[str]], files: list[str], n_rows: int = 10):
    kind = draw(st.sampled_from(["truncate", "flip", "edit", "edit"]))
    if kind == "truncate":
        return draw(truncation(files))
    if kind == "flip":
        return draw(bit_flips(files))
    name = draw(st.sampled_from(sorted(tables)))
    table_edit = frame_edit(draw, tables[name], n_rows)
    index_col = 0 if name == "cell_metadata.csv" else None

    def edit(path: Path) -> None:
        table_edit(pd.read_csv(path, index_col=index_col)).to_csv(path, index=index_col is not None)

    return ("edit", name, Edit(f"csv {table_edit!r}", edit))


def read_cosmx_folder(folder: Path):
    from spatia_hf.data.readers.cosmx import read_cosmx

    return read_cosmx(folder)


@pytest.mark.parametrize("profile", BUDGETS)
def test_fuzzed_cosmx_exports_read_or_fail_clearly(cosmx_template, profile):
    @settings(settings.get_profile(profile))
    @given(csv_damage(COSMX_CSVS, COSMX_FILES))
    def run(damage):
        with damaged_copy(cosmx_template, damage) as folder:
            check_outcome(read_cosmx_folder, folder)

    run()


# ----------------------------------------------------------------------------- MERSCOPE
@pytest.fixture(scope="module")
def merscope_template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merscope") / "region_0"
    write_merscope(folder, n_cells=16, n_genes=6, image_hw=(96, 120), z_planes=(3,))
    return folder


MERSCOPE_CSVS = {"cell_by_gene.csv": ["cell", "G0", "G1", "Blank-0"],
                 "cell_metadata.csv": ["fov", "center_x", "center_y", "volume"]}
TRANSFORM = "images/micron_to_mosaic_pixel_transform.csv"
MERSCOPE_FILES = list(MERSCOPE_CSVS) + [TRANSFORM, "images/mosaic_DAPI_z3.tif"]


@st.composite
def merscope_damage(draw):
    if draw(st.integers(0, 3)) == 0:  # the affine: numbers edited, rows added or removed
        cells = draw(st.lists(st.sampled_from(["0", "-0", "nan", "inf", "1e-300", "x", "", "2", "1,5"]), min_size=1,
                              max_size=12))

        def edit(path: Path) -> None:
            rows = [ln.split() for ln in path.read_text().splitlines()]
            flat = [v for r in rows for v in r]
            for k, v in enumerate(cells[:9]):
                flat[(k * 4) % len(flat)] = v
            width = 3 if len(cells) < 10 else 2
            path.write_text("\n".join(" ".join(flat[i: i + width]) for i in range(0, len(flat), width)) + "\n")

        return ("edit", TRANSFORM, Edit(f"affine cells {cells!r}", edit))
    return draw(csv_damage(MERSCOPE_CSVS, MERSCOPE_FILES, n_rows=16))


def read_merscope_folder(folder: Path):
    from spatia_hf.data.readers.merscope import read_merscope

    return read_merscope(folder, quiet=True)


@pytest.mark.parametrize("profile", BUDGETS)
def test_fuzzed_merscope_regions_read_or_fail_clearly(merscope_template, profile):
    @settings(settings.get_profile(profile))
    @given(merscope_damage())
    def run(damage):
        with damaged_copy(merscope_template, damage) as folder:
            check_outcome(read_merscope_folder, folder)

    run()


# ----------------------------------------------------------------------------- AnnData + OME-TIFF (spatia synth)
@pytest.fixture(scope="module")
def synth_template(tmp_path_factory):
    from spatia_hf.data.synthetic import write_synthetic

    folder = tmp_path_factory.mktemp("synth") / "synth"
    write_synthetic(folder, n_sections=1, n_cells=20, seed=0, progress=False)
    return folder


SYNTH_FILES = ["synth_s00.h5ad", "synth_s00.ome.tif", "synthetic.json"]
H5AD_FIELDS = ["X", "obsm/spatial", "obs", "var", "obs/_index", "var/_index", "uns"]


@st.composite
def synth_damage(draw):
    kind = draw(st.sampled_from(["truncate", "flip", "flip", "h5ad", "json"]))
    if kind == "truncate":
        return draw(truncation(SYNTH_FILES))
    if kind == "flip":
        return draw(bit_flips(SYNTH_FILES))
    if kind == "json":
        return ("edit", "synthetic.json", json_edit(draw, ["sections", "seed", "pixel_size_um"]))
    field = draw(st.sampled_from(H5AD_FIELDS))
    op = draw(st.sampled_from(["delete", "nan", "strings"]))

    def edit(path: Path) -> None:
        import h5py

        with h5py.File(path, "r+") as f:
            if field not in f:
                return
            node = f[field]
            if op == "delete" or not isinstance(node, h5py.Dataset):
                del f[field]
                if op != "delete" and field == "obsm/spatial":
                    f[field] = np.full((3, 2), np.nan)
                return
            data = node[()]
            del f[field]
            if op == "nan" and np.issubdtype(np.asarray(data).dtype, np.floating):
                data = np.asarray(data).copy()
                data.reshape(-1)[:: 3] = np.nan
                f[field] = data
            else:
                f[field] = np.array([b"x"] * max(int(np.size(data)), 1))

    return ("edit", "synth_s00.h5ad", Edit(f"h5ad {op} {field}", edit))


def read_synth_folder(folder: Path):
    from spatia_hf.data.readers.anndata_reader import read_synthetic_dir

    return next(iter(read_synthetic_dir(folder)))


@pytest.mark.parametrize("profile", BUDGETS)
def test_fuzzed_anndata_and_ome_tiff_read_or_fail_clearly(synth_template, profile):
    @settings(settings.get_profile(profile))
    @given(synth_damage())
    def run(damage):
        with damaged_copy(synth_template, damage) as folder:
            check_outcome(read_synth_folder, folder)

    run()


# ----------------------------------------------------------------------------- the processor
GENES = [f"G{i}" for i in range(8)]


def _processor(**kw):
    from spatia_hf.models.processing_spatia import SpatiaProcessor

    p = SpatiaProcessor(GENES, image_size=8, num_channels=2, max_genes=6, **kw)
    p.map_panel(GENES + ["UNKNOWN"], min_coverage=0.0)
    return p


ARRAY_VALUES = st.sampled_from([0.0, 1.0, 3.0, 255.0, 256.0, -1.0, float("nan"), float("inf"), 1e30, 0.5])


@st.composite
def processor_inputs(draw):
    n = draw(st.integers(0, 3))
    shape = draw(st.sampled_from([(n, 2, 8, 8), (n, 3, 8, 8), (n, 2, 8), (2, 8, 8), (n, 2, 4, 8), (n,)]))
    dtype = draw(st.sampled_from([np.uint8, np.int64, np.float32, np.float64, np.bool_, object]))
    fill = draw(ARRAY_VALUES)
    n_expr = draw(st.integers(0, 3))
    indices = draw(st.lists(st.lists(st.integers(-2, 10), max_size=5), min_size=n_expr, max_size=n_expr))
    counts = [draw(st.lists(ARRAY_VALUES, min_size=len(ix), max_size=len(ix) + draw(st.integers(0, 1))))
              for ix in indices]
    which = draw(st.sampled_from(["images", "expression", "both", "dense"]))
    return shape, dtype, fill, indices, counts, which


@pytest.mark.parametrize("profile", BUDGETS)
def test_fuzzed_processor_inputs_encode_or_fail_clearly(profile):
    import torch

    proc = _processor()

    @settings(settings.get_profile(profile))
    @given(processor_inputs())
    def run(case):
        shape, dtype, fill, indices, counts, which = case
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                images = np.full(shape, fill).astype(dtype) if dtype is not object else np.full(shape, "x", object)
            if which == "dense":
                out = proc.encode_dense(np.full((len(indices) or 1, len(GENES) + 1), fill, np.float32), seed=0)
            else:
                out = proc(images=images if which in ("images", "both") else None,
                           gene_indices=indices if which in ("expression", "both") else None,
                           gene_counts=counts if which in ("expression", "both") else None, seed=0)
        except BaseException as err:  # noqa: BLE001
            problem = clear_error(err)
            assert problem is None, problem
            return
        for key, value in out.items():
            assert isinstance(value, torch.Tensor), key
            if value.is_floating_point():
                assert torch.isfinite(value).all(), f"{key} holds non-finite values"

    run()


@pytest.mark.parametrize("profile", BUDGETS)
def test_fuzzed_processor_files_load_or_fail_clearly(tmp_path, profile):
    from spatia_hf.models.processing_spatia import SpatiaProcessor

    _processor().save_pretrained(tmp_path / "template")
    keys = list(json.loads((tmp_path / "template" / "spatia_processor.json").read_text()))

    @st.composite
    def damage(draw):
        if draw(st.booleans()):
            return ("edit", "spatia_processor.json", json_edit(draw, keys))
        return draw(st.one_of(truncation(["spatia_processor.json"]), bit_flips(["spatia_processor.json"])))

    @settings(settings.get_profile(profile))
    @given(damage())
    def run(d):
        with damaged_copy(tmp_path / "template", d) as folder:
            try:
                proc = SpatiaProcessor.from_pretrained(folder)
                proc.map_panel(GENES, min_coverage=0.0)
                proc(images=np.zeros((1, proc.num_channels, proc.image_size, proc.image_size), np.uint8),
                     gene_indices=[[0, 1]], gene_counts=[[1.0, 2.0]], seed=0)
            except BaseException as err:  # noqa: BLE001
                problem = clear_error(err)
                assert problem is None, problem

    run()


# ----------------------------------------------------------------------------- regressions: what the fuzzing found
def outcome(read: Callable[[Path], object], template: Path, damage) -> BaseException | None:
    """The error a damaged copy gives (checked to be clear), or None when it reads as a valid Section."""
    with damaged_copy(template, damage) as folder:
        try:
            check_outcome(read, folder)
        except AssertionError:
            raise
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                section = read(folder)
                touch_pixels(section)
                validate_section(section, outside="drop")
        except Exception as err:  # noqa: BLE001
            return err
    return None


def raw_edit(fn: Callable[[bytes], bytes]) -> Edit:
    def edit(path: Path) -> None:
        path.write_bytes(fn(path.read_bytes()))

    return Edit("raw", edit)


def h5_set(field: str, value) -> Edit:
    def edit(path: Path) -> None:
        import h5py

        with h5py.File(path, "r+") as f:
            del f[field]
            f[field] = value

    return Edit(f"h5 {field}={value!r}", edit)


def csv_cell(column: str, row: int, value: str, index_col=None) -> Edit:
    def edit(path: Path) -> None:
        df = pd.read_csv(path, index_col=index_col)
        df[column] = df[column].astype(object)
        df.iloc[row, df.columns.get_loc(column)] = value
        df.to_csv(path, index=index_col is not None)

    return Edit(f"csv {column}[{row}]={value!r}", edit)


XENIUM_REGRESSIONS = {
    "experiment-not-an-object": (("edit", "experiment.xenium", raw_edit(lambda b: b"3")), "expected a JSON object"),
    "h5-indptr-strings": (("edit", "cell_feature_matrix.h5", h5_set("matrix/indptr", np.array([b"x"] * 21))),
                          "matrix/indptr is not a 1-D integer array"),
    "h5-indices-scalar": (("edit", "cell_feature_matrix.h5", h5_set("matrix/indices", 7)),
                          "matrix/indices is not a 1-D integer array"),
    "h5-feature-type-scalar": (("edit", "cell_feature_matrix.h5", h5_set("matrix/features/feature_type", 7)),
                               "matrix/features/feature_type is not a 1-D string array"),
    "h5-superblock-flip": (("flip", "cell_feature_matrix.h5", (True, [(0.5190645796118998, 2),
                                                                     (0.8633092574491428, 1),
                                                                     (0.18806229069829264, 4)])),
                           "cell_feature_matrix.h5"),
    "tile-data-flip": (("flip", "morphology_focus/morphology_focus_0000.ome.tif", (True, [(0.8628769930472036, 2)])),
                       "morphology_focus_0000.ome.tif"),
    "ome-physical-size-unparsable": (("edit", "morphology_focus/morphology_focus_0000.ome.tif",
                                      raw_edit(lambda b: b.replace(b'PhysicalSizeX="0.5"', b'PhysicalSizeX="\xe9  "'))),
                                     None),  # read: the pixel size comes from experiment.xenium
}


@pytest.mark.parametrize("case", sorted(XENIUM_REGRESSIONS))
def test_xenium_fuzz_findings_stay_fixed(xenium_template, case):
    damage, expected = XENIUM_REGRESSIONS[case]
    err = outcome(read_xenium_folder, xenium_template, damage)
    if expected is None:
        assert err is None, err
    else:
        assert err is not None and expected in str(err) and "Fix:" in str(err), err


COSMX_REGRESSIONS = {
    "empty-expression-csv": (("truncate", "Run5_S1_exprMat_file.csv", 0.0), "cannot be read as CSV"),
    "not-utf8": (("edit", "Run5_S1_exprMat_file.csv", raw_edit(lambda b: b"\xc7" + b[1:])), "cannot be read"),
    "broken-quoting": (("edit", "Run5_S1_exprMat_file.csv", raw_edit(lambda b: b.replace(b"\n", b'\n"', 1))),
                       "Run5_S1_exprMat_file.csv"),
    "cell-id-not-a-number": (("edit", "Run5_S1_metadata_file.csv", csv_cell("cell_ID", 5, "x;y")),
                             "column 'cell_ID' holds 'x;y'"),
    "fov-infinite": (("edit", "Run5_S1_exprMat_file.csv", csv_cell("fov", 8, "-inf")), "column 'fov' holds"),
    "fov-position-comma-decimal": (("edit", "Run5_S1_fov_positions_file.csv", csv_cell("x_global_px", 1, "1,5")),
                                   "column 'x_global_px' holds '1,5'"),
    "global-centroid-empty": (("edit", "Run5_S1_metadata_file.csv", csv_cell("CenterY_global_px", 4, "")),
                              "column 'CenterY_global_px'"),
}


@pytest.mark.parametrize("case", sorted(COSMX_REGRESSIONS))
def test_cosmx_fuzz_findings_stay_fixed(cosmx_template, case):
    damage, expected = COSMX_REGRESSIONS[case]
    err = outcome(read_cosmx_folder, cosmx_template, damage)
    assert err is not None and expected in str(err) and "Fix:" in str(err), err


def test_cosmx_infinite_local_centroid_falls_back_on_the_fov_positions(cosmx_template):
    """It crashed numpy's least squares (LinAlgError); an unreadable local centroid now counts as missing."""
    err = outcome(read_cosmx_folder, cosmx_template,
                  ("edit", "Run5_S1_metadata_file.csv", csv_cell("CenterX_local_px", 1, "-inf")))
    assert err is None or ("Fix:" in str(err) and "LinAlgError" not in str(err)), err


MERSCOPE_REGRESSIONS = {
    "empty-cell-by-gene": (("truncate", "cell_by_gene.csv", 0.0), "cannot be read as CSV"),
    "mosaic-tag-flip": (("flip", "images/mosaic_DAPI_z3.tif", (True, [(0.9927343337903347, 3),
                                                                        (0.36442048534121485, 4),
                                                                        (0.9989999999999999, 5),
                                                                        (0.8945309313020842, 2),
                                                                        (0.10229913026941517, 5),
                                                                        (0.6552172291537115, 1),
                                                                        (0.4908194169149616, 1), (0.001, 6)])),
                        "mosaic_DAPI_z3.tif"),
}


@pytest.mark.parametrize("case", sorted(MERSCOPE_REGRESSIONS))
def test_merscope_fuzz_findings_stay_fixed(merscope_template, case):
    damage, expected = MERSCOPE_REGRESSIONS[case]
    err = outcome(read_merscope_folder, merscope_template, damage)
    assert err is not None and expected in str(err) and "Fix:" in str(err), err


@pytest.mark.parametrize("damage", [("truncate", "synthetic.json", 0.5),
                                    ("edit", "synthetic.json", raw_edit(lambda b: b"\xdb" + b[1:])),
                                    ("edit", "synthetic.json", raw_edit(lambda b: b"-0.5")),
                                    ("edit", "synthetic.json", raw_edit(lambda b: b"{}")),
                                    ("edit", "synthetic.json", raw_edit(lambda b: b'{"sections": ""}'))],
                         ids=["truncated", "not-utf8", "a-number", "no-sections", "sections-empty"])
def test_synthetic_manifest_fuzz_findings_stay_fixed(synth_template, damage):
    err = outcome(read_synth_folder, synth_template, damage)
    assert err is not None and "not a `spatia synth` manifest" in str(err) and "Fix:" in str(err), err


@pytest.mark.parametrize("field,value", [("max_genes", -1), ("image_size", None), ("target_sum", float("inf")),
                                         ("image_std", 0), ("gene_vocab", "G0"), ("image_size", 1e308),
                                         ("zero_ratio", 1e308), ("target_sum", 1e308)])
def test_processor_file_fuzz_findings_stay_fixed(tmp_path, field, value):
    from spatia_hf.models.processing_spatia import PROCESSOR_FILE, SpatiaProcessor

    _processor().save_pretrained(tmp_path)
    data = json.loads((tmp_path / PROCESSOR_FILE).read_text())
    data[field] = value
    (tmp_path / PROCESSOR_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{PROCESSOR_FILE}.*Fix:"):
        SpatiaProcessor.from_pretrained(tmp_path)


def test_processor_refuses_non_finite_float_crops():
    with pytest.raises(ValueError, match="NaN or inf.*Fix:"):
        _processor()(images=np.full((1, 2, 8, 8), np.nan, np.float32))
