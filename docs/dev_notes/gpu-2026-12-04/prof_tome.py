import time, numpy as np, torch
from torch.profiler import profile, ProfilerActivity
from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline
genes = [f"G{i}" for i in range(200)]
torch.manual_seed(0)
pipe = SpatiaGenerationPipeline.from_genes(genes, image_size=128, size="small", denoiser="unet")
pipe.set_progress_bar_config(disable=True)
pipe = pipe.to(device="cuda", dtype=torch.bfloat16)
x = np.random.default_rng(0).poisson(1.0, size=(32, 200)).astype(np.float32)
for ratio in (0.0, 0.5):
    pipe.set_token_merging(ratio)
    pipe(x, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        pipe(x, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
        torch.cuda.synchronize()
    print(f"==== ratio {ratio}: by CUDA time")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    print(f"==== ratio {ratio}: by CPU time")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
