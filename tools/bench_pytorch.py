#!/usr/bin/env python3
"""Times PyTorch + diffusers on the same stages as `nulltext bench`, and (with --full) a
whole null-text inversion and a Prompt-to-Prompt-sized edit, on the same weights.

A benchmark, not a test: nulltext never needs Python. Typical use:

    nulltext random-model --preset sd15 --out /tmp/sd15-random
    python3 tools/bench_pytorch.py --model /tmp/sd15-random --size 512 --threads 2
    python3 tools/bench_pytorch.py --model /tmp/sd15-random --device cuda --dtype fp16 --full
    nulltext random-model --preset sdxl --out /tmp/sdxl-random
    python3 tools/bench_pytorch.py --model /tmp/sdxl-random --size 1024 --threads 2 --stages unet_b1

Needs torch, diffusers and transformers. The algorithm is the reference's
(null_text_w_ptp.ipynb): DDIM inversion with w = 1, then per step a fresh Adam on the
unconditional embedding, lr 1e-2·(1 − i/100), N inner iterations (no early stop with
--no-early-stop), loss = MSE of the guided DDIM step to the pivot.

An SDXL folder (one with text_encoder_2/) is run as diffusers' StableDiffusionXLPipeline
runs it: both encoders' penultimate states concatenated, the second one's pooled
projection and time_ids (H, W, 0, 0, H, W) as added conditions, zeros for the empty
negative prompt (force_zeros_for_empty_prompt), and the VAE upcast to fp32 when its
config asks for it. As in nulltext, the null-text optimization then optimizes the
negative context and the negative pooled embedding together, starting from those zeros.
"""
import argparse
import json
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F


class Pipe:
    """The model's parts and the three things every stage asks of them: prompt embeddings
    (context, pooled or None), the empty negative prompt's, and ε."""

    def __init__(self, args):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.dtype = torch.float16 if args.dtype == "fp16" else torch.float32
        self.dev = dev = torch.device(args.device)
        dtype = self.dtype
        self.sdxl = os.path.isdir(os.path.join(args.model, "text_encoder_2"))
        self.unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", torch_dtype=dtype).to(dev).eval()
        vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", torch_dtype=dtype)
        self.vae_dtype = torch.float32 if dtype == torch.float16 and vae.config.force_upcast else dtype
        self.vae = vae.to(dev, self.vae_dtype).eval()
        self.scaling = vae.config.scaling_factor
        self.text = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder", torch_dtype=dtype).to(dev).eval()
        self.tok = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
        parts = [self.unet, self.vae, self.text]
        if self.sdxl:
            self.text_2 = CLIPTextModelWithProjection.from_pretrained(args.model, subfolder="text_encoder_2", torch_dtype=dtype).to(dev).eval()
            self.tok_2 = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer_2")
            parts.append(self.text_2)
            index = os.path.join(args.model, "model_index.json")
            config = {}
            if os.path.exists(index):
                with open(index) as f:
                    config = json.load(f)
            self.zeros_for_empty = config.get("force_zeros_for_empty_prompt", True)
        for m in parts:
            m.requires_grad_(False)

    def _ids(self, tok, prompts):
        return tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(self.dev)

    @torch.no_grad()
    def encode(self, prompts):
        if not self.sdxl:
            return self.text(self._ids(self.tok, prompts))[0], None
        first = self.text(self._ids(self.tok, prompts), output_hidden_states=True).hidden_states[-2]
        second = self.text_2(self._ids(self.tok_2, prompts), output_hidden_states=True)
        return torch.cat([first, second.hidden_states[-2]], dim=-1), second.text_embeds

    def negative(self):
        if self.sdxl and self.zeros_for_empty:
            ctx, pooled = self.encode([""])
            return torch.zeros_like(ctx), torch.zeros_like(pooled)
        return self.encode([""])

    def eps(self, z, t, ctx, pooled=None):
        if pooled is None:
            return self.unet(z, t, encoder_hidden_states=ctx).sample
        h, w = z.shape[-2] * 8, z.shape[-1] * 8
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=ctx.dtype, device=ctx.device).expand(z.shape[0], -1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return self.unet(z, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample

    def encode_image(self, img):
        return self.vae.encode(img.to(self.vae_dtype)).latent_dist.mean.float() * self.scaling

    def decode(self, z):
        return self.vae.decode(z.to(self.vae_dtype) / self.scaling).sample


def cast(x, dtype):
    return None if x is None else x.to(dtype)


def cat(xs):
    return None if xs[0] is None else torch.cat(xs)


def set_attention(unet, kind):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(dev):
    """Peak memory since the last `reset_peak`: on CPUs the resident set's high-water mark,
    read as `nulltext bench` reads it (Linux); elsewhere the whole process's peak."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as f:
            kib = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
        return kib / 2**20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def alphas(num_steps=50):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    ratio = 1000 // num_steps
    timesteps = [i * ratio + 1 for i in reversed(range(num_steps))]
    return ac, timesteps, ratio


def ddim_step(eps, t, z, ac, ratio):
    a_t = ac[t]
    prev = t - ratio
    a_prev = ac[prev] if prev >= 0 else ac[0]
    x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


def ddim_next(eps, t, z, ac, ratio):
    cur = min(t - ratio, 999)
    a_cur = ac[cur] if cur >= 0 else ac[0]
    a_next = ac[t]
    x0 = (z - (1 - a_cur) ** 0.5 * eps) / a_cur**0.5
    return a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps


def timeit(fn, dev, repeat, warmup):
    for _ in range(warmup):
        fn()
    sync(dev)
    reset_peak(dev)
    times = []
    for _ in range(repeat):
        s = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - s)
    return times


def stages(args, pipe):
    dtype, dev = pipe.dtype, pipe.dev
    h = args.size // 8
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, h, h, generator=g).to(dev, dtype)
    z2 = torch.cat([z, z])
    cond, cond_pooled = pipe.encode(["a close up photo of a cat"])
    uncond, uncond_pooled = pipe.negative()
    ctx, pooled = torch.cat([cond, uncond]), cat([cond_pooled, uncond_pooled])
    img = (torch.randn(1, 3, args.size, args.size, generator=g) * 0.5).clamp(-1, 1).to(dev, dtype)
    target = torch.randn(1, 4, h, h, generator=g).to(dev, torch.float32)
    ac, timesteps, ratio = alphas()
    t = timesteps[10]
    with torch.no_grad():
        eps_c = pipe.eps(z, t, cond, cond_pooled).float()

    def nti_iter():
        u, u_pooled = (None if x is None else x.detach().float().clone().requires_grad_(True) for x in (uncond, uncond_pooled))
        opt = torch.optim.Adam([x for x in (u, u_pooled) if x is not None], lr=1e-2)
        eps_u = pipe.eps(z, t, u.to(dtype), cast(u_pooled, dtype)).float()
        noise = eps_u + 7.5 * (eps_c - eps_u)
        loss = F.mse_loss(ddim_step(noise, t, z.float(), ac, ratio), target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    plan = {
        "text_encoder": lambda: pipe.encode(["a close up photo of a cat"]),
        "unet_b1": lambda: pipe.eps(z, t, cond, cond_pooled),
        "unet_b2": lambda: pipe.eps(z2, t, ctx, pooled),
        "nti_iter": nti_iter,
        "vae_encode": lambda: pipe.encode_image(img),
        "vae_decode": lambda: pipe.decode(z),
    }
    rows = []
    for attn in args.attention.split(","):
        set_attention(pipe.unet, attn)
        for name in args.stages.split(","):
            if name not in plan:
                continue
            if attn != args.attention.split(",")[0] and not name.startswith(("unet", "nti")):
                continue
            fn = plan[name]
            if name == "nti_iter":
                times = timeit(fn, dev, args.repeat, args.warmup)
            else:
                with torch.no_grad():
                    times = timeit(fn, dev, args.repeat, args.warmup)
            label = f"{name}_{attn}" if name.startswith(("unet", "nti")) else name
            rows.append({"stage": label, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "peak_gib": peak_gib(dev)})
            print(f"{label:<20} {statistics.median(times):>9.4f} s  ({min(times):.4f} – {max(times):.4f})  peak {peak_gib(dev):.2f} GiB", flush=True)
    return rows


def full(args, pipe):
    """A whole null-text inversion (T = 50, N inner steps) and one edit-sized sampling."""
    dtype, dev = pipe.dtype, pipe.dev
    ac, timesteps, ratio = alphas()
    g = torch.Generator().manual_seed(2)
    img = (torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1).to(dev, dtype)
    set_attention(pipe.unet, "sdpa")
    sync(dev)
    reset_peak(dev)
    start = time.perf_counter()
    with torch.no_grad():
        z0 = pipe.encode_image(img)
        cond, cond_pooled = pipe.encode(["a close up photo of a cat"])
        uncond, uncond_pooled = pipe.negative()
        cond, cond_pooled, uncond, uncond_pooled = (cast(x, torch.float32) for x in (cond, cond_pooled, uncond, uncond_pooled))
        lat = [z0]
        z = z0
        for i in range(50):
            t = timesteps[49 - i]
            eps = pipe.eps(z.to(dtype), t, cond.to(dtype), cast(cond_pooled, dtype)).float()
            z = ddim_next(eps, t, z, ac, ratio)
            lat.append(z)
    sync(dev)
    t_ddim = time.perf_counter() - start
    z = lat[-1]
    iters = 0
    for i, t in enumerate(timesteps):
        u, u_pooled = (None if x is None else x.detach().clone().requires_grad_(True) for x in (uncond, uncond_pooled))
        opt = torch.optim.Adam([x for x in (u, u_pooled) if x is not None], lr=1e-2 * (1.0 - i / 100.0))
        with torch.no_grad():
            eps_c = pipe.eps(z.to(dtype), t, cond.to(dtype), cast(cond_pooled, dtype)).float()
        for j in range(args.inner_steps):
            eps_u = pipe.eps(z.to(dtype), t, u.to(dtype), cast(u_pooled, dtype)).float()
            noise = eps_u + 7.5 * (eps_c - eps_u)
            loss = F.mse_loss(ddim_step(noise, t, z, ac, ratio), lat[49 - i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            iters += 1
            if not args.no_early_stop and loss.item() < 1e-5 + i * 2e-5:
                break
        uncond, uncond_pooled = u.detach(), None if u_pooled is None else u_pooled.detach()
        with torch.no_grad():
            e = pipe.eps(torch.cat([z, z]).to(dtype), t, torch.cat([uncond, cond]).to(dtype), cast(cat([uncond_pooled, cond_pooled]), dtype)).float()
            eu, ec = e.chunk(2)
            z = ddim_step(eu + 7.5 * (ec - eu), t, z, ac, ratio)
    sync(dev)
    total = time.perf_counter() - start
    inv_peak = peak_gib(dev)
    # An edit: source + one target, classic attention (the probabilities are materialized,
    # as a Prompt-to-Prompt controller needs), batch 4 per step.
    set_attention(pipe.unet, "classic")
    reset_peak(dev)
    start = time.perf_counter()
    with torch.no_grad():
        emb, emb_pooled = pipe.encode(["a close up photo of a cat", "a close up photo of a dog"])
        ctx = torch.cat([uncond.to(dtype).expand(2, -1, -1), emb])
        pooled = None if emb_pooled is None else torch.cat([uncond_pooled.to(dtype).expand(2, -1), emb_pooled])
        zz = torch.cat([lat[-1], lat[-1]]).to(dtype)
        for i, t in enumerate(timesteps):
            e = pipe.eps(torch.cat([zz, zz]), t, ctx, pooled).float()
            eu, ec = e.chunk(2)
            zz = ddim_step(eu + 7.5 * (ec - eu), t, zz.float(), ac, ratio).to(dtype)
        pipe.decode(zz)
    sync(dev)
    edit = time.perf_counter() - start
    res = {"inversion_s": total, "ddim_inversion_s": t_ddim, "iterations": iters, "inversion_peak_gib": inv_peak, "edit_s": edit, "edit_peak_gib": peak_gib(dev)}
    print(json.dumps(res), flush=True)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--stages", default="text_encoder,unet_b1,unet_b2,nti_iter,vae_encode,vae_decode")
    p.add_argument("--attention", default="sdpa,classic")
    p.add_argument("--full", action="store_true", help="time a whole inversion and an edit")
    p.add_argument("--inner-steps", type=int, default=10)
    p.add_argument("--no-early-stop", action="store_true")
    p.add_argument("--skip-stages", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = Pipe(args)
    family = "SDXL" if pipe.sdxl else "SD"
    print(f"torch {torch.__version__}, {family}, {args.device}, {args.dtype}, {args.size}px, threads {torch.get_num_threads()}", flush=True)
    out = {}
    if not args.skip_stages:
        out["stages"] = stages(args, pipe)
    if args.full:
        out["full"] = full(args, pipe)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
