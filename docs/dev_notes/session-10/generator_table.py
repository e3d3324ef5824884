"""One row per trained generator: response to NUCSIZE edits (200 held-out pairs), control, type accuracy, feature FID.
    python docs/dev_notes/session-10/generator_table.py unet_floor1 unet_floor1_s1 unet_scale_shift unet_scale_shift_s1 unet_scale_shift_s2 unet_xattn_all dit_floor1
(reads docs/generation/response_NAME.json and generation_report_NAME.json)."""
import json
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[2] / "generation"
print("| generator | x0.5 | x2 | x4 (truth 2.0) | right direction x0.5 / x2 / x4 | control x4 | type acc. | feature FID (ref.) |")
print("|---|---|---|---|---|---|---|---|")
for name in sys.argv[1:]:
    resp = json.loads((root / f"response_{name}.json").read_text())
    gen = json.loads((root / f"generation_report_{name}.json").read_text())
    cells, dirs, control = [], [], ""
    for e in resp["edits"]:
        ratio = f"{e['area_ratio']:.3f} [{e['area_ratio_ci95'][0]:.3f}, {e['area_ratio_ci95'][1]:.3f}]"
        if e["role"] == "control":
            control = f"{e['area_ratio']:.3f}"
        else:
            cells.append(ratio)
            dirs.append(f"{100 * e['fraction_right_direction']:.1f}")
    fid = gen["feature_frechet_distance"]
    print(f"| {name} | {' | '.join(cells)} | {' / '.join(dirs)}% | {control} | {gen['type_accuracy']['accuracy']:.3f} | "
          f"{fid['generated_vs_real']:.1f} ({fid['real_train_vs_real_held_out']:.2f}) |")
