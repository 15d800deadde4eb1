//! The Prompt-to-Prompt attention controller (the reference's `AttentionControlEdit` with
//! `AttentionReplace`, `AttentionRefine`, `AttentionReweight` and `LocalBlend`), driven by
//! layer identity and resolution instead of call counting.

use candle_core::{DType, Device, Tensor, D};
use nulltext_models::control::{AttentionCall, AttentionControl, Place};
use nulltext_models::tokenizer::MAX_LEN;

use crate::error::Result;
use crate::sampling::Controller;

/// How a target's cross-attention is derived from the source's.
#[derive(Debug, Clone)]
pub enum CrossMap {
    /// Same tokens (reweighting alone): M(A) = A.
    Identity,
    /// Word swap: M(A) = A · P, `P`: `[B−1, 77, 77]`.
    Replace(Tensor),
    /// Refinement: M(A)[…, j] = A[…, map(j)] where α_j = 1, the target's own attention
    /// where α_j = 0. `map`: one `[77]` u32 tensor per target; `alpha`: `[B−1, 1, 1, 77]`.
    Refine {
        /// For each target, the source position of each of its 77 tokens.
        map: Vec<Tensor>,
        /// 1 where a target token has a source token, 0 for a new one.
        alpha: Tensor,
    },
}

/// Local blending: keep every pixel outside the edited words' attention as in the source.
#[derive(Debug, Clone)]
pub struct LocalBlend {
    /// `[B, 77]`: 1 at the tokens of each prompt's blend words.
    pub words: Tensor,
    /// `[B, 77]`: tokens whose attention is removed from the mask, if any.
    pub subtract: Option<Tensor>,
    /// Thresholds of the blend mask and of the subtracted mask.
    pub threshold: (f64, f64),
    /// Blending starts after this many steps (⌊0.2·T⌋ in the reference).
    pub start_step: usize,
}

/// Sum over steps and layers of the conditional cross-attention maps at one resolution,
/// from the down and up blocks (the reference's `down_cross[2:4] + up_cross[:3]` at
/// 512 px): the source of local-blend masks and of attention-map pictures.
#[derive(Debug, Default)]
pub struct AttentionStore {
    /// Σ over steps, layers and heads: `[B, h·w, 77]`.
    sum: Option<Tensor>,
    /// Layer×head maps added per step (the divisor of the mean over layers and heads).
    heads_per_step: usize,
    heads_this_step: usize,
    last_step: Option<usize>,
    steps: usize,
}

impl AttentionStore {
    fn add(&mut self, step: usize, cond_probs: &Tensor) -> Result<()> {
        if self.last_step != Some(step) {
            self.last_step = Some(step);
            self.steps += 1;
            self.heads_this_step = 0;
        }
        // [B, heads, q, 77] -> Σ_heads [B, q, 77]
        let heads = cond_probs.dim(1)?;
        let s = cond_probs.to_dtype(DType::F32)?.sum(1)?;
        self.sum = Some(match self.sum.take() {
            Some(acc) => (acc + s)?,
            None => s,
        });
        self.heads_this_step += heads;
        self.heads_per_step = self.heads_per_step.max(self.heads_this_step);
        Ok(())
    }

    /// Σ over steps of the mean over layers and heads: `[B, q, 77]`.
    pub fn summed_maps(&self) -> Result<Option<Tensor>> {
        match &self.sum {
            Some(s) => Ok(Some((s / self.heads_per_step.max(1) as f64)?)),
            None => Ok(None),
        }
    }

    /// Mean over steps, layers and heads: `[B, q, 77]` (the standard visualization).
    pub fn average_maps(&self) -> Result<Option<Tensor>> {
        match self.summed_maps()? {
            Some(s) => Ok(Some((s / self.steps.max(1) as f64)?)),
            None => Ok(None),
        }
    }
}

/// Everything a Prompt-to-Prompt edit needs, as tensors on the model's device.
pub struct P2PController {
    /// Prompts in the batch (source first).
    pub batch: usize,
    /// Cross-attention replacement weight per step: `T+1` tensors `[B−1, 1, 1, 77]`.
    pub cross_alpha: Vec<Tensor>,
    /// Whether each row of `cross_alpha` has any non-zero entry.
    cross_active: Vec<bool>,
    /// How each target's cross-attention is derived from the source's.
    pub cross_map: CrossMap,
    /// `[B−1, 1, 1, 77]` token scales (reweighting), if any.
    pub equalizer: Option<Tensor>,
    /// Steps `[start, end)` in which target self-attention is replaced by the source's.
    pub self_window: (usize, usize),
    /// Self-attention is replaced only in layers with at most this many query pixels.
    pub self_max_pixels: usize,
    /// Local blend, if asked for.
    pub blend: Option<LocalBlend>,
    /// Query grid of the stored cross-attention maps (latent / `map_downscale`).
    pub store_grid: (usize, usize),
    /// Latent grid (for the blend mask).
    pub latent_grid: (usize, usize),
    /// The cross-attention maps gathered while sampling (when blending or recording).
    pub store: AttentionStore,
    /// Keep maps even without a blend (for `--attention-maps`).
    pub record_maps: bool,
    /// Per-step blend maps before thresholding (`[B, 1, r, r]`) and masks, for inspection.
    pub blend_trace: Option<Vec<(Tensor, Tensor)>>,
}

impl P2PController {
    /// A controller for a batch of `batch` prompts (source first), usually made by
    /// [`crate::edit::build_controller`]. `cross_alpha_rows`: per step (T+1 rows), per
    /// target, the replacement weight of each token; `equalizer`: per target, the scale of
    /// each token; `self_window`: steps `[start, end)`; `map_downscale`: the stored maps
    /// are at 1/this of `latent_grid` (rounded up).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        batch: usize,
        cross_alpha_rows: Vec<Vec<[f32; MAX_LEN]>>,
        cross_map: CrossMap,
        equalizer: Option<Vec<[f32; MAX_LEN]>>,
        self_window: (usize, usize),
        self_max_pixels: usize,
        blend: Option<LocalBlend>,
        latent_grid: (usize, usize),
        map_downscale: usize,
        device: &Device,
    ) -> Result<Self> {
        let nt = batch - 1;
        let as_tensor = |rows: &[[f32; MAX_LEN]]| -> Result<Tensor> {
            let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
            Ok(Tensor::from_vec(flat, (nt, 1, 1, MAX_LEN), device)?)
        };
        let cross_active = cross_alpha_rows
            .iter()
            .map(|rows| rows.iter().any(|r| r.iter().any(|a| *a != 0.0)))
            .collect();
        let cross_alpha = cross_alpha_rows
            .iter()
            .map(|rows| as_tensor(rows))
            .collect::<Result<Vec<_>>>()?;
        let equalizer = match equalizer {
            Some(e) => Some(as_tensor(&e)?),
            None => None,
        };
        Ok(Self {
            batch,
            cross_alpha,
            cross_active,
            cross_map,
            equalizer,
            self_window,
            self_max_pixels,
            blend,
            store_grid: (
                latent_grid.0.div_ceil(map_downscale),
                latent_grid.1.div_ceil(map_downscale),
            ),
            latent_grid,
            store: AttentionStore::default(),
            record_maps: false,
            blend_trace: None,
        })
    }

    fn stores(&self, call: &AttentionCall) -> bool {
        (self.blend.is_some() || self.record_maps)
            && call.site.is_cross()
            && call.site.place != Place::Mid
            && (call.height, call.width) == self.store_grid
    }

    fn self_active(&self, call: &AttentionCall) -> bool {
        !call.site.is_cross()
            && self.self_window.0 <= call.step
            && call.step < self.self_window.1
            && call.pixels() <= self.self_max_pixels
    }

    fn cross_active(&self, step: usize) -> bool {
        self.cross_active.get(step).copied().unwrap_or(false)
    }

    /// The edited target rows of the conditional half: `base` `[1, H, q, 77]`, `targets`
    /// `[B−1, H, q, 77]`.
    fn edit_cross(&self, step: usize, base: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (nt, h, q, k) = targets.dims4()?;
        let mapped = match &self.cross_map {
            CrossMap::Identity => base.broadcast_as((nt, h, q, k))?.contiguous()?,
            CrossMap::Replace(p) => {
                // einsum('hpw,bwn->bhpn'): (H·q, 77) @ (77, 77) for each target
                let b2 = base
                    .reshape((1, h * q, k))?
                    .broadcast_as((nt, h * q, k))?
                    .contiguous()?;
                b2.matmul(&p.to_dtype(base.dtype())?)?
                    .reshape((nt, h, q, k))?
            }
            CrossMap::Refine { map, alpha } => {
                let b = base.squeeze(0)?.contiguous()?;
                let picked = map
                    .iter()
                    .map(|m| Ok(b.index_select(m, D::Minus1)?.unsqueeze(0)?))
                    .collect::<Result<Vec<_>>>()?;
                let picked = Tensor::cat(&picked, 0)?;
                let a = alpha.to_dtype(base.dtype())?;
                (picked.broadcast_mul(&a)? + targets.broadcast_mul(&(1.0 - &a)?)?)?
            }
        };
        let mapped = match &self.equalizer {
            Some(eq) => mapped.broadcast_mul(&eq.to_dtype(base.dtype())?)?,
            None => mapped,
        };
        let a = self.cross_alpha[step].to_dtype(base.dtype())?;
        Ok((mapped.broadcast_mul(&a)? + targets.broadcast_mul(&(1.0 - &a)?)?)?)
    }

    /// The local-blend mask of every prompt, `[B, 1, h, w]` (f32 0/1), from the summed maps.
    fn blend_mask(&mut self) -> Result<Option<Tensor>> {
        let (Some(blend), Some(maps)) = (&self.blend, self.store.summed_maps()?) else {
            return Ok(None);
        };
        let (r_h, r_w) = self.store_grid;
        let b = maps.dim(0)?;
        let to_map = |words: &Tensor| -> Result<Tensor> {
            // Σ over the words' tokens: [B, q, 77] · [B, 1, 77] -> [B, 1, r, r]
            let w = words.to_dtype(DType::F32)?.unsqueeze(1)?;
            Ok(maps
                .broadcast_mul(&w)?
                .sum(D::Minus1)?
                .reshape((b, 1, r_h, r_w))?)
        };
        let mask_of = |m: Tensor, pool: bool, th: f64| -> Result<(Tensor, Tensor)> {
            let m = if pool {
                // max-pool 3×3, stride 1, padding 1 (maps are ≥ 0, so zero padding is neutral)
                m.pad_with_zeros(2, 1, 1)?
                    .pad_with_zeros(3, 1, 1)?
                    .max_pool2d_with_stride((3, 3), (1, 1))?
            } else {
                m
            };
            let m = m.upsample_nearest2d(self.latent_grid.0, self.latent_grid.1)?;
            let max = m.max_keepdim(D::Minus1)?.max_keepdim(D::Minus2)?;
            let m = m.broadcast_div(&max)?;
            let mask = m.gt(th)?.to_dtype(DType::F32)?;
            // ∪ with the source's mask
            let mask = mask.broadcast_maximum(&mask.narrow(0, 0, 1)?)?;
            Ok((m, mask))
        };
        let pooled_map = to_map(&blend.words)?;
        let (_, mut mask) = mask_of(pooled_map.clone(), true, blend.threshold.0)?;
        if let Some(sub) = &blend.subtract {
            let (_, sub_mask) = mask_of(to_map(sub)?, false, blend.threshold.1)?;
            mask = (mask * (1.0 - sub_mask)?)?;
        }
        if let Some(trace) = &mut self.blend_trace {
            trace.push((pooled_map, mask.clone()));
        }
        Ok(Some(mask))
    }
}

impl AttentionControl for P2PController {
    fn wants(&self, call: &AttentionCall) -> bool {
        if call.site.is_cross() {
            self.cross_active(call.step) || self.stores(call)
        } else {
            self.self_active(call)
        }
    }

    fn edit(&mut self, call: &AttentionCall, probs: Tensor) -> nulltext_models::Result<Tensor> {
        let b = self.batch;
        let total = probs.dim(0)?;
        // The batch is [∅ × B; C × B]: only the conditional half is edited.
        let (uncond, cond) = (
            probs.narrow(0, 0, total - b)?,
            probs.narrow(0, total - b, b)?,
        );
        let base = cond.narrow(0, 0, 1)?;
        let targets = cond.narrow(0, 1, b - 1)?;
        let is_cross = call.site.is_cross();
        let new_targets = if is_cross && self.cross_active(call.step) {
            Some(
                self.edit_cross(call.step, &base, &targets)
                    .map_err(to_model)?,
            )
        } else if !is_cross && self.self_active(call) {
            Some(base.broadcast_as(targets.shape())?.contiguous()?)
        } else {
            None
        };
        let cond = match new_targets {
            Some(t) => Tensor::cat(&[&base, &t], 0)?,
            None => cond,
        };
        if self.stores(call) {
            self.store.add(call.step, &cond).map_err(to_model)?;
        }
        Ok(Tensor::cat(&[&uncond, &cond], 0)?)
    }
}

fn to_model(e: crate::Error) -> nulltext_models::Error {
    match e {
        crate::Error::Model(m) => m,
        e => nulltext_models::Error::Msg(e.to_string()),
    }
}

impl Controller for P2PController {
    fn after_step(&mut self, step: usize, latents: Tensor) -> Result<Tensor> {
        let start = match &self.blend {
            Some(b) => b.start_step,
            None => return Ok(latents),
        };
        if step < start {
            return Ok(latents);
        }
        let Some(mask) = self.blend_mask()? else {
            return Err(crate::error::invalid(format!(
                "local blend: the UNet has no down- or up-block cross-attention layer at {}×{} \
                 (the chosen fraction of the latent size); pick another --attention-downscale",
                self.store_grid.0, self.store_grid.1
            )));
        };
        // z_b ← z_0 + mask_b ⊙ (z_b − z_0)
        let z0 = latents.narrow(0, 0, 1)?;
        let mask = mask.to_dtype(latents.dtype())?;
        Ok(z0.broadcast_add(&mask.broadcast_mul(&latents.broadcast_sub(&z0)?)?)?)
    }
}
