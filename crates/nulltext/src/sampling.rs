//! Guided DDIM sampling from a latent with per-step unconditional embeddings: the loop that
//! reconstruction, editing and text-to-image share.

use candle_core::Tensor;
use nulltext_models::{AttentionControl, Ddim, NoControl, PromptEmbeds, StableDiffusion};

use crate::error::Result;
use crate::events::{check, Event, Progress, Stage};

/// An attention controller that may also adjust the latents after each DDIM step
/// (Prompt-to-Prompt's local blend).
pub trait Controller: AttentionControl {
    /// Called after DDIM step `step` (0-based, in sampling order) with the batch's latents
    /// `[B, C, h, w]`; returns the latents to continue from (by default, unchanged).
    fn after_step(&mut self, _step: usize, latents: Tensor) -> Result<Tensor> {
        Ok(latents)
    }
}

impl Controller for NoControl {}

/// Noise prediction ε (converted from v for v-prediction models) of the UNet at `t`.
pub fn predict_eps(
    sd: &StableDiffusion,
    ddim: &Ddim,
    z: &Tensor,
    t: usize,
    embeds: &PromptEmbeds,
    control: &mut dyn AttentionControl,
    step: usize,
) -> Result<Tensor> {
    let out = sd.predict(z, t as f64, embeds, control, step)?;
    let out = out.to_dtype(z.dtype())?;
    Ok(ddim.epsilon(&out, t, z)?)
}

/// Classifier-free guided ε̃ = ε(z,∅) + w (ε(z,C) − ε(z,∅)) for a batch of `B` latents,
/// with the UNet run once on the `[∅…; C…]` batch of 2B as the reference does.
#[allow(clippy::too_many_arguments)]
pub fn guided_eps(
    sd: &StableDiffusion,
    ddim: &Ddim,
    z: &Tensor,
    t: usize,
    uncond: &PromptEmbeds,
    cond: &PromptEmbeds,
    guidance: f64,
    control: &mut dyn AttentionControl,
    step: usize,
) -> Result<Tensor> {
    let b = z.dim(0)?;
    let zz = Tensor::cat(&[z, z], 0)?;
    let embeds = PromptEmbeds::cat(&[uncond, cond])?;
    let eps = predict_eps(sd, ddim, &zz, t, &embeds, control, step)?;
    let (eu, ec) = (eps.narrow(0, 0, b)?, eps.narrow(0, b, b)?);
    Ok((&eu + ((ec - &eu)? * guidance)?)?)
}

/// What to sample: a start latent, the prompt embeddings and one unconditional embedding
/// per step.
pub struct SampleSpec<'a> {
    /// `[B, C, h, w]` (or `[1, …]`, expanded to the prompts' batch).
    pub start: &'a Tensor,
    /// B rows.
    pub cond: &'a PromptEmbeds,
    /// For each sampling step, one row (shared by the batch) or B rows.
    pub uncond: &'a [PromptEmbeds],
    /// Classifier-free guidance scale w (1: the conditional prediction alone).
    pub guidance: f64,
    /// Steps before this index are skipped (SDEdit-style starts); 0 runs them all.
    pub first_step: usize,
    /// Direct inversion: `[T, C, h, w]`, step i's offset added to row 0 (the source) right
    /// after step i's DDIM update, before the controller's latent edits (local blend).
    pub source_offsets: Option<&'a Tensor>,
}

/// Runs guided DDIM from `spec.start`, calling `controller` in every attention layer and
/// after every step. Returns the final latents `[B, C, h, w]`; `on_step` sees each step's
/// (its index in sampling order and the latents), and an error from it stops the loop.
/// Fails with [`crate::Error::InvalidInput`] when `spec.uncond` has fewer embeddings than
/// `ddim` has steps.
///
/// ```
/// use nulltext::models::{Ddim, NoControl};
/// use nulltext::sampling::{sample, SampleSpec};
/// use nulltext::text2img::seeded_noise;
/// use nulltext::{NoProgress, StableDiffusion};
///
/// let sd = StableDiffusion::load("../../models/shapes", &Default::default())?;
/// let ddim = Ddim::new(&sd.scheduler, 10)?;
/// // Two prompts sampled as one batch from the same noise, with the empty prompt as the
/// // unconditional embedding of every step.
/// let prompts = ["a red circle on a blue background", "a red star on a blue background", ""];
/// let (emb, _) = sd.encode_prompts(&prompts)?; // three rows
/// let uncond = vec![emb.narrow(2, 1)?; ddim.num_steps()];
/// let noise = seeded_noise(0, (1, sd.latent_channels(), 8, 8), &sd.device)?;
/// let spec = SampleSpec {
///     start: &noise,
///     cond: &emb.narrow(0, 2)?,
///     uncond: &uncond,
///     guidance: 7.5,
///     first_step: 0,
///     source_offsets: None,
/// };
/// let mut steps = 0;
/// let z = sample(&sd, &ddim, &spec, &mut NoControl, &mut NoProgress, |_, _| {
///     steps += 1;
///     Ok(())
/// })?;
/// assert_eq!(z.dims(), [2, 4, 8, 8]);
/// assert_eq!(steps, 10);
/// # Ok::<(), nulltext::Error>(())
/// ```
pub fn sample(
    sd: &StableDiffusion,
    ddim: &Ddim,
    spec: &SampleSpec,
    controller: &mut dyn Controller,
    progress: &mut dyn Progress,
    mut on_step: impl FnMut(usize, &Tensor) -> Result<()>,
) -> Result<Tensor> {
    let b = spec.cond.rows()?;
    let mut z = spec
        .start
        .broadcast_as((
            b,
            spec.start.dim(1)?,
            spec.start.dim(2)?,
            spec.start.dim(3)?,
        ))?
        .contiguous()?;
    let steps = ddim.timesteps();
    if spec.uncond.len() < steps.len() {
        return Err(crate::error::invalid(format!(
            "{} unconditional embeddings for {} steps",
            spec.uncond.len(),
            steps.len()
        )));
    }
    let total = steps.len() - spec.first_step.min(steps.len());
    progress.event(&Event::Start {
        stage: Stage::Sampling,
        total,
    });
    for (i, &t) in steps.iter().enumerate().skip(spec.first_step) {
        check(progress)?;
        let u = spec.uncond[i].expand_rows(b)?;
        let eps = guided_eps(sd, ddim, &z, t, &u, spec.cond, spec.guidance, controller, i)?;
        z = ddim.step(&eps, t, &z)?;
        if let Some(offsets) = spec.source_offsets {
            z = add_to_first_row(&z, &offsets.narrow(0, i, 1)?.to_dtype(z.dtype())?)?;
        }
        z = controller.after_step(i, z)?;
        on_step(i, &z)?;
        progress.event(&Event::Advance {
            stage: Stage::Sampling,
            done: i + 1 - spec.first_step,
        });
    }
    progress.event(&Event::Finish {
        stage: Stage::Sampling,
    });
    Ok(z)
}

/// `z` (`[B, …]`) with `delta` (`[1, …]`) added to its first row only.
fn add_to_first_row(z: &Tensor, delta: &Tensor) -> Result<Tensor> {
    let b = z.dim(0)?;
    let first = (z.narrow(0, 0, 1)? + delta)?;
    if b == 1 {
        return Ok(first);
    }
    Ok(Tensor::cat(&[&first, &z.narrow(0, 1, b - 1)?], 0)?)
}
