"""LPIPS fixtures for nulltext's tests, and the exporter users run to get real LPIPS weights.

    # users (needs internet once: torchvision downloads the backbone):
    python tools/lpips_reference.py export --net alex --out lpips-alex.safetensors
    # tests/fixtures/lpips/ (no download: random backbone, the real linear heads):
    python tools/lpips_reference.py fixtures

Needs torch, torchvision, lpips (PyPI), safetensors, numpy, pillow.
"""
import argparse
import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import lpips

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export(net, out, random_backbone=False, half=False):
    torch.manual_seed(0)
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=random_backbone, verbose=False).eval()
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if half:
        # Stored in f16 (small fixtures); the reference runs on exactly these values.
        sd = {k: v.half() for k, v in sd.items()}
        model.load_state_dict({k: v.float() for k, v in sd.items()})
    save_file(sd, out, metadata={"lpips_net": net, "lpips_version": "0.1"})
    return model


def to_tensor(path, mask=None):
    a = np.array(Image.open(path).convert("RGB")).astype(np.float64) / 255.0
    if mask is not None:
        a = a * (np.array(Image.open(mask).convert("L")).astype(np.float64) / 255.0)[..., None]
    t = torch.tensor(a, dtype=torch.float32).permute(2, 0, 1)[None]
    return t * 2 - 1


def fixtures():
    m = os.path.join(ROOT, "tests", "fixtures", "metrics")
    pairs = json.load(open(os.path.join(m, "reference.json")))["pairs"]
    out_dir = os.path.join(ROOT, "tests", "fixtures", "lpips")
    os.makedirs(out_dir, exist_ok=True)
    result = {
        "provenance": "tools/lpips_reference.py fixtures: lpips %s (linear heads v0.1 from the "
        "package), backbone random (torch.manual_seed(0), pnet_rand=True), all weights "
        "rounded to f16; torch %s" % (lpips.__version__ if hasattr(lpips, "__version__") else "0.1.4", torch.__version__),
        "nets": {},
    }
    for net in ["alex", "squeeze"]:
        model = export(net, os.path.join(out_dir, "lpips-%s-random-backbone.safetensors" % net), True, True)
        rows = []
        with torch.no_grad():
            for p in pairs:
                a = to_tensor(os.path.join(m, p["reference"]))
                b = to_tensor(os.path.join(m, p["candidate"]))
                rows.append({"name": p["name"], "reference": p["reference"], "candidate": p["candidate"],
                             "lpips": float(model(a, b).item())})
                if "mask" in p:
                    mk = os.path.join(m, p["mask"])
                    a = to_tensor(os.path.join(m, p["reference"]), mk)
                    b = to_tensor(os.path.join(m, p["candidate"]), mk)
                    rows.append({"name": p["name"] + " (masked)", "reference": p["reference"],
                                 "candidate": p["candidate"], "mask": p["mask"],
                                 "lpips": float(model(a, b).item())})
        result["nets"][net] = rows
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps(result, indent=1))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--net", choices=["alex", "squeeze"], default="alex")
    e.add_argument("--out", required=True)
    sub.add_parser("fixtures")
    a = ap.parse_args()
    if a.cmd == "export":
        export(a.net, a.out)
    else:
        fixtures()


if __name__ == "__main__":
    main()
