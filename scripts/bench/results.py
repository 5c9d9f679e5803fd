#!/usr/bin/env python3
"""The accuracy table of docs/results.md: perqc's quantized SmolLM2 scored by ONNX Runtime.

usage: scripts/bench/results.py [BENCH_DIR] [--rows NAME,NAME] [--out docs/results.md]
                                [--perqc target/release/perqc] [--native] [--keep DIR]

BENCH_DIR defaults to $PERQC_BENCH_DIR, else ~/.cache/perqc-bench (scripts/bench-setup builds
it). For each row: compile SmolLM2 (the torchscript export) with `perqc MODEL -o OUT ARGS
--calib-text handbook.txt --tokenizer tokenizer.json` (calibration: 16 x 512 tokens from
characters [0, 200000), perqc's defaults), measuring wall time and peak RSS (wait4's
ru_maxrss) of that process; then score the emitted file with ONNX Runtime by the bench
protocol (scripts/bench/ppl_ort.py: characters from 200000 on, 16 windows of 512 tokens).
With --native, `perqc eval --no-int` scores the same file too (the agreement column: the
native float kernels; the integer plan's agreement is in docs/runtime.md). The reference
column is Brevitas 0.13.4's PeRQ under the same protocol (the bench protocol, docs/eval.md).
Writes the table with the CPU, the commit and the commands to --out (default docs/results.md),
and prints it. Rows: --list shows them.
"""
import argparse, os, platform, re, subprocess, sys, tempfile, time

# name, perqc arguments (None: the float model itself), reference ppl (or "")
RTN = ["--rounding", "rtn", "--clip", "none"]
ROWS = [
    ("float32", None, "25.04"),
    ("W4A4 RTN, no rotation", ["--rotation", "none", "--block-size", "none"] + RTN, "60487"),
    ("W4A4 RTN, full rotation", ["--block-size", "full"] + RTN, "93.42"),
] + [
    (f"W4A4 RTN, full rotation, R1 Hadamard core {m}", ["--block-size", "full", "--hadamard-core", str(m)] + RTN, "")
    for m in (36, 72, 288, 576)
] + [
    (f"W4A4 RTN, b = {b}, no permutation", ["--block-size", str(b), "--permute", "identity"] + RTN, ref)
    for b, ref in ((16, "484"), (32, "239"), (64, "146"), (128, "109"))
] + [
    (f"W4A4 RTN, b = {b}, MassDiff", ["--block-size", str(b)] + RTN, ref)
    for b, ref in ((16, "112.9"), (32, "108.1"), (64, "104.0"), (128, "87.4"))
] + [
    ("W4A4 RTN + clip search, full rotation", ["--block-size", "full", "--rounding", "rtn"], ""),
    ("W4A4 RTN + clip search, b = 16, MassDiff", ["--block-size", "16", "--rounding", "rtn"], ""),
    ("W4A4 GPTQ, full rotation", ["--block-size", "full", "--clip", "none"], ""),
    ("W4A4 GPTQ, b = 16, MassDiff", ["--block-size", "16", "--clip", "none"], ""),
    ("W4A4 GPTQ + clip (default), full rotation", ["--block-size", "full"], ""),
    ("W4A4 GPTQ + clip (default), b = 32, MassDiff", [], ""),
    ("W4A4 GPTQ + clip (default), b = 16, MassDiff", ["--block-size", "16"], ""),
    ("W4A4 GPTQ + clip, b = 32, MassDiff from the quantized prefix", ["--permute-stats", "quantized"], ""),
    ("W4A4 GPTQ + clip, b = 16, MassDiff from the quantized prefix",
     ["--block-size", "16", "--permute-stats", "quantized"], ""),
    ("W4A4 GPTQ + clip (default), b = 16, no permutation", ["--block-size", "16", "--permute", "identity"], ""),
    ("w4a16 preset (INT4 groups of 32, GPTQ, lm_head included)", ["--preset", "w4a16"], "27.56 (ORT HQQ)"),
    ("w4a16 preset, --target ort (MatMulNBits)", ["--preset", "w4a16", "--target", "ort"], "27.56 (ORT HQQ)"),
    ("w8a8 preset", ["--preset", "w8a8"], ""),
] + [
    (f"W4A4 RTN, b = 32, MassDiff, {what} smoothing", ["--smooth", spec] + RTN, "")
    for what, spec in (("max", "max"), ("quantile", "quantile"), ("searched", "search"))
] + [
    (f"W4A4 GPTQ + clip, b = 32, MassDiff, {what} smoothing", ["--smooth", spec], "")
    for what, spec in (("max", "max"), ("quantile", "quantile"), ("searched", "search"))
] + [
    (f"W4A4 {rounding}, b = 32, MassDiff, {what} smoothing + 100 training steps",
     ["--smooth", spec, "--smooth-train", "100"] + extra, "")
    for rounding, extra in (("RTN", RTN), ("GPTQ + clip", []))
    for what, spec in (("quantile", "quantile"), ("searched", "search"))
] + [
    (f"W4A4 {rounding}, b = 32, {what}", args + extra, "")
    for rounding, extra in (("RTN", RTN), ("GPTQ + clip", []))
    for what, args in (
        ("CAT (k = 64), no permutation", ["--cat", "block(k=64)", "--permute", "identity"]),
        ("MassDiff + CAT (k = 64)", ["--cat", "block(k=64)"]),
    )
] + [
    (f"W4A4 RTN, b = {b}, TokenMax", ["--block-size", str(b), "--permute", "tokenmax"] + RTN, "")
    for b in (16, 32, 64, 128)
] + [
    ("W4A4 GPTQ + clip, b = 32, TokenMax", ["--permute", "tokenmax"], ""),
    ("W4A4 GPTQ + clip, b = 16, TokenMax", ["--block-size", "16", "--permute", "tokenmax"], ""),
] + [
    # Brevitas's default for a block size: R1 and R2 in blocks too, the permutation on
    # every block region (docs/quantization.md, "Block R1 and R2").
    (f"W4A4 RTN, b = {b}, block R1 and R2, {what}",
     ["--rotation", "block", "--block-size", str(b), "--permute", method] + RTN, "")
    for b in (16, 32, 64)
    for what, method in (("no permutation", "identity"), ("MassDiff", "massdiff"))
] + [
    (f"W4A4 GPTQ + clip, b = {b}, block R1 and R2, MassDiff", ["--rotation", "block", "--block-size", str(b)], "")
    for b in (16, 32)
] + [
    # GPTQ fitted to the float output (docs/quantization.md) at every quantized input, and
    # nowhere: the default fits the down_projs' inputs alone.
    (f"W4A4 GPTQ + clip, fit {scope}, {what}", args + ["--gptq-input-error", flag], "")
    for scope, flag in (("at every input", "all"), ("nowhere", "none"))
    for what, args in (
        ("full rotation", ["--block-size", "full"]),
        ("b = 32, MassDiff", []),
        ("b = 16, MassDiff", ["--block-size", "16"]),
        ("b = 16, no permutation", ["--block-size", "16", "--permute", "identity"]),
    )
]

ap = argparse.ArgumentParser()
ap.add_argument("bench", nargs="?", default=os.environ.get("PERQC_BENCH_DIR", os.path.expanduser("~/.cache/perqc-bench")))
ap.add_argument("--rows", default=None, help="comma-separated row numbers (1-based) to run; default all")
ap.add_argument("--list", action="store_true", help="list the rows and exit")
ap.add_argument("--out", default=None, help="markdown file to write (default docs/results.md; '-' for none)")
ap.add_argument("--perqc", default=None)
ap.add_argument("--native", action="store_true", help="also score each file with perqc eval")
ap.add_argument("--keep", default=None, help="keep the compiled models in this folder")
ap.add_argument("--update", action="store_true",
                help="replace only the rows run (by name) in the existing --out table, noting the commit")
a = ap.parse_args()

if a.list:
    for i, (name, args, ref) in enumerate(ROWS, 1):
        print(f"{i:2}  {name}: {' '.join(args) if args is not None else '(the float model)'}")
    sys.exit(0)

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
perqc = a.perqc or os.path.join(root, "target", "release", "perqc")
B = a.bench
model = os.path.join(B, "smollm2", "model.onnx")
tok = os.path.join(B, "smollm2", "hf", "tokenizer.json")
text = os.path.join(B, "corpus", "handbook.txt")
python = os.path.join(B, "venv", "bin", "python")
for f in (model, tok, text, python):
    if not os.path.exists(f):
        sys.exit(f"results.py: no {f}; build the bench first: scripts/bench-setup {B}")
if not os.access(perqc, os.X_OK):
    sys.exit(f"results.py: {perqc} is missing (cargo build --release --bin perqc)")
out_md = a.out or os.path.join(root, "docs", "results.md")
rows = ROWS if a.rows is None else [ROWS[int(i) - 1] for i in a.rows.split(",")]


def cpu():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(argv):
    """(wall seconds, peak RSS KiB, output) of argv; exits on failure."""
    with tempfile.TemporaryFile() as log:
        t = time.perf_counter()
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        log.seek(0)
        out = log.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"results.py: {' '.join(argv)} failed:\n{out}")
    return wall, usage.ru_maxrss, out


def ppl_of(out):
    m = re.findall(r"ppl=([0-9.eE+-]+|inf|nan)", out)
    return float(m[-1]) if m else float("nan")


shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
work = a.keep or tempfile.mkdtemp(prefix="perqc-results-", dir=shm)
os.makedirs(work, exist_ok=True)
commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
size = os.path.getsize(model)
header = (f"CPU: {cpu()}, {os.cpu_count()} logical CPUs; commit {commit or '?'}; model {size / 2**20:.0f} MiB; "
          f"load average at start {os.getloadavg()[0]:.2f}")
print(header, flush=True)

# perqc eval on the float model: the compile-time budget's yardstick, measured in the same run.
wall, rss, out = run([perqc, "eval", model, "--tokenizer", tok, "--text", text, "--seq", "512",
                      "--windows", "16", "--skip-chars", "200000", "--quiet"])
eval_wall = wall
print(f"perqc eval (float, 16 x 512): {wall:.1f} s, peak RSS {rss / 1024:.0f} MiB, ppl {ppl_of(out):.4f}", flush=True)

results = []
for i, (name, args, ref) in enumerate(rows):
    if args is None:
        path, wall, rss = model, None, None
    else:
        path = os.path.join(work, f"row{i}.onnx")
        cmd = [perqc, model, "-o", path, "--calib-text", text, "--tokenizer", tok] + args
        wall, rss, cout = run(cmd)
        for line in cout.splitlines():
            if line.startswith(("quantize:", "note:")):
                print("   ", line)
    _, _, pout = run([python, os.path.join(root, "scripts", "bench", "ppl_ort.py"), path, tok, text,
                      "--skip-chars", "200000", "--windows", "16"])
    ppl = ppl_of(pout)
    native = None
    if a.native:
        # The float kernels (fake quantization), as this column has always been measured;
        # the integer plan's agreement is in docs/runtime.md.
        _, _, nout = run([perqc, "eval", path, "--tokenizer", tok, "--text", text, "--seq", "512",
                          "--windows", "16", "--skip-chars", "200000", "--quiet", "--no-int"])
        native = ppl_of(nout)
    fsize = os.path.getsize(path) + (os.path.getsize(path + ".data") if os.path.exists(path + ".data") else 0)
    results.append((name, args, ref, ppl, native, wall, rss, fsize))
    print(f"{name}: ppl {ppl:.2f}" + (f" (perqc eval {native:.2f})" if native else "") +
          (f", compile {wall:.1f} s = {wall / eval_wall:.2f}x eval, peak RSS {rss / 1024:.0f} MiB = "
           f"{rss * 1024 / size:.2f}x the model file" if wall else "") + f", file {fsize / 2**20:.0f} MiB", flush=True)
    if not a.keep and path != model:
        for p in (path, path + ".data"):
            if os.path.exists(p):
                os.remove(p)

if not a.keep:
    os.rmdir(work)

lines = ["| config | perqc ppl (ORT) | " + ("perqc eval ppl | " if a.native else "") +
         "reference ppl | compile | compile / eval | peak RSS / file | file size | perqc arguments |",
         "|---|---|" + ("---|" if a.native else "") + "---|---|---|---|---|---|"]
for name, args, ref, ppl, native, wall, rss, fsize in results:
    cells = [name, f"{ppl:.2f}"]
    if a.native:
        cells.append(f"{native:.2f}" if native else "")
    cells += [ref or "", f"{wall:.1f} s" if wall else "", f"{wall / eval_wall:.2f}" if wall else "",
              f"{rss * 1024 / size:.2f}" if rss else "", f"{fsize / 2**20:.0f} MiB",
              "`" + " ".join(args) + "`" if args else ""]
    lines.append("| " + " | ".join(cells) + " |")
table = "\n".join(lines)
print()
print(table)

if out_md != "-" and a.update and os.path.exists(out_md):
    # Replace the rows run, by their first cell; note where they came from.
    text = open(out_md).read().splitlines()
    fresh = {l.split("|")[1].strip(): l for l in lines[2:]}
    done = set()
    for i, l in enumerate(text):
        name = l.split("|")[1].strip() if l.startswith("| ") else None
        if name in fresh:
            text[i] = fresh[name]
            done.add(name)
    # New rows go after the table's last row.
    last = max((i for i, l in enumerate(text) if l.startswith("| ")), default=len(text) - 1)
    text[last + 1:last + 1] = [fresh[n] for n in fresh if n not in done]
    # Rows the script no longer has go.
    names = {name for name, _, _ in ROWS} | {"config"}
    text = [l for l in text if not (l.startswith("| ") and l.split("|")[1].strip() not in names)]
    text.append("")
    text.append(f"Rows re-measured by `results.py --update --rows {a.rows}`: {', '.join(fresh)}; {header}")
    tmp = out_md + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(text) + "\n")
    os.replace(tmp, out_md)
    print(f"\nupdated {out_md}")
elif out_md != "-":
    md = f"""# Results: W4A4 PeRQ on SmolLM2-135M

Produced by `python3 scripts/bench/results.py` (this file is written by it; edit the script, not
the table). Protocol: [eval.md](eval.md): calibration on 16 x 512
tokens from characters [0, 200000) of the handbook corpus, perplexity by ONNX Runtime on the
emitted file over 16 windows of 512 tokens from character 200000. The reference column is
Brevitas 0.13.4's PeRQ under the same protocol (W INT4 symmetric per-channel MSE, RTN; A INT4
asymmetric per-token dynamic; lm_head float). "compile / eval" divides the compile's wall time by
`perqc eval`'s on the float model (16 x 512), measured in the same run ({eval_wall:.1f} s);
peak RSS is the compile process's, over the model file ({size / 2**20:.0f} MiB). "perqc eval
ppl" is the native runtime's float kernels (`perqc eval --no-int`; the integer plan: runtime.md).

{header}

Every row runs `perqc MODEL -o OUT --calib-text handbook.txt --tokenizer tokenizer.json` plus the
arguments in the last column (defaults: `--preset w4a4 --rotation full --block-size 32 --permute
massdiff --hadamard-core 144`, GPTQ and the activation clip search, GPTQ fitted to the float output
at the inputs the online Hadamard computes, `--gptq-input-error online`).

{table}
"""
    tmp = out_md + ".tmp"
    with open(tmp, "w") as f:
        f.write(md)
    os.replace(tmp, out_md)
    print(f"\nwrote {out_md}")
