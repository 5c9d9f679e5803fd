#!/usr/bin/env python3
"""Where a quantizing compile of SmolLM2 reaches its peak resident memory.

usage: scripts/bench/rss_trace.py [--perqc target/release/perqc] [--bench DIR] [-- EXTRA PERQC ARGS]

Runs `perqc MODEL -o /dev/shm/... --calib-text handbook.txt --tokenizer tokenizer.json EXTRA`
(the default recipe plus EXTRA) on a pseudo-terminal, so that it prints its progress ("quantize:
G/120 activation groups"), and samples the process's VmRSS every 10 ms. Prints the peak, the
progress line showing when it was first within 1 MiB of it, and every step of 2 MiB or more in the group where
the peak fell, with the time since the start. BENCH_DIR defaults to $PERQC_BENCH_DIR, else
~/.cache/perqc-bench (scripts/bench-setup). Linux only (reads /proc); needs Python 3 only.
"""
import argparse, os, pty, re, subprocess, tempfile, threading, time

ap = argparse.ArgumentParser()
ap.add_argument("--perqc", default=None)
ap.add_argument("--bench", default=os.environ.get("PERQC_BENCH_DIR", os.path.expanduser("~/.cache/perqc-bench")))
ap.add_argument("extra", nargs="*", help="more perqc arguments (after --)")
a = ap.parse_args()
root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
perqc = a.perqc or os.path.join(root, "target", "release", "perqc")
B = a.bench
shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
out = os.path.join(tempfile.mkdtemp(prefix="perqc-rss-", dir=shm), "q.onnx")
args = [perqc, os.path.join(B, "smollm2", "model.onnx"), "-o", out,
        "--calib-text", os.path.join(B, "corpus", "handbook.txt"),
        "--tokenizer", os.path.join(B, "smollm2", "hf", "tokenizer.json")] + a.extra

master, slave = pty.openpty()
proc = subprocess.Popen(args, stderr=slave, stdout=subprocess.DEVNULL)
os.close(slave)
start = time.time()
last_line = [""]


def read_progress():
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            return
        if not data:
            return
        for part in re.split(rb"[\r\n]", data):
            if part.strip():
                last_line[0] = part.decode(errors="replace").strip()[:100]


threading.Thread(target=read_progress, daemon=True).start()
trace = []  # (seconds, KiB, progress line)
while proc.poll() is None:
    try:
        status = open(f"/proc/{proc.pid}/status").read()
    except OSError:
        break
    m = re.search(r"VmRSS:\s+(\d+)", status)
    if m:
        trace.append((time.time() - start, int(m.group(1)), last_line[0]))
    time.sleep(0.01)
proc.wait()
try:
    os.remove(out)
except OSError:
    pass
if not trace:
    raise SystemExit("rss_trace.py: no samples")
peak = max(kib for _, kib, _ in trace)
# Where it first came within 1 MiB of the peak (it may creep up later by allocator noise).
t_peak, _, line = next(s for s in trace if s[1] >= peak - 1024)
print(f"peak {peak / 1024:.1f} MiB; within 1 MiB of it at {t_peak:.2f} s, after `{line}` "
      f"(exit {proc.returncode}); the group's steps:")
prev = 0
for t, kib, l in trace:
    if l == line and abs(kib - prev) >= 2048:
        print(f"  {t:7.2f} s {kib / 1024:8.1f} MiB ({(kib - prev) / 1024:+.1f})")
    if abs(kib - prev) >= 2048:
        prev = kib
