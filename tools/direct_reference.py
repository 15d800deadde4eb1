"""Goldens for direct inversion + Prompt-to-Prompt, from the authors' own code.

Direct ("PnP") inversion is Ju et al., "PnP Inversion: Boosting Diffusion-based Editing with
3 Lines of Code", ICLR 2024. Their code (cure-lab/PnPInversion) computes the offsets in
`models/p2p/inversion.py` (`DirectInversion`) and edits with
`models/p2p/p2p_guidance_forward.py` (`direct_inversion_p2p_guidance_forward`) and the
Prompt-to-Prompt controllers of `models/p2p/attention_control.py`. This script imports
those files from a checkout of that repository and runs them, unchanged but for the
substitutions listed in PATCHES (today's diffusers renamed the attention class and its
helpers; the authors' resolution constants are written for 512² images and are scaled
here to the fixture model's 256² images, 32×32 latents; and the default device is the CPU).

It writes tests/fixtures/golden/chelsea_direct_p2p.safetensors: the fixture photo inverted
with "a close up photo of a cat" at w = 7.5 (50 steps), edited with PIE-Bench's settings
(cross-replace 0.4, self-replace 0.6):
  - `refine`: "... a fluffy cat" with the refine controller (PIE-Bench's default),
  - `replace_blend`: "... a dog" word swap with local blend on cat/dog, at a threshold that
    masks part of the latent and that no map value comes near (chosen by this script),
  - `latent_offsets` (the source row's offsets, [50, 4, 32, 32]) and `recon_latent`.

    git clone https://github.com/cure-lab/PnPInversion /tmp/pnp   # commit 07f97f4
    pip install torch diffusers transformers safetensors numpy pillow matplotlib
    python tools/direct_reference.py --pnp-repo /tmp/pnp

Made with PyTorch 2.15.0, diffusers 0.42.1, transformers 5.24.0, one CPU thread, fp32.
"""
import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "tests", "fixtures", "models", "tiny-sd15")
PHOTO = os.path.join(ROOT, "tests", "fixtures", "inputs", "chelsea256.png")
OUT = os.path.join(ROOT, "tests", "fixtures", "golden", "chelsea_direct_p2p.safetensors")
SOURCE = "a close up photo of a cat"
GUIDANCE = 7.5
STEPS = 50

# (file, text in the authors' code, replacement, why). Each must occur in the file.
PATCHES = [
    ("models/p2p/attention_control.py", "'CrossAttention'", "'Attention'",
     "diffusers renamed CrossAttention to Attention"),
    ("models/p2p/attention_control.py", "self.reshape_heads_to_batch_dim",
     "self.head_to_batch_dim", "diffusers renamed the helper"),
    ("models/p2p/attention_control.py", "self.reshape_batch_dim_to_heads",
     "self.batch_to_head_dim", "diffusers renamed the helper"),
    ("models/p2p/attention_control.py",
     "def forward(x, context=None, mask=None, **kwargs):",
     "def forward(x, encoder_hidden_states=None, attention_mask=None, **kwargs):\n"
     "            context, mask = encoder_hidden_states, attention_mask",
     "diffusers now passes the context and mask by these keyword names"),
    ("models/p2p/attention_control.py", "32 ** 2", "16 ** 2",
     "(latent/2)^2 query pixels: 32^2 at 512^2, 16^2 for 32x32 latents"),
    ("models/p2p/attention_control.py", "1, 16, 16, MAX_NUM_WORDS", "1, 8, 8, MAX_NUM_WORDS",
     "blend maps at latent/4: 16x16 at 512^2, 8x8 for 32x32 latents"),
    ("models/p2p/attention_control.py", "LATENT_SIZE = (64, 64)", "LATENT_SIZE = (32, 32)",
     "the latent size of 256^2 images"),
    ("models/p2p/attention_control.py", 'device="cuda"', 'device="cpu"',
     "CPU run"),
    ("models/p2p/p2p_guidance_forward.py", "height = width = 512", "height = width = 256",
     "the fixture photo is 256^2"),
]


def load_authors_code(repo):
    """Copies the authors' files to a temporary folder, applies PATCHES, imports them."""
    tmp = tempfile.mkdtemp(prefix="pnp-")
    for d in ["models/p2p", "utils"]:
        shutil.copytree(os.path.join(repo, d), os.path.join(tmp, d))
    for d in ["models", "utils"]:
        open(os.path.join(tmp, d, "__init__.py"), "a").close()
    open(os.path.join(tmp, "models", "p2p", "__init__.py"), "a").close()
    for rel, old, new, _ in PATCHES:
        path = os.path.join(tmp, rel)
        text = open(path).read()
        if old not in text:
            sys.exit(f"{rel}: `{old}` not found; is this commit 07f97f4 of PnPInversion?")
        open(path, "w").write(text.replace(old, new))
    sys.path.insert(0, tmp)
    return (
        importlib.import_module("models.p2p.inversion"),
        importlib.import_module("models.p2p.attention_control"),
        importlib.import_module("models.p2p.p2p_guidance_forward"),
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pnp-repo", required=True, help="a checkout of cure-lab/PnPInversion")
    args = ap.parse_args()
    torch.set_num_threads(1)
    inversion, control, forward = load_authors_code(args.pnp_repo)

    scheduler = DDIMScheduler.from_pretrained(MODEL, subfolder="scheduler")
    pipe = StableDiffusionPipeline.from_pretrained(
        MODEL, scheduler=scheduler, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler.set_timesteps(STEPS)
    image = np.array(Image.open(PHOTO).convert("RGB"))

    def invert(target):
        # As the authors' P2PEditor.edit_image_directinversion: both prompts inverted in one
        # batch; only the source row's offsets are used by the edit.
        inv = inversion.DirectInversion(model=pipe, num_ddim_steps=STEPS)
        _, _, x_stars, offsets = inv.invert(
            image_gt=image, prompt=[SOURCE, target], guidance_scale=GUIDANCE
        )
        return x_stars, offsets

    def edit(target, replace, blend_words=None, threshold=None, record=None):
        x_stars, offsets = invert(target)
        prompts = [SOURCE, target]
        controller = control.make_controller(
            pipeline=pipe, prompts=prompts, is_replace_controller=replace,
            cross_replace_steps={"default_": 0.4}, self_replace_steps=0.6,
            blend_words=blend_words, equilizer_params=None, num_ddim_steps=STEPS, device="cpu",
        )
        if threshold is not None:
            controller.local_blend.th = (threshold, threshold)
        if record is not None:
            # keep the normalized maps each blend thresholds (to choose a safe threshold)
            get_mask = controller.local_blend.get_mask

            def recording(maps, alpha, use_pool):
                m = (maps * alpha).sum(-1).mean(1)
                if use_pool:
                    m = torch.nn.functional.max_pool2d(m, (3, 3), (1, 1), padding=(1, 1))
                m = torch.nn.functional.interpolate(m, size=(32, 32))
                record.append((m / m.amax(dim=(2, 3), keepdim=True)).clone())
                return get_mask(maps, alpha, use_pool)

            controller.local_blend.get_mask = recording
        latents, _ = forward.direct_inversion_p2p_guidance_forward(
            model=pipe, prompt=prompts, controller=controller, latent=x_stars[-1],
            num_inference_steps=STEPS, guidance_scale=GUIDANCE, noise_loss_list=offsets,
        )
        return latents, x_stars, offsets

    with torch.no_grad():
        refine, x_stars, offsets = edit("a close up photo of a fluffy cat", replace=False)
        # Recon: the source row with its offsets (an AttentionStore, as the authors run it).
        recon, _ = forward.direct_inversion_p2p_guidance_forward(
            model=pipe, prompt=[SOURCE, SOURCE], controller=control.AttentionStore(),
            latent=x_stars[-1], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            noise_loss_list=offsets,
        )
        # Blend: a threshold that masks part of the latent, with no map value of the run
        # near it (the maps depend on the masks of earlier steps, so each candidate is
        # checked on its own run).
        def blend_run(th):
            maps = []
            z, _, _ = edit("a close up photo of a dog", True,
                           blend_words=(("cat",), ("dog",)), threshold=th, record=maps)
            values = torch.cat([m.flatten() for m in maps]).numpy()
            target = np.concatenate([m[1].flatten().numpy() for m in maps])
            return z, values, float(np.min(np.abs(values - th))), float(np.mean(target > th))

        _, values, _, _ = blend_run(0.3)
        target_share = lambda th: float(np.mean(values > th))
        candidates = sorted(
            (th for th in np.linspace(0.5, 0.99, 491) if 0.2 <= target_share(th) <= 0.8),
            key=lambda th: -float(np.min(np.abs(values - th))),
        )
        for th in candidates[:8]:
            blend, _, gap, masked = blend_run(float(th))
            print(f"blend threshold {th:.4f}: nearest map value {gap:.2e} away, "
                  f"{masked:.0%} of the target's maps above it")
            if gap > 1e-4 and 0.1 <= masked <= 0.9:
                th = float(th)
                break
        else:
            sys.exit("no blend threshold with a margin")

    source_offsets = torch.cat([o[:1] for o in offsets])
    z0 = x_stars[0]
    print("recon vs z*0: max abs", float((recon[:1] - z0).abs().max()))
    print("refine source row vs z*0:", float((refine[:1] - z0).abs().max()))
    cases = [
        {"name": "refine", "kind": "refine",
         "prompts": [SOURCE, "a close up photo of a fluffy cat"],
         "cross_replace_steps": {"default_": 0.4}, "self_replace_steps": 0.6},
        {"name": "replace_blend", "kind": "replace",
         "prompts": [SOURCE, "a close up photo of a dog"],
         "cross_replace_steps": {"default_": 0.4}, "self_replace_steps": 0.6,
         "blend_words": [["cat"], ["dog"]], "blend_th": [th, th],
         "blend_margin": gap, "blend_masked": masked},
    ]
    meta = {
        "cases": json.dumps(cases),
        "guidance": str(GUIDANCE),
        "prompt": SOURCE,
        "source": "cure-lab/PnPInversion 07f97f4: DirectInversion.invert, make_controller, "
                  "direct_inversion_p2p_guidance_forward; patches: "
                  + "; ".join(f"{old!r} -> {new!r} ({why})" for _, old, new, why in PATCHES),
    }
    save_file(
        {
            "refine": refine.contiguous(),
            "replace_blend": blend.contiguous(),
            "latent_offsets": source_offsets.contiguous(),
            "recon_latent": recon[:1].contiguous(),
            "latent_T": x_stars[-1].contiguous(),
            "image_latent": z0.contiguous(),
        },
        OUT,
        metadata=meta,
    )
    print("wrote", OUT)


if __name__ == "__main__":
    main()
