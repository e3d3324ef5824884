"""Names every layer agrees on: the dataset configs, their column names and the gene-panel file.

Strings only (no ``datasets`` import), so the processor and the Hub helpers, which sit below the data
layer, use the same names as the builder; ``spatia_hf.data.schema`` adds the ``datasets.Features``.
"""

CONFIGS = ("cells", "niches", "tissues")
GENE_PANEL_FILE = "gene_panel.json"

# shared
SAMPLE_ID = "sample_id"
IMAGE = "image"
GENE_INDICES = "gene_indices"
GENE_COUNTS = "gene_counts"
X_UM = "x_um"
Y_UM = "y_um"
PIXEL_SIZE_UM = "pixel_size_um"  # µm per pixel of the stored crop (after resizing)

# cells
CELL_ID = "cell_id"
NICHE_ID = "niche_id"

# niches
CELL_IDS = "cell_ids"
CELL_REL_X_UM = "cell_rel_x_um"  # member centroid minus niche centre, µm
CELL_REL_Y_UM = "cell_rel_y_um"
N_CELLS = "n_cells"

# tissues
THUMBNAIL = "thumbnail"
NICHE_IDS = "niche_ids"
NICHE_X_UM = "niche_x_um"
NICHE_Y_UM = "niche_y_um"
N_NICHES = "n_niches"
