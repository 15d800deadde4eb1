"""Goldens for null-text inversion and Prompt-to-Prompt on the tiny SDXL fixture.

What it computes: the null-text pipeline of the official notebook (google/prompt-to-prompt
`null_text_w_ptp.ipynb`: `NullInversion.ddim_loop`, `null_optimization`,
`text2image_ldm_stable`, `AttentionReplace` from `make_controller`), written out here for
diffusers' `StableDiffusionXLPipeline` on tests/fixtures/models/tiny-sdxl (made by
tools/sdxl_reference.py), with the fixture photo tests/fixtures/inputs/chelsea256.png
(256x256, the model's native size: 32x32 latents). Nothing of the notebook is imported: it
targets SD 1.x, and the SDXL UNet needs two more inputs (a pooled text embedding and the
size/crop `time_ids`), so the loops are restated below with those inputs added.

Conventions (what nulltext follows for SDXL):
  - Scheduler: diffusers `DDIMScheduler` with the model's betas (scaled_linear,
    0.00085-0.012, 1000 training steps; checked equal to the model's own scheduler),
    clip_sample False, set_alpha_to_one False (alpha-bar past t = 0 is alpha-bar[0]),
    steps_offset 1, "leading" spacing, epsilon prediction, eta 0: 50 steps,
    t = 981, 961, ..., 1 (the null-text notebook's DDIM; ../spec/algorithm.md section 1).
  - Image -> latent: x = p / 127.5 - 1 (fp32, NCHW, as the notebook and nulltext convert
    pixels; tools/sdxl_reference.py's sdxl_vae golden used p / 255 * 2 - 1, which can differ
    by one ulp), z0 = VAE encoder mean x 0.13025 (the VAE's `scaling_factor`), fp32
    throughout (the VAE's `force_upcast` only matters in fp16).
  - Text: `pipe.encode_prompt(prompt)` (prompt_2 = prompt): the penultimate hidden state of
    each encoder, concatenated to [1, 77, 8 + 16 = 24], and the pooled embedding [1, 12]
    (text_encoder_2's projected output at the end token).
  - time_ids = (original H, W, crop top, left, target H, W) = (256, 256, 0, 0, 256, 256),
    `pipe._get_add_time_ids`'s default for a 256x256 image; the same for every batch row.
  - The UNet is called as `unet(z, t, encoder_hidden_states=context,
    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})`.
  - The unconditional input is the pair (context, pooled); it starts as ZEROS [1, 77, 24]
    and [1, 12] (SDXL base's `force_zeros_for_empty_prompt`), not as the embedding of "".
  - DDIM inversion (`ddim_loop` / `next_step`): guidance 1, source prompt only (its context,
    pooled embedding and time_ids); for i = 0..49, t = timesteps[49 - i] (1, 21, ..., 981):
    eps = eps(z, t, C); the current alpha-bar is that of min(t - 20, 999) (alpha-bar[0] for
    t - 20 < 0), the next that of t; z <- sqrt(a_next) x0 + sqrt(1 - a_next) eps with
    x0 = (z - sqrt(1 - a_cur) eps) / sqrt(a_cur). Pivots z*_0 .. z*_50.
  - Null-text optimization (`null_optimization`): z_bar <- z*_50; for step i = 0..49,
    t = timesteps[i]: eps_c = eps(z_bar, t, C) once without gradient; the null context AND
    the null pooled embedding, initialized from step i - 1's optimized values (zeros at
    i = 0), are the two leaves of ONE `torch.optim.Adam` (betas 0.9, 0.999, eps 1e-8, no
    weight decay, lr = 1e-2 (1 - i / 100), fresh state every step); up to 10 iterations of:
    eps_u = eps(z_bar, t, null); loss = mean((DDIM step of eps_u + 7.5 (eps_c - eps_u) from
    z_bar) - z*_{49 - i})^2); zero_grad; backward; Adam step; then stop early if that loss
    (computed before the update) < 1e-5 + i * 2e-5. Every step applies at least one update.
    Then z_bar <- the guided DDIM step with the optimized null (one batch-2 UNet call,
    rows [null, C], as the notebook's `get_noise_pred`). All 50 x 10 iterations are run.
  - Reconstruction (`text2image_ldm_stable` with the optimized nulls): from z*_50, at step i
    one batch-2 UNet call with rows [null_i, C], guidance 7.5, `DDIMScheduler.step`.
  - Prompt-to-Prompt: prompts [source, target] = ["a close up photo of a cat",
    "a close up photo of a dog"], `AttentionReplace` (word swap) with cross_replace_steps
    {"default_": 0.8} and self_replace_steps 0.4, no local blend. From z*_50 (both rows),
    each step is one UNet call on the batch [null_i, null_i, C_src, C_tgt] (the notebook's
    layout with LOW_RESOURCE False: unconditional half first), pooled
    [null_pooled_i, null_pooled_i, pooled_src, pooled_tgt], time_ids for every row; guidance
    7.5, `DDIMScheduler.step` on both rows. Row 0 is the source with its own nulls.
    Edit rules (the notebook's `AttentionControlEdit.forward`), on the conditional half only
    (attention probabilities reshaped to [2 prompts, heads, queries, keys]):
      * cross-attention: A_tgt <- alpha_i * (A_src . mapper) + (1 - alpha_i) * A_tgt, with
        alpha = `get_time_words_attention_alpha` ([51, 1, 1, 1, 77]; rows
        0 .. int(0.8 * 51) - 1 = 39 are 1) and mapper = `get_replacement_mapper` (cat and
        dog are one token each: the identity), at every cross-attention layer;
      * self-attention: A_tgt <- A_src for steps int(0 * 50) <= i < int(0.4 * 50) = 20, in
        layers with at most (latent / 2)^2 = 16^2 = 256 query positions (spec section 4's
        rule; the notebook's literal `att_replace.shape[2] <= 32 ** 2` = 1024 selects exactly
        the same layers here, since this UNet attends only at 16x16 and 8x8).
    Word -> token indices and the mapper come from the first tokenizer; the second one
    (padding "!") gives the same positions for these prompts (checked).

How the layers are hooked (the notebook's `register_attention_control`, adapted): every
`Attention` module of the UNet is a `transformer_blocks.k.attn1` (self) or `.attn2` (cross)
of a `Transformer2DModel`; each gets, through `unet.set_attn_processor`, a processor that
computes exactly diffusers' `AttnProcessor` (to_q/to_k/to_v, `head_to_batch_dim`,
`get_attention_scores` = softmax(scale q k^T), probabilities x v, `batch_to_head_dim`,
to_out) and edits the probabilities between the softmax and the product with v. A layer is
"cross" when it is called with encoder_hidden_states (attn2), "self" otherwise (attn1); its
place is the UNet child it lives in (down_blocks -> "down", mid_block -> "mid",
up_blocks -> "up"). The step index is set by the sampling loop before each UNet call
(equivalent to the notebook's count of layer calls). On this model that is 34 layers, called
in this order in every UNet evaluation (the `layers` metadata lists them with their query
positions): down_blocks.1 (16x16: attentions.0, .1, one block each), down_blocks.2 (8x8:
attentions.0, .1, two blocks each), mid_block (8x8: two blocks), up_blocks.0 (8x8:
attentions.0, .1, .2, two blocks each), up_blocks.1 (16x16: attentions.0, .1, .2, one block
each); in each block attn1 then attn2. Self-attention is replaced in all 17 attn1 layers
(during steps 0-19), cross-attention in all 17 attn2 layers. Inversion and reconstruction
run with diffusers' default processors; the script checks that the editing processor with
no edit reproduces the default UNet output (to ~1e-6).

Outputs (fp32 unless stated; metadata: the settings as strings):
  tests/fixtures/golden/sdxl_nti.safetensors
    image_latent [1, 4, 32, 32], cond_context [1, 77, 24], cond_pooled [1, 12],
    time_ids [1, 6], timesteps [50] (i64), pivots [51, 4, 32, 32] (z*_0 .. z*_50),
    null_context [50, 77, 24], null_pooled [50, 12] (the optimized null of each step),
    losses [50, 10] (f64, the loss before each update; NaN for iterations not run),
    iterations [50] (i64), thresholds [50] (f64), nti_latents [51, 4, 32, 32] (z_bar
    before step 0 .. after step 49; row k is the latent after k steps),
    grad0_context [1, 77, 24], grad0_pooled [1, 12] (d loss / d null at step 0,
    iteration 0, from the zero init), recon_latent [1, 4, 32, 32].
  tests/fixtures/golden/sdxl_nti_eps0.001.safetensors
    the same optimization with early-stop epsilon 1e-3, first 10 steps only (steps 0-4
    stop after one update there, 5-9 run all 10): null_context [10, 77, 24],
    null_pooled [10, 12], losses [10, 10], iterations [10], thresholds [10],
    nti_latents [11, 4, 32, 32]; the metadata gives the smallest relative gap between a
    loss and its threshold.
  tests/fixtures/golden/sdxl_p2p_replace.safetensors
    edit_latents [2, 4, 32, 32] (row 0 source, row 1 "dog"), edit_step_latents
    [3, 2, 4, 32, 32] (after steps 1, 20 and 40: one step, the end of the self-attention
    window, the end of the cross-attention window), edit_token_ids [2, 77] (i64, first
    tokenizer), edit_token_ids_2 [2, 77] (i64, second tokenizer), edit_context [2, 77, 24],
    edit_pooled [2, 12], replace_mapper [1, 77, 77], cross_replace_alpha [51, 1, 1, 1, 77].

Results of the committed run (the script prints them):
  - Early stopping never fires at epsilon 1e-5: all 50 x 10 iterations run. The loss grows
    along the trajectory (step 0: 3.9e-5 -> 2.9e-5 after 10 updates; step 49: 5.2369e-2 ->
    5.2367e-2): on this random model the null input moves eps very little (the gradient at
    step 0 has norm 4.4e-6 for the context, 2.3e-6 for the pooled embedding), so the
    optimization is a strict test of the optimizer, not of reconstruction quality.
  - recon_latent equals nti_latents[50] exactly; its MSE to image_latent is 0.05237.
  - Row 0 of the edit differs from recon_latent by at most 4.2e-5 (batch 4 against 2,
    explicit attention against diffusers' SDPA); the edited row's MSE to row 0 is 0.0138.
  - The editing processor with no edit reproduces the default UNet output to 2.7e-7.
  - epsilon 1e-3: iterations 1, 1, 1, 1, 1, 10, 10, 10, 10, 10; no loss comes closer than
    5.3% (relative) to its threshold.
  - About 2 minutes on one CPU thread (the 500 null-text iterations: 75-105 s).

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch diffusers transformers \
        safetensors numpy pillow
    OMP_NUM_THREADS=1 /tmp/venv/bin/python tools/sdxl_pipeline_reference.py

Made with PyTorch 2.15.0, diffusers 0.42.1, transformers 5.24.0, one CPU thread, fp32; two
runs give byte-identical files.
"""
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "tests", "fixtures", "models", "tiny-sdxl")
PHOTO = os.path.join(ROOT, "tests", "fixtures", "inputs", "chelsea256.png")
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "golden")
SOURCE = "a close up photo of a cat"
TARGET = "a close up photo of a dog"
SIZE = 256
STEPS = 50
GUIDANCE = 7.5
INNER_STEPS = 10
EARLY_STOP = 1e-5
NTI_STEPS = STEPS  # all 50 steps of the optimization are run
EARLY_STOP_HI = 1e-3  # a second, short run where early stopping fires
HI_STEPS = 10
CROSS_REPLACE = 0.8
SELF_REPLACE = 0.4
LATENT = SIZE // 8
SELF_REPLACE_MAX_QUERIES = (LATENT // 2) ** 2  # 256; the notebook's 32 ** 2 picks the same
EDIT_SNAPSHOTS = [1, 20, 40]
MAX_WORDS = 77


def load():
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL, dtype=torch.float32)
    ddim = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    assert torch.equal(ddim.betas, pipe.scheduler.betas), "betas differ from the model's"
    ddim.set_timesteps(STEPS)
    pipe.scheduler = ddim
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.eval().requires_grad_(False)
    return pipe


def image_latent(pipe):
    pixels = np.array(Image.open(PHOTO).convert("RGB"))
    assert pixels.shape == (SIZE, SIZE, 3)
    x = torch.from_numpy(pixels).float() / 127.5 - 1
    x = x.permute(2, 0, 1).unsqueeze(0)
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def encode(pipe, prompt):
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return embeds, pooled


def time_ids(pipe):
    return pipe._get_add_time_ids(
        (SIZE, SIZE), (0, 0), (SIZE, SIZE), dtype=torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)


def eps(pipe, z, t, context, pooled, tids):
    cond = {"text_embeds": pooled, "time_ids": tids.expand(z.shape[0], -1)}
    return pipe.unet(z, t, encoder_hidden_states=context, added_cond_kwargs=cond).sample


def alpha_bar(s, t):
    return s.alphas_cumprod[t] if t >= 0 else s.final_alpha_cumprod


def prev_step(s, noise, t, z):
    """The notebook's `NullInversion.prev_step`: deterministic DDIM from t to t - 20."""
    a_t = alpha_bar(s, t)
    a_prev = alpha_bar(s, t - s.config.num_train_timesteps // s.num_inference_steps)
    x0 = (z - (1 - a_t) ** 0.5 * noise) / a_t ** 0.5
    return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * noise


def next_step(s, noise, t, z):
    """The notebook's `NullInversion.next_step`: DDIM inversion from t - 20 to t."""
    cur = min(t - s.config.num_train_timesteps // s.num_inference_steps, 999)
    a_cur, a_next = alpha_bar(s, cur), s.alphas_cumprod[t]
    x0 = (z - (1 - a_cur) ** 0.5 * noise) / a_cur ** 0.5
    return a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * noise


@torch.no_grad()
def ddim_inversion(pipe, z0, context, pooled, tids):
    s = pipe.scheduler
    z, out = z0.clone(), [z0]
    for i in range(STEPS):
        t = s.timesteps[len(s.timesteps) - i - 1]
        z = next_step(s, eps(pipe, z, t, context, pooled, tids), t, z)
        out.append(z)
    return out


def null_optimization(pipe, pivots, context, pooled, tids, epsilon, n_steps):
    s = pipe.scheduler
    null_ctx = torch.zeros_like(context)
    null_pool = torch.zeros_like(pooled)
    z = pivots[-1]
    res = {
        "null_context": [], "null_pooled": [], "nti_latents": [z],
        "losses": torch.full((n_steps, INNER_STEPS), float("nan"), dtype=torch.float64),
        "iterations": torch.zeros(n_steps, dtype=torch.int64),
        "thresholds": torch.tensor([epsilon + i * 2e-5 for i in range(n_steps)],
                                   dtype=torch.float64),
    }
    started = time.time()
    for i in range(n_steps):
        null_ctx = null_ctx.clone().detach().requires_grad_(True)
        null_pool = null_pool.clone().detach().requires_grad_(True)
        opt = torch.optim.Adam([null_ctx, null_pool], lr=1e-2 * (1.0 - i / 100.0))
        target = pivots[len(pivots) - i - 2]
        t = s.timesteps[i]
        with torch.no_grad():
            eps_c = eps(pipe, z, t, context, pooled, tids)
        for j in range(INNER_STEPS):
            eps_u = eps(pipe, z, t, null_ctx, null_pool, tids)
            guided = eps_u + GUIDANCE * (eps_c - eps_u)
            loss = F.mse_loss(prev_step(s, guided, t, z), target)
            opt.zero_grad()
            loss.backward()
            if i == 0 and j == 0:
                res["grad0_context"] = null_ctx.grad.clone()
                res["grad0_pooled"] = null_pool.grad.clone()
            opt.step()
            value = loss.item()
            res["losses"][i, j] = value
            res["iterations"][i] = j + 1
            if value < epsilon + i * 2e-5:
                break
        res["null_context"].append(null_ctx.detach().clone())
        res["null_pooled"].append(null_pool.detach().clone())
        with torch.no_grad():
            noise = eps(pipe, torch.cat([z] * 2), t, torch.cat([null_ctx, context]),
                        torch.cat([null_pool, pooled]), tids)
            u, c = noise.chunk(2)
            z = prev_step(s, u + GUIDANCE * (c - u), t, z)
        res["nti_latents"].append(z)
        if i == 0:
            print(f"null-text step 0: {time.time() - started:.1f} s "
                  f"({res['iterations'][0]} iterations)", flush=True)
    res["seconds"] = time.time() - started
    for k in ("null_context", "null_pooled", "nti_latents"):
        res[k] = torch.cat(res[k])
    return res


@torch.no_grad()
def sample(pipe, z_T, contexts, pooleds, null_ctx, null_pool, tids, snapshots=(), hook=None):
    """The notebook's `text2image_ldm_stable` + `diffusion_step` (LOW_RESOURCE False)."""
    s = pipe.scheduler
    b = contexts.shape[0]
    z = z_T.expand(b, *z_T.shape[1:])
    snaps = []
    for i, t in enumerate(s.timesteps):
        if hook is not None:
            hook.step = i
        ctx = torch.cat([null_ctx[i:i + 1].expand(b, -1, -1), contexts])
        pool = torch.cat([null_pool[i:i + 1].expand(b, -1), pooleds])
        noise = eps(pipe, torch.cat([z] * 2), t, ctx, pool, tids)
        u, c = noise.chunk(2)
        z = s.step(u + GUIDANCE * (c - u), t, z).prev_sample
        if i + 1 in snapshots:
            snaps.append(z)
    return z, snaps


def save(tensors, name, metadata):
    """`save_file`, then the header rewritten with sorted keys: the safetensors writer keeps
    metadata in a hash map, whose order changes from run to run."""
    path = os.path.join(GOLDEN, name)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path,
              metadata=metadata)
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":"))
    header = header.encode() + b" " * (-len(header.encode()) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + raw[8 + n:])


# ---- Prompt-to-Prompt ---------------------------------------------------------------------

def word_inds(tokenizer, prompt, place):
    """Token positions (1-based, after the start token) of the word at index `place` of
    `prompt.split(" ")`: the notebook's `get_word_inds` for an integer place."""
    words = prompt.split(" ")
    pieces = [tokenizer.decode([tok]).strip("#") for tok in tokenizer.encode(prompt)][1:-1]
    out, cur, acc = [], 0, 0
    for pos, piece in enumerate(pieces):
        acc += len(piece)
        if cur == place:
            out.append(pos + 1)
        if acc >= len(words[cur]):
            cur, acc = cur + 1, 0
    return out


def replacement_mapper(tokenizer, src, tgt):
    """`seq_aligner.get_replacement_mapper` for one prompt pair of equal word count: a swapped
    word of as many tokens as its replacement maps token k to token k, else each of its
    tokens to every replacement token with weight 1 / (replacement tokens); every other
    token maps source i -> target j (nulltext's corrected form, ../spec/algorithm.md
    section 5; the reference's `mapper[j, j]` differs only when a swap changes the token
    count, which this pair does not)."""
    ws, wt = src.split(" "), tgt.split(" ")
    assert len(ws) == len(wt)
    swapped = [k for k in range(len(wt)) if ws[k] != wt[k]]
    src_inds = [word_inds(tokenizer, src, k) for k in swapped]
    tgt_inds = [word_inds(tokenizer, tgt, k) for k in swapped]
    mapper = torch.zeros(MAX_WORDS, MAX_WORDS)
    i = j = k = 0
    while i < MAX_WORDS and j < MAX_WORDS:
        if k < len(src_inds) and src_inds[k][0] == i:
            si, ti = src_inds[k], tgt_inds[k]
            if len(si) == len(ti):
                for a, b in zip(si, ti):
                    mapper[a, b] = 1.0
            else:
                for b in ti:
                    for a in si:
                        mapper[a, b] = 1.0 / len(ti)
            i, j, k = i + len(si), j + len(ti), k + 1
        else:
            mapper[i, j] = 1.0
            i, j = i + 1, j + 1
    return mapper[None]


def cross_alpha(n_targets, fraction):
    """`get_time_words_attention_alpha` with only a "default_" fraction: [T+1, n, 1, 1, 77]."""
    alpha = torch.zeros(STEPS + 1, n_targets, MAX_WORDS)
    alpha[: int(fraction * (STEPS + 1))] = 1.0
    return alpha.reshape(STEPS + 1, n_targets, 1, 1, MAX_WORDS)


class Replace:
    """`AttentionReplace` without local blend, with the step set from outside."""

    def __init__(self, prompts, mapper, alpha, self_window):
        self.batch = len(prompts)
        self.mapper, self.alpha, self.self_window = mapper, alpha, self_window
        self.step = 0
        self.enabled = True
        self.calls = []

    def edit(self, probs, is_cross, queries):
        heads = probs.shape[0] // self.batch
        a = probs.reshape(self.batch, heads, *probs.shape[1:])
        src, tgt = a[0], a[1:]
        if is_cross:
            w = self.alpha[self.step]
            mapped = torch.einsum("hpw,bwn->bhpn", src, self.mapper)
            a[1:] = mapped * w + (1 - w) * tgt
        elif queries <= SELF_REPLACE_MAX_QUERIES:
            a[1:] = src.unsqueeze(0).expand(tgt.shape[0], *src.shape)
        return a.reshape(self.batch * heads, *a.shape[2:])

    def __call__(self, probs, is_cross, name):
        self.calls.append(name)
        if not self.enabled:
            return probs
        lo, hi = self.self_window
        if not (is_cross or lo <= self.step < hi):
            return probs
        half = probs.shape[0] // 2  # the conditional half of [uncond rows, cond rows]
        probs[half:] = self.edit(probs[half:], is_cross, probs.shape[1])
        return probs


class EditingProcessor:
    """diffusers' `AttnProcessor` with the probabilities handed to the controller."""

    def __init__(self, control, name):
        self.control, self.name = control, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs):
        assert attention_mask is None and hidden_states.ndim == 3
        assert attn.spatial_norm is None and attn.group_norm is None and not attn.norm_cross
        assert not attn.residual_connection and attn.rescale_output_factor == 1.0
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)
        probs = self.control(probs, is_cross, self.name)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def layer_table(unet):
    """(name, place, kind, query positions, heads) of every attention layer, in call order."""
    rows, order = {}, []

    def record(name):
        def fn(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            order.append(name)
            place = name.split(".")[0].replace("_blocks", "").replace("_block", "")
            kind = "self" if name.endswith("attn1") else "cross"
            rows[name] = {"name": name, "place": place, "kind": kind,
                          "queries": int(x.shape[1]), "heads": module.heads}
        return fn

    hooks = [m.register_forward_pre_hook(record(n), with_kwargs=True)
             for n, m in unet.named_modules() if type(m).__name__ == "Attention"]
    return rows, order, hooks


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    pipe = load()
    s = pipe.scheduler
    tids = time_ids(pipe)
    assert tids.tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]]

    with torch.no_grad():
        z0 = image_latent(pipe)
        context, pooled = encode(pipe, SOURCE)
        tgt_context, tgt_pooled = encode(pipe, TARGET)
    pivots = ddim_inversion(pipe, z0, context, pooled, tids)
    print("DDIM inversion done", flush=True)
    nti = null_optimization(pipe, pivots, context, pooled, tids, EARLY_STOP, NTI_STEPS)
    print(f"null-text optimization: {nti['seconds']:.0f} s", flush=True)
    recon, _ = sample(pipe, pivots[-1], context, pooled, nti["null_context"],
                      nti["null_pooled"], tids)
    hi = null_optimization(pipe, pivots, context, pooled, tids, EARLY_STOP_HI, HI_STEPS)
    ran = ~torch.isnan(hi["losses"])
    hi_margin = float(((hi["losses"] - hi["thresholds"][:, None]).abs()
                       / hi["thresholds"][:, None])[ran].min())

    # ---- the edit
    prompts = [SOURCE, TARGET]
    tok1, tok2 = pipe.tokenizer, pipe.tokenizer_2
    for prompt in prompts:
        for place in range(len(prompt.split(" "))):
            assert word_inds(tok1, prompt, place) == word_inds(tok2, prompt, place)
    mapper = replacement_mapper(tok1, SOURCE, TARGET)
    alpha = cross_alpha(1, CROSS_REPLACE)
    self_window = (int(STEPS * 0.0), int(STEPS * SELF_REPLACE))
    control = Replace(prompts, mapper, alpha, self_window)

    rows, order, hooks = layer_table(pipe.unet)
    default_procs = pipe.unet.attn_processors
    with torch.no_grad():
        zz = torch.cat([pivots[-1]] * 4)
        ctx4 = torch.cat([nti["null_context"][:1]] * 2 + [context, tgt_context])
        pool4 = torch.cat([nti["null_pooled"][:1]] * 2 + [pooled, tgt_pooled])
        t0 = s.timesteps[0]
        plain = eps(pipe, zz, t0, ctx4, pool4, tids)
    for h in hooks:
        h.remove()
    layers = [rows[n] for n in order]
    for row in layers:
        row["self_replaced"] = (row["kind"] == "self"
                                and row["queries"] <= SELF_REPLACE_MAX_QUERIES)
        assert (row["kind"] == "self" and row["queries"] <= 32 ** 2) == row["self_replaced"]
    pipe.unet.set_attn_processor(
        {k: EditingProcessor(control, k[: -len(".processor")]) for k in default_procs})
    control.enabled = False
    with torch.no_grad():
        hooked = eps(pipe, zz, t0, ctx4, pool4, tids)
    control.enabled = True
    hook_err = float((hooked - plain).abs().max())
    assert hook_err < 1e-5, hook_err
    assert control.calls == order, "processors are called in module order"

    edit, snaps = sample(pipe, pivots[-1], torch.cat([context, tgt_context]),
                         torch.cat([pooled, tgt_pooled]), nti["null_context"],
                         nti["null_pooled"], tids, snapshots=EDIT_SNAPSHOTS, hook=control)
    pipe.unet.set_attn_processor(default_procs)

    ids1 = tok1(prompts, padding="max_length", max_length=77, truncation=True,
                return_tensors="pt").input_ids.to(torch.int64)
    ids2 = tok2(prompts, padding="max_length", max_length=77, truncation=True,
                return_tensors="pt").input_ids.to(torch.int64)

    # ---- report
    mse = lambda a, b: float(((a - b) ** 2).mean())
    last = nti["losses"][NTI_STEPS - 1]
    early = [i for i in range(NTI_STEPS) if nti["iterations"][i] < INNER_STEPS]
    results = {
        "recon_mse_vs_image_latent": mse(recon, z0),
        "recon_vs_nti_latent_max_abs": float((recon - nti["nti_latents"][-1:]).abs().max()),
        "final_step_losses": [float(x) for x in last[~torch.isnan(last)]],
        "early_stopped_steps": early,
        "total_iterations": int(nti["iterations"].sum()),
        "edit_row0_vs_recon_max_abs": float((edit[:1] - recon).abs().max()),
        "edit_row1_vs_row0_mse": mse(edit[1:], edit[:1]),
        "hooked_vs_default_unet_max_abs": hook_err,
        "eps1e-3_iterations": hi["iterations"].tolist(),
        "eps1e-3_min_relative_gap_loss_to_threshold": hi_margin,
        "nti_seconds": round(nti["seconds"], 1),
    }
    print(json.dumps(results, indent=1))

    settings = {
        "prompt": SOURCE,
        "size": str(SIZE),
        "steps": str(STEPS),
        "guidance": str(GUIDANCE),
        "scheduler": "DDIM scaled_linear 0.00085-0.012, 1000 train steps, clip_sample False, "
                     "set_alpha_to_one False, steps_offset 1, leading, epsilon, eta 0",
        "image": "p / 127.5 - 1 -> VAE encoder mean x 0.13025",
        "time_ids": json.dumps(tids[0].tolist()),
        "null_init": "zeros (context [1, 77, 24], pooled [1, 12])",
        "optimizer": "one Adam over (null_context, null_pooled), lr 1e-2 (1 - i / 100), "
                     "betas (0.9, 0.999), eps 1e-8",
        "inner_steps": str(INNER_STEPS),
        "early_stop_epsilon": str(EARLY_STOP),
        "early_stop_rule": "after the update: stop if loss < epsilon + i * 2e-5",
        "nti_steps_run": str(NTI_STEPS),
    }
    os.makedirs(GOLDEN, exist_ok=True)
    nti_out = {
        "image_latent": z0, "cond_context": context, "cond_pooled": pooled,
        "time_ids": tids, "timesteps": s.timesteps.to(torch.int64),
        "pivots": torch.cat(pivots), "null_context": nti["null_context"],
        "null_pooled": nti["null_pooled"], "losses": nti["losses"],
        "iterations": nti["iterations"], "thresholds": nti["thresholds"],
        "nti_latents": nti["nti_latents"], "grad0_context": nti["grad0_context"],
        "grad0_pooled": nti["grad0_pooled"], "recon_latent": recon,
    }
    save(nti_out, "sdxl_nti.safetensors", settings)
    hi_meta = dict(settings)
    hi_meta.update({"early_stop_epsilon": str(EARLY_STOP_HI), "nti_steps_run": str(HI_STEPS),
                    "min_relative_gap_loss_to_threshold": f"{hi_margin:.3e}"})
    hi_out = {k: hi[k] for k in ("null_context", "null_pooled", "losses", "iterations",
                                 "thresholds", "nti_latents")}
    save(hi_out, "sdxl_nti_eps0.001.safetensors", hi_meta)
    case = {"name": "replace", "kind": "replace", "prompts": prompts,
            "cross_replace_steps": {"default_": CROSS_REPLACE},
            "self_replace_steps": SELF_REPLACE}
    edit_meta = dict(settings)
    edit_meta.update({
        "case": json.dumps(case),
        "inversion": "sdxl_nti.safetensors (null_context, null_pooled, pivots[50])",
        "batch": "[null_i, null_i, C_src, C_tgt]; pooled [null_pooled_i, null_pooled_i, "
                 "pooled_src, pooled_tgt]; time_ids on every row",
        "self_replace_max_queries": str(SELF_REPLACE_MAX_QUERIES),
        "self_replace_step_range": json.dumps(list(self_window)),
        "edit_step_latents_after_steps": json.dumps(EDIT_SNAPSHOTS),
        "layers": json.dumps(layers),
    })
    edit_out = {
        "edit_latents": edit, "edit_step_latents": torch.stack(snaps),
        "edit_token_ids": ids1, "edit_token_ids_2": ids2,
        "edit_context": torch.cat([context, tgt_context]),
        "edit_pooled": torch.cat([pooled, tgt_pooled]),
        "replace_mapper": mapper, "cross_replace_alpha": alpha,
    }
    save(edit_out, "sdxl_p2p_replace.safetensors", edit_meta)
    print("wrote sdxl_nti.safetensors, sdxl_nti_eps0.001.safetensors, "
          "sdxl_p2p_replace.safetensors")


if __name__ == "__main__":
    main()
