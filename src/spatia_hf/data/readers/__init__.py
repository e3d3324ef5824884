"""Readers: one per input format, each turning its files into ``Section`` objects.

``READERS`` is the registry behind ``spatia convert <name>``. An entry names the module and two
functions in it; modules are imported only when their sub-command is built or run, so a reader
may keep heavy imports (anndata, h5py, spatialdata) inside its functions. Adding a format is:

1. in ``spatia_hf/data/readers/<fmt>.py`` write
   ``add_cli_arguments(parser)`` (the format's own flags; ``--out`` and the builder flags are
   added by ``spatia convert`` itself) and ``sections_from_args(args) -> Iterable[Section]``
   (yield one Section at a time: the builder streams them);
2. add one line here: ``"<fmt>": ReaderEntry("spatia_hf.data.readers.<fmt>", help="...")``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class ReaderEntry:
    """Where ``spatia convert <name>`` finds its reader."""

    module: str
    help: str = ""
    add_arguments: str = "add_cli_arguments"
    sections_from_args: str = "sections_from_args"

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def add_cli_arguments(self, parser) -> None:
        getattr(self.load(), self.add_arguments)(parser)

    def sections(self, args):
        return getattr(self.load(), self.sections_from_args)(args)


READERS: dict[str, ReaderEntry] = {
    "anndata": ReaderEntry(
        "spatia_hf.data.readers.anndata_reader",
        help="AnnData .h5ad (raw counts, obsm['spatial']) plus a morphology image (.tif/.ome.tif/.npy)",
    ),
    "synthetic": ReaderEntry(
        "spatia_hf.data.readers.anndata_reader",
        help="a folder written by `spatia synth` (its synthetic.json lists the .h5ad + .ome.tif pairs)",
        add_arguments="add_synthetic_cli_arguments",
        sections_from_args="synthetic_sections_from_args",
    ),
    "xenium": ReaderEntry(
        "spatia_hf.data.readers.xenium",
        help="10x Xenium output folder(s): cell_feature_matrix.h5, cells.parquet, experiment.xenium, morphology OME-TIFF",
    ),
    "cosmx": ReaderEntry(
        "spatia_hf.data.readers.cosmx",
        help="CosMx flat-file folder(s): *_exprMat_file.csv, *_metadata_file.csv, per-FOV CellComposite images",
    ),
    "merscope": ReaderEntry(
        "spatia_hf.data.readers.merscope",
        help="MERSCOPE region folder(s): cell_by_gene.csv, cell_metadata.csv, images/mosaic_*_z*.tif + transform",
    ),
    "spatialdata": ReaderEntry(
        "spatia_hf.data.readers.spatialdata_reader",
        help="SpatialData .zarr store(s) (needs the optional extra: pip install 'spatia-hf[spatialdata]')",
    ),
}


def register_reader(name: str, entry: ReaderEntry) -> None:
    """Add a reader at run time (plugins); built-in readers are listed in ``READERS`` above."""
    if name in READERS:
        raise ValueError(f"reader {name!r} is already registered")
    READERS[name] = entry


__all__ = ["READERS", "ReaderEntry", "register_reader"]
