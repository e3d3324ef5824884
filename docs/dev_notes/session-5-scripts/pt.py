import sys, time, json
from spatia_hf.training.pretrain import pretrain
kw = dict(arg.split("=") for arg in sys.argv[2:])
kw = {k: json.loads(v) for k, v in kw.items()}
t = time.perf_counter()
r = pretrain("ds", "out_"+sys.argv[1], preset="small", max_steps=12, batch_size=8, learning_rate=1e-3, seed=0,
             eval_sections="S3" if False else None, progress=False, use_cpu=True, do_eval=False, logging_steps=4, **kw)
print(sys.argv[1], "total", round(time.perf_counter()-t,1))
