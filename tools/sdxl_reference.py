"""A tiny random SDXL model and its goldens, for nulltext's SDXL tests.

It writes tests/fixtures/models/tiny-sdxl/, a diffusers folder (`save_pretrained`,
safetensors, fp32) with the exact *structure* of stabilityai/stable-diffusion-xl-base-1.0 at
narrow widths:
  - unet: blocks DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D (no attention at
    the highest resolution) and their mirror; `block_out_channels` (16, 32, 48), 2 layers per
    block, `attention_head_dim` (heads, as in SDXL's config) (2, 4, 6), transformer depth
    (1, 1, 2) per level (the mid block takes the last, the up path the reverse, as diffusers
    does), linear projections, `addition_embed_type` "text_time" with
    `addition_time_embed_dim` 8 and `projection_class_embeddings_input_dim` 12 + 6·8 = 60,
    `cross_attention_dim` 8 + 16 = 24, 16 norm groups, `sample_size` 32 (256 px images);
  - text_encoder: CLIPTextModel, hidden 8, 3 layers, 2 heads, quick_gelu (SDXL's CLIP ViT-L);
  - text_encoder_2: CLIPTextModelWithProjection, hidden 16, 3 layers, 4 heads, gelu,
    `projection_dim` 12 (SDXL's OpenCLIP ViT-bigG);
  - both with the real CLIP vocabulary (49408) and the real BPE files (tests/fixtures/models/
    tiny-sd15/tokenizer); tokenizer_2 pads with "!" as SDXL base 1.0's tokenizer_2 does;
  - vae: AutoencoderKL, 4 levels (16, 16, 32, 32), 16 groups, `scaling_factor` 0.13025,
    `force_upcast` true (SDXL's VAE config);
  - scheduler: SDXL base 1.0's EulerDiscreteScheduler config (scaled_linear 0.00085–0.012,
    steps_offset 1, leading spacing).
Weights: `torch.manual_seed(0)` before each component, default initialisation, then the
tiny SD 1.5 fixture's two deterministic rescalings (so that the random network behaves like
a denoiser): VAE `quant_conv` mean half (weight[:4], bias[:4]) × 16 and
`post_quant_conv.weight` / 16; UNet `conv_out` × 0.1.

Goldens, in tests/fixtures/golden/ (fp32; `StableDiffusionXLPipeline` on this model):
  - sdxl_text.safetensors: PROMPTS' ids from both tokenizers (`ids_1`, `ids_2`, padded to
    77), `prompt_embeds` [n, 77, 24] and `pooled_prompt_embeds` [n, 12] as the pipeline's
    `encode_prompt` computes them (the penultimate hidden state of each encoder,
    concatenated; the second encoder's projected output at the end token);
  - sdxl_unet_eps.safetensors: the UNet's ε for a seeded latent `x` [2, 4, 32, 32], context
    = the embeddings of "" and of the cat prompt, `text_embeds` their pooled embeddings and
    `time_ids` from the pipeline's `_get_add_time_ids` (row 0: 256² original, no crop,
    256² target; row 1: 512×384 original, crop (16, 8), 256² target), at t = 1, 501, 981:
    `eps_b2_t{t}` for both rows, `eps_b1_t{t}` for row 1 alone;
  - sdxl_vae.safetensors: the fixture photo as `x` in [−1, 1], the encoder's `mean` and
    `logvar`, `image_latent` = mean × 0.13025, `decoded` = the decoder's output for the mean.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch diffusers transformers \
        safetensors numpy pillow
    /tmp/venv/bin/python tools/sdxl_reference.py

Made with PyTorch 2.15.0, diffusers 0.42.1, transformers 5.24.0, one CPU thread, fp32.
"""
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from safetensors.torch import save_file
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPTokenizer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIXTURES, "models", "tiny-sdxl")
GOLDEN = os.path.join(FIXTURES, "golden")
TOK = os.path.join(FIXTURES, "models", "tiny-sd15", "tokenizer")
PHOTO = os.path.join(FIXTURES, "inputs", "chelsea256.png")
CAT = "a close up photo of a cat"
PROMPTS = [
    "",
    CAT,
    "A Tiger, sitting on the TABLE!",
    "a photo of a cat " * 20,  # longer than 77 tokens: truncated
    "a café in Zürich",
    "an astronaut riding a horse, photorealistic",
    "Wow!! A cat!",  # tokenizer_2 splits its padding token "!" off: other positions
]
TIMESTEPS = [1, 501, 981]
# (original size, crop top-left, target size) of each row, as (height, width).
SIZES = [((256, 256), (0, 0), (256, 256)), ((512, 384), (16, 8), (256, 256))]


def build():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 48),
        layers_per_block=2,
        attention_head_dim=(2, 4, 6),
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        cross_attention_dim=24,
        norm_num_groups=16,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=12 + 6 * 8,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=8, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=8, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
        projection_dim=12, bos_token_id=49406, eos_token_id=49407, pad_token_id=1))
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=16,
        sample_size=256, scaling_factor=0.13025, force_upcast=True)
    with torch.no_grad():
        vae.quant_conv.weight[:4] *= 16
        vae.quant_conv.bias[:4] *= 16
        vae.post_quant_conv.weight /= 16
        unet.conv_out.weight *= 0.1
        unet.conv_out.bias *= 0.1
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1,
        timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)
    tokenizer = CLIPTokenizer.from_pretrained(TOK)
    tokenizer_2 = CLIPTokenizer.from_pretrained(TOK, pad_token="!")
    return StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet.eval(), scheduler=scheduler,
        force_zeros_for_empty_prompt=True)


def write_model(pipe):
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    pipe.save_pretrained(OUT, safe_serialization=True)
    # The BPE files are what nulltext reads and what transformers rebuilds the tokenizer
    # from; the derived tokenizer.json (3.6 MB each) is left out to keep the fixture small.
    for sub in ("tokenizer", "tokenizer_2"):
        for f in ("vocab.json", "merges.txt"):
            if not os.path.isfile(os.path.join(OUT, sub, f)):
                shutil.copy(os.path.join(TOK, f), os.path.join(OUT, sub, f))
        derived = os.path.join(OUT, sub, "tokenizer.json")
        if os.path.isfile(derived):
            os.remove(derived)
    # reload: every golden comes from the files as saved
    return StableDiffusionXLPipeline.from_pretrained(OUT).to(torch.float32)


def ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt").input_ids.to(torch.int64)


def text_golden(pipe):
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    save_file({
        "ids_1": ids(pipe.tokenizer, PROMPTS).contiguous(),
        "ids_2": ids(pipe.tokenizer_2, PROMPTS).contiguous(),
        "prompt_embeds": embeds.contiguous(),
        "pooled_prompt_embeds": pooled.contiguous(),
    }, os.path.join(GOLDEN, "sdxl_text.safetensors"), metadata={"prompts": json.dumps(PROMPTS)})
    return embeds, pooled


def unet_golden(pipe, embeds, pooled):
    context = embeds[:2]  # "" and the cat prompt
    text_embeds = pooled[:2]
    proj_dim = pipe.text_encoder_2.config.projection_dim
    time_ids = torch.cat([
        pipe._get_add_time_ids(orig, crop, target, dtype=torch.float32,
                               text_encoder_projection_dim=proj_dim)
        for orig, crop, target in SIZES])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g)
    out = {"x": x, "context": context.contiguous(), "text_embeds": text_embeds.contiguous(),
           "time_ids": time_ids.contiguous()}
    for t in TIMESTEPS:
        tt = torch.tensor(t)
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        out[f"eps_b2_t{t}"] = pipe.unet(x, tt, encoder_hidden_states=context,
                                        added_cond_kwargs=cond).sample
        cond1 = {"text_embeds": text_embeds[1:], "time_ids": time_ids[1:]}
        out[f"eps_b1_t{t}"] = pipe.unet(x[1:], tt, encoder_hidden_states=context[1:],
                                        added_cond_kwargs=cond1).sample
    save_file({k: v.contiguous() for k, v in out.items()},
              os.path.join(GOLDEN, "sdxl_unet_eps.safetensors"),
              metadata={"timesteps": json.dumps(TIMESTEPS), "sizes": json.dumps(SIZES)})


def vae_golden(pipe):
    img = np.asarray(Image.open(PHOTO).convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(img).permute(2, 0, 1)[None] * 2.0 - 1.0
    dist = pipe.vae.encode(x).latent_dist
    decoded = pipe.vae.decode(dist.mean).sample
    save_file({
        "x": x.contiguous(),
        "mean": dist.mean.contiguous(),
        "logvar": dist.logvar.contiguous(),
        "image_latent": (dist.mean * pipe.vae.config.scaling_factor).contiguous(),
        "decoded": decoded.contiguous(),
    }, os.path.join(GOLDEN, "sdxl_vae.safetensors"))


def main():
    torch.set_num_threads(1)
    os.makedirs(GOLDEN, exist_ok=True)
    pipe = write_model(build())
    with torch.no_grad():
        embeds, pooled = text_golden(pipe)
        unet_golden(pipe, embeds, pooled)
        vae_golden(pipe)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"{OUT}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
