"""A small benchmark in PIE-Bench's format and the numbers PIE-Bench's own evaluation gives
for it, for nulltext's tests.

    python tools/pie_bench_reference.py --pnp-inversion PnPInversion/ --dino dino/ \
        --torchmetrics-1.2 tm12/ [--vitb8]

needs torch, torchvision, torchmetrics, transformers, lpips, numpy, pillow, safetensors,
scikit-image (its sample photos), checkouts of cure-lab/PnPInversion and
facebookresearch/dino, and torchmetrics 1.2.0 installed apart
(`pip install --no-deps --target tm12/ torchmetrics==1.2.0`).

Writes tests/fixtures/pie-bench/:
- `mapping_file.json`, `annotation_images/`: four photos (real photographs cut to 128 px and
  enlarged 4× by pixel repetition to PIE-Bench's 512 px, so that the PNGs stay small), their
  captions with `[` `]` markers, blended words, edit types 0, 1, 6 and 9, and run-length masks
  (the last covers the whole image: its unedited-part metrics are "nan").
- `edited/`: one made-up "edit" per photo (inside the mask the colour channels rotated,
  outside a faint checkerboard), in the same layout.
- `reference.json`: per entry, the decoded mask's size and count of ones (the masks
  themselves as `masks/KEY.png`), and every metric of `evaluate.py`'s default list, computed
  by PnPInversion's own `calculate_metric` and `MetricsCalculator` methods with these
  networks in place of the downloads:
  - LPIPS: the `lpips` package's SqueezeNet with the random backbone of
    tests/fixtures/lpips (torchmetrics' LPIPS is that network);
  - CLIP: torchmetrics' `CLIPScore` computation (written out in `ClipScore`) on the tiny
    random CLIP of tests/fixtures/clip (CLIP's tokenizer from tests/fixtures/models/tiny-sd15);
  - structure distance: PnPInversion's `LossG` on facebookresearch/dino's
    `VisionTransformer` (patch 8, depth 12, qkv bias, LayerNorm eps 1e-6) of width 128 with
    2 heads, weights from the generator below. `VitExtractor` looks the width and heads up
    from the model's name (384/6 or 768/12 only); those two look-ups are set to 128 and 2,
    nothing else changes. With --vitb8 also the real ViT-B/8 (768 wide, 12 heads, the
    extractor unchanged) on the first pair.
  The structure distance is given with torchvision 0.13's resize (no antialiasing, the
  published environment: `antialias=False`) and with today's default (antialiased); SSIM with
  torchmetrics 1.2.0 (what the published environment, set up in 2023, got: the mean over the
  windows inside the image) and with the installed torchmetrics (since 1.4.2: the image
  reflect-padded by 5 pixels and every pixel's window averaged, variances clamped at 0).

The weight generator (nulltext's tests reproduce it in Rust): for a tensor named NAME with
SHAPE, the state is seed · φ + FNV-1a-64(NAME) (φ = 0x9E3779B97F4A7C15, mod 2⁶⁴); value k
(k = 1, 2, …) is splitmix64's output for state + k·φ, u = (out >> 40) / 2²⁴ ∈ [0, 1), and the
entry is (2u − 1)·scale + offset in f64, stored as f32: LayerNorm weights scale 0.1 offset 1,
biases, `cls_token` and `pos_embed` scale 0.02, other weights 1/√(fan-in).
"""
import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import types

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "pie-bench")
SEED = 7
PHI = 0x9E3779B97F4A7C15
M64 = (1 << 64) - 1

ENTRIES = [
    # key, folder, source, captions, edit type, blended word, region
    ("000000000000", "0_random_140", "chelsea", "a close up photo of a cat",
     "a close up photo of a [fluffy] cat", "0", "cat cat", ("ellipse", 250, 270, 150, 120)),
    ("111000000000", "1_change_object_80/1_artificial/1_animal", "astronaut",
     "a photo of a woman in a space suit", "a photo of a [robot] in a space suit", "1",
     "woman robot", ("rect", 140, 90, 400, 380)),
    ("600000000000", "6_change_attribute_color_40/1_artificial/1_animal", "coffee",
     "a cup of coffee on a plate", "a cup of [red] coffee on a plate", "6", "",
     ("rect", 60, 180, 330, 460)),
    ("900000000000", "9_change_style_80/1_artificial/1_animal", "chelsea-mirrored",
     "a close up photo of a cat", "a [watercolor painting] of a cat", "9", "", ("all",)),
]

METRICS = [
    "structure_distance",
    "psnr_unedit_part",
    "lpips_unedit_part",
    "mse_unedit_part",
    "ssim_unedit_part",
    "clip_similarity_source_image",
    "clip_similarity_target_image",
    "clip_similarity_target_image_edit_part",
]


# --- weights -------------------------------------------------------------------------

def fnv1a64(s):
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def generated(name, shape, seed=SEED):
    n = int(np.prod(shape))
    state = (seed * PHI + fnv1a64(name)) & M64
    with np.errstate(over="ignore"):
        k = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(state) + k * np.uint64(PHI)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    last = name.rsplit(".", 1)[-1]
    if last == "weight" and ("norm" in name.rsplit(".", 2)[-2]):
        scale, offset = 0.1, 1.0
    elif last == "bias" or name in ("cls_token", "pos_embed"):
        scale, offset = 0.02, 0.0
    else:
        scale, offset = 1.0 / np.sqrt(np.prod(shape[1:])), 0.0
    return ((2.0 * u - 1.0) * scale + offset).astype(np.float32).reshape(shape)


def dino_vit(dino_dir, width, heads):
    sys.path.insert(0, dino_dir)
    import vision_transformer as vits  # facebookresearch/dino

    model = vits.VisionTransformer(
        patch_size=8, embed_dim=width, depth=12, num_heads=heads, mlp_ratio=4, qkv_bias=True,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), num_classes=0).eval()
    sd = {k: torch.from_numpy(generated(k, tuple(v.shape))) for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    return model


# --- the benchmark -------------------------------------------------------------------

def photo(name):
    from skimage import data

    if name.startswith("chelsea"):
        img = Image.open(os.path.join(ROOT, "tests/fixtures/inputs/chelsea256.png")).convert("RGB")
        if name.endswith("mirrored"):
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
    elif name == "astronaut":
        img = Image.fromarray(data.astronaut()[0:320, 100:420])
    else:
        img = Image.fromarray(data.coffee()[0:400, 100:500])
    small = img.resize((128, 128), Image.LANCZOS)
    return np.array(small.resize((512, 512), Image.NEAREST))


def region(spec):
    m = np.zeros((512, 512), dtype=np.uint8)
    y, x = np.mgrid[0:512, 0:512]
    if spec[0] == "ellipse":
        _, cy, cx, ry, rx = spec
        m[((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1] = 1
    elif spec[0] == "rect":
        _, y0, x0, y1, x1 = spec
        m[y0:y1, x0:x1] = 1
    else:
        m[:] = 1
    return m


def rle(mask):
    """PIE-Bench's encoding: (start, length) of each run of ones, row-major."""
    flat = np.concatenate([[0], mask.reshape(-1), [0]])
    d = np.diff(flat.astype(np.int64))
    starts, ends = np.where(d == 1)[0], np.where(d == -1)[0]
    out = []
    for s, e in zip(starts, ends):
        out += [int(s), int(e - s)]
    return out


def edited(src, mask):
    out = src.astype(np.int32)
    inside = mask.astype(bool)
    out[inside] = out[inside][:, [1, 2, 0]]
    y, x = np.mgrid[0:512, 0:512]
    checker = (((y // 32) + (x // 32)) % 2 == 0) & ~inside
    out[checker] += 4
    return np.clip(out, 0, 255).astype(np.uint8)


def write_benchmark():
    mapping = {}
    for key, folder, src, p0, p1, t, bw, spec in ENTRIES:
        path = "%s/%s.png" % (folder, key)
        img = photo(src)
        m = region(spec)
        for top, a in (("annotation_images", img), ("edited", edited(img, m))):
            os.makedirs(os.path.join(OUT, top, folder), exist_ok=True)
            Image.fromarray(a).save(os.path.join(OUT, top, path), optimize=True)
        mapping[key] = {
            "image_path": path,
            "original_prompt": p0,
            "editing_prompt": p1,
            "editing_instruction": "",
            "editing_type_id": t,
            "blended_word": bw,
            "mask": rle(m),
        }
    with open(os.path.join(OUT, "mapping_file.json"), "w") as f:
        json.dump(mapping, f, indent=1)
        f.write("\n")


# --- PnPInversion's evaluation ------------------------------------------------------

def calculator(args, published_ssim_only=False):
    """PnPInversion's MetricsCalculator with local networks in place of its downloads."""
    sys.path.insert(0, args.pnp_inversion)
    from evaluation import matrics_calculator as mcmod
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
    from torchmetrics.regression import MeanSquaredError

    mc = mcmod.MetricsCalculator.__new__(mcmod.MetricsCalculator)
    mc.device = "cpu"
    mc.ssim_metric_calculator = StructuralSimilarityIndexMeasure(data_range=1.0)
    if published_ssim_only:
        return mc
    mc.psnr_metric_calculator = PeakSignalNoiseRatio(data_range=1.0)
    mc.mse_metric_calculator = MeanSquaredError()

    import lpips
    from safetensors.torch import load_file

    net = lpips.LPIPS(net="squeeze", pretrained=True, pnet_rand=True, verbose=False).eval()
    sd = load_file(os.path.join(ROOT, "tests/fixtures/lpips/lpips-squeeze-random-backbone.safetensors"))
    net.load_state_dict({k: v.float() for k, v in sd.items()})
    mc.lpips_metric_calculator = lambda a, b: net(a, b).mean()

    mc.clip_metric_calculator = ClipScore()

    def loss_g(width, heads, name):
        model = dino_vit(args.dino, width, heads)
        real_hub = torch.hub.load
        torch.hub.load = lambda *a, **k: model
        try:
            loss = mcmod.LossG(cfg={
                "dino_model_name": name, "dino_global_patch_size": 224, "lambda_global_cls": 10.0,
                "lambda_global_ssim": 1.0, "lambda_global_identity": 1.0, "entire_A_every": 75,
                "lambda_entire_cls": 10, "lambda_entire_ssim": 1.0}, device="cpu")
        finally:
            torch.hub.load = real_hub
        if width != 768:
            loss.extractor.get_head_num = lambda: heads
            loss.extractor.get_embedding_dim = lambda: width
        return loss

    mc.loss_small = loss_g(128, 2, "dino_vitb8")
    mc.loss_vitb8 = loss_g(768, 12, "dino_vitb8") if args.vitb8 else None
    return mc


class ClipScore:
    """torchmetrics' CLIPScore (`_clip_score_update`: 100 · cos of the projected embeddings,
    at least 0) on the tiny CLIP of tests/fixtures/clip. Written out because torchmetrics
    1.9's own call of `get_image_features` breaks on transformers 5; the computation is the
    same, on the same processor."""

    def __init__(self):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        d = os.path.join(ROOT, "tests/fixtures/clip")
        self.model = CLIPModel.from_pretrained(d, dtype=torch.float32).eval()
        self.processor = CLIPImageProcessor.from_pretrained(d)
        self.tokenizer = CLIPTokenizer.from_pretrained(os.path.join(ROOT, "tests/fixtures/models/tiny-sd15/tokenizer"))

    def __call__(self, img_tensor, txt):
        img = Image.fromarray(img_tensor.permute(1, 2, 0).numpy())
        pix = self.processor(images=[img], return_tensors="pt")["pixel_values"]
        ids = self.tokenizer([txt], padding=True, truncation=True, max_length=77, return_tensors="pt")
        m = self.model
        i = m.visual_projection(m.vision_model(pixel_values=pix).pooler_output)
        t = m.text_projection(m.text_model(**ids).pooler_output)
        i, t = i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
        return torch.clamp(100 * (i * t).sum(-1).mean(0), min=0)


def set_resize(loss, antialias):
    from torchvision import transforms

    loss.global_transform = transforms.Compose([
        transforms.Resize(224, max_size=480, antialias=antialias),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])


def value(v):
    if isinstance(v, str):
        return None  # "nan"
    return float(np.asarray(v))


def pairs(args):
    sys.path.insert(0, args.pnp_inversion)
    from evaluation.evaluate import mask_decode

    mapping = json.load(open(os.path.join(OUT, "mapping_file.json")))
    for key, item in mapping.items():
        mask = mask_decode(item["mask"])
        src = Image.open(os.path.join(OUT, "annotation_images", item["image_path"]))
        tgt = Image.open(os.path.join(OUT, "edited", item["image_path"]))
        p0 = item["original_prompt"].replace("[", "").replace("]", "")
        p1 = item["editing_prompt"].replace("[", "").replace("]", "")
        yield key, mask, src, tgt, p0, p1


def published_ssim(args):
    """Run under torchmetrics 1.2.0: ssim_unedit_part per key, as JSON on stdout."""
    sys.path.insert(0, args.pnp_inversion)
    from evaluation.evaluate import calculate_metric

    mc = calculator(args, published_ssim_only=True)
    out = {}
    for key, mask, src, tgt, p0, p1 in pairs(args):
        m3 = mask[:, :, None].repeat(3, axis=2)
        out[key] = value(calculate_metric(mc, "ssim_unedit_part", src, tgt, m3, m3, p0, p1))
    import torchmetrics

    print(json.dumps({"version": torchmetrics.__version__, "ssim": out}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pnp-inversion", required=True)
    ap.add_argument("--dino", required=True)
    ap.add_argument("--torchmetrics-1.2", dest="tm12", required=True)
    ap.add_argument("--vitb8", action="store_true")
    ap.add_argument("--published-ssim", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--export-test-vit", metavar="PATH",
                    help="only write the generated test ViT (width 128) as safetensors, for --dino")
    args = ap.parse_args()
    args.pnp_inversion = os.path.abspath(args.pnp_inversion)
    args.dino = os.path.abspath(args.dino)
    torch.set_num_threads(1)
    if args.export_test_vit:
        from safetensors.torch import save_file

        model = dino_vit(args.dino, 128, 2)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.export_test_vit)
        return
    if args.published_ssim:
        return published_ssim(args)
    write_benchmark()
    env = dict(os.environ, PYTHONPATH=os.path.abspath(args.tm12))
    old = json.loads(subprocess.check_output(
        [sys.executable, __file__, "--published-ssim", "--pnp-inversion", args.pnp_inversion,
         "--dino", args.dino, "--torchmetrics-1.2", args.tm12], env=env))
    assert old["version"] == "1.2.0", old["version"]

    sys.path.insert(0, args.pnp_inversion)
    from evaluation.evaluate import calculate_metric
    import torchmetrics
    import torchvision
    import transformers

    mc = calculator(args)
    os.makedirs(os.path.join(OUT, "masks"), exist_ok=True)
    entries = {}
    with torch.no_grad():
        for n, (key, mask, src, tgt, p0, p1) in enumerate(pairs(args)):
            Image.fromarray((mask * 255).astype(np.uint8)).save(
                os.path.join(OUT, "masks", key + ".png"), optimize=True)
            m3 = mask[:, :, None].repeat(3, axis=2)
            row = {}
            for metric in METRICS:
                if metric == "structure_distance":
                    continue
                row[metric] = value(calculate_metric(mc, metric, src, tgt, m3, m3, p0, p1))
            row["ssim_unedit_part_torchmetrics_1_2"] = old["ssim"][key]
            sd = {}
            for antialias in (False, True):
                set_resize(mc.loss_small, antialias)
                mc.structure_distance_metric_calculator = mc.loss_small
                sd[antialias] = value(calculate_metric(mc, "structure_distance", src, tgt, m3, m3, p0, p1))
            row["structure_distance"] = sd[False]
            row["structure_distance_antialiased"] = sd[True]
            if mc.loss_vitb8 is not None and n == 0:
                set_resize(mc.loss_vitb8, False)
                mc.structure_distance_metric_calculator = mc.loss_vitb8
                row["structure_distance_vitb8"] = value(
                    calculate_metric(mc, "structure_distance", src, tgt, m3, m3, p0, p1))
            entries[key] = {
                "mask_ones": int(mask.sum()),
                "mask_shape": list(mask.shape),
                "original_prompt": p0,
                "editing_prompt": p1,
                "metrics": row,
            }
            print(key, json.dumps(row))
    ref = {
        "provenance": "tools/pie_bench_reference.py: cure-lab/PnPInversion evaluation/evaluate.py "
        "(mask_decode, calculate_metric) and matrics_calculator.py, facebookresearch/dino "
        "vision_transformer.py; torch %s, torchvision %s, torchmetrics %s (SSIM also 1.2.0), "
        "transformers %s, lpips 0.1.4; CPU, one thread" % (
            torch.__version__, torchvision.__version__, torchmetrics.__version__, transformers.__version__),
        "dino_test_vit": {"width": 128, "heads": 2, "depth": 12, "patch": 8, "seed": SEED},
        "vitb8": {"width": 768, "heads": 12, "depth": 12, "patch": 8, "seed": SEED} if args.vitb8 else None,
        "entries": entries,
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
