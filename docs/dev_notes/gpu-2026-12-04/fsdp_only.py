import os, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, "benchmarks")
from gpu_check import build_dataset, REPO
work = Path("/tmp/fsdpwork"); work.mkdir(exist_ok=True)
data = build_dataset(work, 600, 64)
out = work / "fsdp"
cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "examples/accelerate_configs/fsdp.yaml"),
       "--num_processes", "1", "--main_process_port", "29517", str(REPO / "examples/pretrain.py"), "--dataset_dir", str(data),
       "--output_dir", str(out), "--preset", "small", "--max_steps", "3", "--per_device_train_batch_size", "2", "--bf16",
       "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1", "--disable_tqdm", "true", "--eval_sections", ""]
t = time.time()
proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200)
log = Path(os.environ.get("OUT", ".")) / "fsdp.log"
log.write_text(proc.stdout + "\n=====STDERR\n" + proc.stderr)
print("fsdp rc", proc.returncode, "seconds", time.time() - t)
err = proc.stderr
i = err.find("Traceback")
print(err[i:i + 2500] if i >= 0 else err[-2500:])
