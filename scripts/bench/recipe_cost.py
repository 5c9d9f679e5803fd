#!/usr/bin/env python3
"""Cost of the recipe's exact part next to a perplexity run, side by side.

usage: scripts/bench/recipe_cost.py [BENCH_DIR] [--rounds 5] [--perqc target/release/perqc]
                                    [--baseline OTHER_PERQC] [--quantize] [--out DIR]

BENCH_DIR defaults to $PERQC_BENCH_DIR, else ~/.cache/perqc-bench (scripts/bench-setup builds
it). Each round runs, on SmolLM2 (the torchscript export, BENCH_DIR/smollm2/model.onnx):

  eval:     perqc eval MODEL --tokenizer TOK --text TEXT --seq 512 --windows 16 --skip-chars 200000
            (16 windows of 512 tokens, the bench protocol of docs/eval.md)
  compile:  perqc MODEL -o OUT --no-quantize --calib-text TEXT --tokenizer TOK
            (calibration on 16 x 512 tokens, the defaults, then the exact transforms and the save)

and, with --baseline, the compile command of another perqc build (with --quantize also its
default quantizing compile and its --rounding rtn one, "baseline quantize" and "baseline
quantize rtn"); with --quantize also

  quantize:      perqc MODEL -o OUT --calib-text TEXT --tokenizer TOK   (the default W4A4 recipe:
                 GPTQ and the clip search; goal <= 3x eval)
  quantize rtn:  the same with --rounding rtn (the clip search on; goal <= 1.5x eval)
  quantize fit all:  the default with --gptq-input-error all (GPTQ aimed at the float output at
                 every quantized input, not only at those an online Hadamard computes)
  quantize no fit:  the default with --gptq-input-error none (plain GPTQ)
  quantize calib-float:  the default with --calib-float (the calibration stages run the
                 already-quantized linears on the float kernels, not the integer ones)
  quantize q-stats, quantize rtn q-stats:  the two above with --permute-stats quantized
  quantize rtn noclip:  --rounding rtn --clip none (RTN as the reference runs it)
 The order alternates from
round to round (eval first, then compile first) so that a drift of a shared machine's load
hits both alike. Before every run the model file is read once, so that no run pays for
reading it from disk. Wall time is measured around each process; peak RSS is the process's
own maximum resident set (wait4's ru_maxrss). The compiled models go to --out (default: a
temporary folder in /dev/shm when there is one, so that the save is not timed against a busy
disk; a tmpfs file is not part of the writer's RSS), removed at the end unless --out is given.
Prints every run, the medians, the ratio of
the compile's median wall time to the eval's, and the compile's peak RSS over the model file's
size (the goal: at most 1.5 for both), with the CPU and the commit. Needs Python 3 only.
"""
import argparse, os, platform, re, statistics, subprocess, sys, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("bench", nargs="?", default=os.environ.get("PERQC_BENCH_DIR", os.path.expanduser("~/.cache/perqc-bench")))
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--perqc", default=None, help="the perqc binary (default: target/release/perqc of this clone)")
ap.add_argument("--baseline", default=None, help="another perqc binary whose compile (and, with --quantize, default quantizing compile) also runs every round")
ap.add_argument("--quantize", action="store_true",
                help="also time the quantizing compile: the default recipe and --rounding rtn (goals: 3x and 1.5x eval)")
ap.add_argument("--out", default=None,
                help="folder for the compiled models (default: a temporary folder in /dev/shm if there is one)")
ap.add_argument("--only", default=None,
                help="comma-separated command names to time (eval always runs), e.g. 'quantize,quantize rtn'")
a = ap.parse_args()

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
perqc = a.perqc or os.path.join(root, "target", "release", "perqc")
B = a.bench
model = os.path.join(B, "smollm2", "model.onnx")
tok = os.path.join(B, "smollm2", "hf", "tokenizer.json")
text = os.path.join(B, "corpus", "handbook.txt")
for f in (model, tok, text):
    if not os.path.isfile(f):
        sys.exit(f"recipe_cost.py: no {f}; build the bench first: scripts/bench-setup {B}")
for exe in [perqc] + ([a.baseline] if a.baseline else []):
    if not os.access(exe, os.X_OK):
        sys.exit(f"recipe_cost.py: {exe} is missing (cargo build --release --bin perqc)")


def cpu():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def warm(path):
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def run(argv):
    """Runs argv; returns (wall seconds, peak RSS in KiB, stdout + stderr)."""
    warm(model)
    with tempfile.TemporaryFile() as log:
        t = time.perf_counter()
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        log.seek(0)
        out = log.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"recipe_cost.py: {' '.join(argv)} failed:\n{out}")
    return wall, usage.ru_maxrss, out


def detail(kind, out):
    if kind == "eval":
        m = re.search(r"seconds=([0-9.]+)", out)
        p = re.search(r"ppl=([0-9.]+)", out)
        return f"scoring {m.group(1)} s, ppl {p.group(1)}" if m and p else ""
    c = re.search(r"calibration:? ([0-9.]+)(m?s)", out)
    s = re.search(r"passes run: .*\(([0-9.]+)(m?s)\)", out)
    w = re.search(r"save ([0-9.]+)(m?s)", out)
    q = re.search(r"rounding ([0-9.]+)(m?s)", out)
    sec = lambda m: float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    parts = [f"{name} {sec(m):.2f} s" for name, m in (("calibration", c), ("passes", s), ("rounding", q), ("save", w)) if m]
    return ", ".join(parts)


# In memory when possible: the compile writes 652 MB, and a busy disk would time the disk.
shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
out_dir = a.out or tempfile.mkdtemp(prefix="perqc-recipe-cost-", dir=shm)
os.makedirs(out_dir, exist_ok=True)
calib = ["--calib-text", text, "--tokenizer", tok]
commands = {
    "eval": [perqc, "eval", model, "--tokenizer", tok, "--text", text, "--seq", "512", "--windows", "16",
             "--skip-chars", "200000", "--quiet"],
    "compile": [perqc, model, "-o", os.path.join(out_dir, "smollm2.nq.onnx"), "--no-quantize"] + calib,
}
if a.quantize:
    # The default recipe (GPTQ and the clip search) and round-to-nearest, side by side.
    commands["quantize"] = [perqc, model, "-o", os.path.join(out_dir, "smollm2.q.onnx")] + calib
    commands["quantize rtn"] = [perqc, model, "-o", os.path.join(out_dir, "smollm2.rtn.onnx"),
                                "--rounding", "rtn"] + calib
    # GPTQ's fit to the float output (docs/quantization.md) at every input, and nowhere.
    commands["quantize fit all"] = [perqc, model, "-o", os.path.join(out_dir, "smollm2.fit.onnx"),
                                    "--gptq-input-error", "all"] + calib
    commands["quantize no fit"] = [perqc, model, "-o", os.path.join(out_dir, "smollm2.nofit.onnx"),
                                   "--gptq-input-error", "none"] + calib
    # The default with the quantized prefix of the calibration stages on the float kernels.
    commands["quantize calib-float"] = [perqc, model, "-o", os.path.join(out_dir, "smollm2.qf.onnx"),
                                        "--calib-float"] + calib
    # The same two with MassDiff's statistics from the quantizers' own pass.
    commands["quantize q-stats"] = [perqc, model, "-o", os.path.join(out_dir, "smollm2.qs.onnx"),
                                    "--permute-stats", "quantized"] + calib
    commands["quantize rtn q-stats"] = [perqc, model, "-o", os.path.join(out_dir, "smollm2.rtn-qs.onnx"),
                                        "--rounding", "rtn", "--permute-stats", "quantized"] + calib
    # RTN as the reference implementation runs it: no activation clip search.
    commands["quantize rtn noclip"] = [perqc, model, "-o", os.path.join(out_dir, "smollm2.rtn-noclip.onnx"),
                                       "--rounding", "rtn", "--clip", "none"] + calib
if a.baseline:
    commands["baseline compile"] = [a.baseline, model, "-o", os.path.join(out_dir, "smollm2.baseline.nq.onnx"),
                                    "--no-quantize", "--calib-text", text, "--tokenizer", tok]
    if a.quantize:
        commands["baseline quantize"] = [a.baseline, model, "-o", os.path.join(out_dir, "smollm2.baseline.q.onnx")] + calib
        commands["baseline quantize rtn"] = [a.baseline, model, "-o", os.path.join(out_dir, "smollm2.baseline.rtn.onnx"),
                                             "--rounding", "rtn"] + calib

if a.only:
    keep = {"eval"} | {n.strip() for n in a.only.split(",")}
    unknown = keep - set(commands)
    if unknown:
        sys.exit(f"recipe_cost.py: --only: no command {', '.join(sorted(unknown))}; have {', '.join(commands)}")
    commands = {k: v for k, v in commands.items() if k in keep}

try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
except OSError:
    commit = "?"
size = os.path.getsize(model)
print(f"CPU: {cpu()}, {os.cpu_count()} logical CPUs; commit {commit or '?'}; "
      f"load average at start {os.getloadavg()[0]:.2f}")
print(f"model: {model} ({size} bytes = {size / 2**20:.1f} MiB)")
for k, v in commands.items():
    print(f"{k}: {' '.join(v)}")
print()

results = {k: [] for k in commands}
names = list(commands)
for r in range(a.rounds):
    order = names if r % 2 == 0 else names[::-1]
    for k in order:
        wall, rss, out = run(commands[k])
        results[k].append((wall, rss))
        print(f"round {r + 1} {k:20} {wall:7.2f} s  peak RSS {rss / 1024:7.1f} MiB  {detail(k.split()[-1], out)}",
              flush=True)

print(f"\nload average at end {os.getloadavg()[0]:.2f}; medians over {a.rounds} rounds:")
med = {k: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v)) for k, v in results.items()}
print("| command | median wall | median peak RSS | peak RSS / model file |")
print("|---|---|---|---|")
for k, (w, m) in med.items():
    print(f"| {k} | {w:.2f} s | {m / 1024:.0f} MiB | {m * 1024 / size:.2f} |")
for k in commands:
    if k == "eval":
        continue
    # The default recipe's goal is 3x eval whatever executes its calibration; RTN's 1.5x.
    goal = 1.5 if "rtn" in k or "compile" in k else 3.0
    print(f"{k} / eval wall time: {med[k][0] / med['eval'][0]:.2f} (goal <= {goal}); "
          f"{k} peak RSS / model file: {med[k][1] * 1024 / size:.2f} (goal < 1.5)")
if not a.out:
    for f in os.listdir(out_dir):
        os.remove(os.path.join(out_dir, f))
    os.rmdir(out_dir)
