import sys, time, os
if sys.argv[1] != "keep":
    from spatia_hf.utils import allocator; allocator.bound_heap_growth(int(sys.argv[1]) << 20)
else:
    os.environ["SPATIA_KEEP_MALLOC"] = "1"
from spatia_hf.training.pretrain import pretrain
import spatia_hf.training.pretrain as P
t = time.perf_counter()
pretrain("ds", "out_pt2", preset="small", max_steps=12, batch_size=8, seed=0, progress=False, use_cpu=True, do_eval=False, logging_steps=12)
t1=os.times(); print(sys.argv[1], "wall", round(time.perf_counter()-t,1), "user", t1.user, "sys", t1.system, "maxrss", __import__("resource").getrusage(0).ru_maxrss)
