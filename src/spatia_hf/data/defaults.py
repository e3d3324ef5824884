"""Default sizes of the multi-scale dataset (µm and stored pixels), importable without torch."""

DEFAULT_CROP_UM = 32.0  # cell crop side: ~3 cell diameters, the cell plus its contacts
DEFAULT_CROP_PX = 64  # stored cell crop (CPU scale; the paper uses 224-256)
DEFAULT_NICHE_UM = 50.0  # niche grid tile side
DEFAULT_NICHE_PX = 64  # stored niche image
DEFAULT_THUMB_PX = 256  # section thumbnail (aspect kept, zero-padded)
