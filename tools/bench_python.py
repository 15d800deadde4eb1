#!/usr/bin/env python3
"""What the Python module costs over the command line: a whole edit (load the model and
the inversion, edit, decode, write the PNGs) as a `nulltext edit` process and as a Python
process doing the same through `nulltext`, alternating, on the same machine.

    cargo build --release --workspace --bins
    pip install ./crates/nulltext-py          # a release build of the module
    python3 tools/bench_python.py --model tests/fixtures/models/tiny-sd15 --runs 5

Also checks that both wrote the same pixels. Prints the medians and ranges; --json FILE
keeps every run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The Python side of one run: the same work as `nulltext edit --out-dir`.
PY_EDIT = """
import sys, nulltext
model, inversion, target, out = sys.argv[1:5]
sd = nulltext.load(model, device="cpu")
inv = nulltext.Inversion.load(inversion)
res = sd.edit(inv, [target])
res.images[0].save(f"{out}/reconstruction.png")
res.images[1].save(f"{out}/01-edit.png")
"""


def timed(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def pixels(path):
    from PIL import Image
    import numpy as np

    return np.asarray(Image.open(path).convert("RGB"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tests/fixtures/models/tiny-sd15")
    ap.add_argument("--image", default="tests/fixtures/inputs/chelsea256.png")
    ap.add_argument("--prompt", default="a close up photo of a cat")
    ap.add_argument("--target", default="a close up photo of a dog")
    ap.add_argument("--method", default="direct", help="how the inversion to edit is made")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cli", default=str(ROOT / "target" / "release" / "nulltext"))
    ap.add_argument("--python", default=sys.executable, help="an interpreter with nulltext installed")
    ap.add_argument("--json", help="write every run here")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inv = tmp / "inv.nti.safetensors"
        subprocess.run(
            [a.cli, "--quiet", "--device", "cpu", "invert", "-m", a.model, "-i", a.image,
             "-p", a.prompt, "-o", str(inv), "--method", a.method],
            check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
        )
        cli_dir, py_dir = tmp / "cli", tmp / "py"
        py_dir.mkdir()
        cli = [a.cli, "--quiet", "--device", "cpu", "edit", "-m", a.model, "-i", str(inv),
               "-t", a.target, "--out-dir", str(cli_dir)]
        py = [a.python, "-c", PY_EDIT, a.model, str(inv), a.target, str(py_dir)]
        # warm-up (page cache, first-touch of the weights), then alternating timed runs
        timed(cli)
        timed(py)
        runs = {"cli": [], "python": []}
        for r in range(a.runs):
            order = [("cli", cli), ("python", py)] if r % 2 == 0 else [("python", py), ("cli", cli)]
            for name, cmd in order:
                runs[name].append(timed(cmd))
                print(f"run {r + 1} {name:>6}: {runs[name][-1]:.2f} s", flush=True)
        same = all(
            (pixels(next(cli_dir.glob(n))) == pixels(py_dir / n.replace("*", "edit"))).all()
            for n in ["reconstruction.png", "01-*.png"]
        )

    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = med["python"] / med["cli"]
    print(f"whole edit, {a.model}: command line {med['cli']:.2f} s "
          f"({min(runs['cli']):.2f}–{max(runs['cli']):.2f}), Python {med['python']:.2f} s "
          f"({min(runs['python']):.2f}–{max(runs['python']):.2f}); Python / command line = "
          f"{ratio:.3f}; same pixels: {same}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "runs": runs, "median": med, "ratio": ratio,
                       "same_pixels": bool(same), "threads": os.cpu_count()}, f, indent=2)
    if not same:
        sys.exit("the command line and the Python module wrote different pixels")


if __name__ == "__main__":
    main()
