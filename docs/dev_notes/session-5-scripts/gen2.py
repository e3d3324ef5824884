import sys, time, torch
if sys.argv[1] == "mallopt":
    from spatia_hf.utils.allocator import bound_heap_growth; print(bound_heap_growth(int(sys.argv[2]) << 20))
from spatia_hf.training.generator import train_generator
t=time.perf_counter(); r0 = time.process_time()
train_generator("ds", "gen_out_"+sys.argv[1], size="small", image_size=32, max_steps=30, max_minutes=8.0, warmup_steps=4,
                spatia_model="out_dedup", eval_sections=["synth_s03"], seed=0, cpu=True, progress=False, checkpoint_every=0)
import os; t1=os.times(); print(sys.argv[1], "wall", round(time.perf_counter()-t,1), "user", t1.user, "sys", t1.system)
