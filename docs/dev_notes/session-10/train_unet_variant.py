"""Issue 18 candidates: the small UNet with one change to its preset, trained by examples/train_generator.py
with every other flag unchanged. The first argument names the variant:

- ``xattn_all``: cross-attention to the condition tokens at every resolution (the DiT, which responds more,
  cross-attends in every block; the small UNet skips its 32 px level);
- ``scale_shift``: the timestep + global-condition embedding scales and shifts every ResNet block's
  normalised features (ADM's adaptive group norm, diffusers' ``resnet_time_scale_shift="scale_shift"``)
  instead of being added to them.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 docs/dev_notes/session-10/train_unet_variant.py VARIANT \
        --dataset_dir D --out_dir OUT --size small --image_size 32 --max_steps 1428 --max_minutes 19 ...
"""
import runpy
import sys
from pathlib import Path

from spatia_hf.pipelines import denoisers

VARIANTS = {
    "xattn_all": dict(down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3),
    "scale_shift": dict(resnet_time_scale_shift="scale_shift"),
}
variant = sys.argv.pop(1)
denoisers.UNET_PRESETS["small"] = dict(denoisers.UNET_PRESETS["small"], **VARIANTS[variant])
sys.argv[0] = str(Path(__file__).resolve().parents[3] / "examples" / "train_generator.py")
runpy.run_path(sys.argv[0], run_name="__main__")
