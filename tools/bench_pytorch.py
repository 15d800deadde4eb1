#!/usr/bin/env python3
"""Times PyTorch + diffusers on the same stages as `nulltext bench`, and (with --full) a
whole null-text inversion and a Prompt-to-Prompt-sized edit, on the same weights.

A benchmark, not a test: nulltext never needs Python. Typical use:

    nulltext random-model --preset sd15 --out /tmp/sd15-random
    python3 tools/bench_pytorch.py --model /tmp/sd15-random --size 512 --threads 2
    python3 tools/bench_pytorch.py --model /tmp/sd15-random --device cuda --dtype fp16 --full

Needs torch, diffusers and transformers. The algorithm is the reference's
(null_text_w_ptp.ipynb): DDIM inversion with w = 1, then per step a fresh Adam on the
unconditional embedding, lr 1e-2·(1 − i/100), N inner iterations (no early stop with
--no-early-stop), loss = MSE of the guided DDIM step to the pivot.
"""
import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F


def load(args):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    dev = torch.device(args.device)
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", torch_dtype=dtype).to(dev).eval()
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", torch_dtype=dtype).to(dev).eval()
    text = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder", torch_dtype=dtype).to(dev).eval()
    tok = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    for m in (unet, vae, text):
        m.requires_grad_(False)
    return unet, vae, text, tok, dtype, dev


def set_attention(unet, kind):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(dev):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


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


def embed(text, tok, prompts, dev):
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(dev)
    with torch.no_grad():
        return text(ids)[0]


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


def stages(args, unet, vae, text, tok, dtype, dev):
    h = args.size // 8
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, h, h, generator=g).to(dev, dtype)
    z2 = torch.cat([z, z])
    ctx = embed(text, tok, ["a close up photo of a cat", ""], dev)
    cond, uncond = ctx[:1], ctx[1:]
    img = (torch.randn(1, 3, args.size, args.size, generator=g) * 0.5).clamp(-1, 1).to(dev, dtype)
    target = torch.randn(1, 4, h, h, generator=g).to(dev, torch.float32)
    ac, timesteps, ratio = alphas()
    t = timesteps[10]
    with torch.no_grad():
        eps_c = unet(z, t, encoder_hidden_states=cond).sample.float()

    def nti_iter():
        u = uncond.detach().float().clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=1e-2)
        eps_u = unet(z, t, encoder_hidden_states=u.to(dtype)).sample.float()
        noise = eps_u + 7.5 * (eps_c - eps_u)
        loss = F.mse_loss(ddim_step(noise, t, z.float(), ac, ratio), target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    plan = {
        "text_encoder": lambda: embed(text, tok, ["a close up photo of a cat"], dev),
        "unet_b1": lambda: unet(z, t, encoder_hidden_states=cond).sample,
        "unet_b2": lambda: unet(z2, t, encoder_hidden_states=ctx).sample,
        "nti_iter": nti_iter,
        "vae_encode": lambda: vae.encode(img).latent_dist.mean,
        "vae_decode": lambda: vae.decode(z / 0.18215).sample,
    }
    rows = []
    for attn in args.attention.split(","):
        set_attention(unet, attn)
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


def full(args, unet, vae, text, tok, dtype, dev):
    """A whole null-text inversion (T = 50, N inner steps) and one edit-sized sampling."""
    h = args.size // 8
    ac, timesteps, ratio = alphas()
    g = torch.Generator().manual_seed(2)
    img = (torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1).to(dev, dtype)
    set_attention(unet, "sdpa")
    sync(dev)
    reset_peak(dev)
    start = time.perf_counter()
    with torch.no_grad():
        z0 = vae.encode(img).latent_dist.mean.float() * 0.18215
        ctx = embed(text, tok, ["a close up photo of a cat", ""], dev).float()
        cond, uncond = ctx[:1], ctx[1:]
        lat = [z0]
        z = z0
        for i in range(50):
            t = timesteps[49 - i]
            eps = unet(z.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample.float()
            z = ddim_next(eps, t, z, ac, ratio)
            lat.append(z)
    sync(dev)
    t_ddim = time.perf_counter() - start
    z = lat[-1]
    iters = 0
    for i, t in enumerate(timesteps):
        u = uncond.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=1e-2 * (1.0 - i / 100.0))
        with torch.no_grad():
            eps_c = unet(z.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample.float()
        for j in range(args.inner_steps):
            eps_u = unet(z.to(dtype), t, encoder_hidden_states=u.to(dtype)).sample.float()
            noise = eps_u + 7.5 * (eps_c - eps_u)
            loss = F.mse_loss(ddim_step(noise, t, z, ac, ratio), lat[49 - i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            iters += 1
            if not args.no_early_stop and loss.item() < 1e-5 + i * 2e-5:
                break
        uncond = u.detach()
        with torch.no_grad():
            e = unet(torch.cat([z, z]).to(dtype), t, encoder_hidden_states=torch.cat([uncond, cond]).to(dtype)).sample.float()
            eu, ec = e.chunk(2)
            z = ddim_step(eu + 7.5 * (ec - eu), t, z, ac, ratio)
    sync(dev)
    total = time.perf_counter() - start
    inv_peak = peak_gib(dev)
    # An edit: source + one target, classic attention (the probabilities are materialized,
    # as a Prompt-to-Prompt controller needs), batch 4 per step.
    set_attention(unet, "classic")
    reset_peak(dev)
    start = time.perf_counter()
    with torch.no_grad():
        emb = embed(text, tok, ["a close up photo of a cat", "a close up photo of a dog"], dev)
        zz = torch.cat([lat[-1], lat[-1]]).to(dtype)
        for i, t in enumerate(timesteps):
            e = unet(torch.cat([zz, zz]), t, encoder_hidden_states=torch.cat([uncond.to(dtype).expand(2, -1, -1), emb])).sample.float()
            eu, ec = e.chunk(2)
            zz = ddim_step(eu + 7.5 * (ec - eu), t, zz.float(), ac, ratio).to(dtype)
        vae.decode(zz / 0.18215)
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
    unet, vae, text, tok, dtype, dev = load(args)
    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, {args.size}px, threads {torch.get_num_threads()}", flush=True)
    out = {}
    if not args.skip_stages:
        out["stages"] = stages(args, unet, vae, text, tok, dtype, dev)
    if args.full:
        out["full"] = full(args, unet, vae, text, tok, dtype, dev)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
