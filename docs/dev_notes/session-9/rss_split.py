"""Peak resident memory of a command, split into anonymous memory (heap, tensors) and file-backed pages
(memory-mapped files such as a `datasets` Arrow table, which the kernel may drop and re-read at will).
`/usr/bin/time -f %M` reports only their sum. Samples /proc/PID/status every 0.2 s (session 9, issue 20).

    python docs/dev_notes/session-9/rss_split.py OUT.json -- spatia pretrain --data DS --out OUT --preset small ...
"""
import json
import subprocess
import sys
import time
from pathlib import Path

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in FIELDS:
                out[key] = int(value.split()[0])  # kB
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def main() -> None:
    out_path, cmd = Path(sys.argv[1]), sys.argv[sys.argv.index("--") + 1 :]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = dict.fromkeys(FIELDS, 0)
    at_peak_rss = {}
    while proc.poll() is None:
        s = status(proc.pid)
        for k, v in s.items():
            peak[k] = max(peak[k], v)
        if s.get("VmRSS", 0) >= peak["VmRSS"]:
            at_peak_rss = s
        time.sleep(0.2)
    result = {"command": cmd, "returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
              "peak_kB": peak, "at_peak_rss_kB": at_peak_rss}
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
