"""Reference values for nulltext's image metrics, computed with scikit-image.

Writes tests/fixtures/metrics/: image pairs (PNG) built from real photographs and
`reference.json` with scikit-image's PSNR, SSIM (uniform 7×7 window, and the Gaussian
σ = 1.5 window of Wang et al.) and MSE for each pair, with and without a mask (the mask
multiplies both images before the metrics, as PIE-Bench's background preservation does).

    python tools/metrics_reference.py      # needs numpy, pillow, scikit-image
"""
import io
import json
import os
import sys

import numpy as np
import skimage
from PIL import Image, ImageFilter
from skimage import data
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "metrics")


def save(name, arr):
    Image.fromarray(arr).save(os.path.join(OUT, name))
    return name


def jpeg(arr, q):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=q)
    return np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def metrics(ref, cand, mask=None):
    a = ref.astype(np.float64) / 255.0
    b = cand.astype(np.float64) / 255.0
    if mask is not None:
        m = (mask.astype(np.float64) / 255.0)[..., None]
        a, b = a * m, b * m
    return {
        "psnr": float(peak_signal_noise_ratio(a, b, data_range=1.0)),
        "mse": float(mean_squared_error(a, b)),
        "ssim": float(structural_similarity(a, b, channel_axis=2, data_range=1.0)),
        "ssim_gaussian": float(
            structural_similarity(
                a, b, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                use_sample_covariance=False,
            )
        ),
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(0)
    chelsea = np.array(Image.open(os.path.join(ROOT, "tests/fixtures/inputs/chelsea256.png")).convert("RGB"))
    astronaut = data.astronaut()[40:200, 160:320]  # 160×160 crop of a real photograph
    coffee = data.coffee()[100:228, 200:392]  # 128×192

    pairs = []
    ref = save("chelsea.png", chelsea)
    pairs.append(("chelsea-jpeg20", ref, save("chelsea-jpeg20.png", jpeg(chelsea, 20))))
    blur = np.array(Image.fromarray(chelsea).filter(ImageFilter.GaussianBlur(1.5)))
    pairs.append(("chelsea-blur", ref, save("chelsea-blur.png", blur)))
    noisy = np.clip(chelsea.astype(np.int16) + rng.integers(-20, 21, chelsea.shape), 0, 255).astype(np.uint8)
    pairs.append(("chelsea-noise", ref, save("chelsea-noise.png", noisy)))
    shifted = np.roll(chelsea, 3, axis=1)
    pairs.append(("chelsea-shift3", ref, save("chelsea-shift3.png", shifted)))
    ref_a = save("astronaut.png", astronaut)
    pairs.append(("astronaut-jpeg10", ref_a, save("astronaut-jpeg10.png", jpeg(astronaut, 10))))
    ref_c = save("coffee.png", coffee)
    dark = (coffee.astype(np.float64) * 0.8).round().astype(np.uint8)
    pairs.append(("coffee-darker", ref_c, save("coffee-darker.png", dark)))

    # A mask of the region to keep (white): the whole picture but an off-centre ellipse,
    # with soft edges, as a background mask would be.
    yy, xx = np.mgrid[0:256, 0:256]
    ell = ((xx - 140) / 70.0) ** 2 + ((yy - 110) / 55.0) ** 2
    mask = np.clip((ell - 1.0) * 4.0, 0.0, 1.0)
    mask = (mask * 255).round().astype(np.uint8)
    mask_name = save("chelsea-mask.png", mask)

    out = {
        "provenance": (
            "tools/metrics_reference.py with scikit-image %s, numpy %s; images from "
            "tests/fixtures/inputs/chelsea256.png and skimage.data (astronaut, coffee)"
            % (skimage.__version__, np.__version__)
        ),
        "pairs": [],
    }
    for name, r, c in pairs:
        ra = np.array(Image.open(os.path.join(OUT, r)).convert("RGB"))
        ca = np.array(Image.open(os.path.join(OUT, c)).convert("RGB"))
        entry = {"name": name, "reference": r, "candidate": c, "metrics": metrics(ra, ca)}
        if r == "chelsea.png":
            entry["mask"] = mask_name
            entry["masked"] = metrics(ra, ca, mask)
        out["pairs"].append(entry)
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
