import cProfile, pstats, sys, time
from spatia_hf.training.pretrain import pretrain
import torch
torch.set_num_threads(2)
pr = cProfile.Profile()
pr.enable()
pretrain("ds", "out_prof", preset="small", max_steps=6, batch_size=8, learning_rate=1e-3, seed=0,
         progress=False, use_cpu=True, do_eval=False, logging_steps=6)
pr.disable()
st = pstats.Stats(pr); st.sort_stats("cumulative").print_stats(45)
