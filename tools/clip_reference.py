"""CLIP-score fixtures for nulltext's tests: a tiny CLIPModel with random weights (the real
CLIP tokenizer's vocabulary) and the scores transformers computes with it.

    python tools/clip_reference.py      # needs torch, transformers, safetensors, pillow, numpy

The score is torchmetrics' CLIPScore: 100 · max(cos(image embedding, text embedding), 0),
with CLIPImageProcessor's preprocessing (shortest side to the model's size, bicubic; centre
crop; CLIP's mean and std).
"""
import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "clip")
TOK = os.path.join(ROOT, "tests", "fixtures", "models", "tiny-sd15", "tokenizer")


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=24,
    )
    model = CLIPModel(config).eval()
    # Weights stored in f16; the reference runs on exactly those values.
    sd = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if "position_ids" not in k}
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    save_file(sd, os.path.join(OUT, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(OUT)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(OUT)
    tok = CLIPTokenizer.from_pretrained(TOK)

    chelsea = Image.open(os.path.join(ROOT, "tests/fixtures/inputs/chelsea256.png")).convert("RGB")
    small = chelsea.resize((32, 32), Image.BICUBIC)
    small.save(os.path.join(OUT, "chelsea32.png"))
    cases = []
    for image_name, img in [("chelsea32.png", small), ("../inputs/chelsea256.png", chelsea)]:
        for text in ["a close up photo of a cat", "a red car on a bridge", "a dog"]:
            pix = processor(images=img, return_tensors="pt")["pixel_values"]
            ids = tok(text, return_tensors="pt", truncation=True, max_length=77)["input_ids"]
            with torch.no_grad():
                ie = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
                te = model.text_projection(model.text_model(input_ids=ids).pooler_output)
            ie = ie / ie.norm(dim=-1, keepdim=True)
            te = te / te.norm(dim=-1, keepdim=True)
            cos = float((ie * te).sum())
            cases.append({"image": image_name, "text": text, "cosine": cos, "score": max(100.0 * cos, 0.0),
                          "pixel_values_mean": float(pix.mean())})
    ref = {
        "provenance": "tools/clip_reference.py: transformers %s CLIPModel (random, torch.manual_seed(0), "
        "weights rounded to f16), CLIPImageProcessor, the tiny model's CLIP tokenizer; torch %s"
        % (__import__("transformers").__version__, torch.__version__),
        "cases": cases,
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    print(json.dumps(ref, indent=1))


if __name__ == "__main__":
    main()
