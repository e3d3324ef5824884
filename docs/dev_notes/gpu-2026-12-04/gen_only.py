import sys, argparse, torch
sys.path.insert(0, "benchmarks")
from gpu_check import check_generation
args = argparse.Namespace(gen_px=128, gen_preset="small", gen_batch=32, gen_steps=20, gen_genes=200, merge_ratio=0.5)
torch.backends.cuda.matmul.allow_tf32 = True
for rep in range(2):
    check_generation(args, torch.device("cuda"))
args.gen_px = 256; args.gen_batch = 16
check_generation(args, torch.device("cuda"))
