from pathlib import Path
from spatia_hf.demo import FULL, _synthesise, _build
_synthesise(Path("syn"), FULL, 0, False)
_build(Path("syn"), Path("ds"), False)
