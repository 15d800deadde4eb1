//! Plain text-to-image with classifier-free guidance and DDIM: the smoke test of a model.

use candle_core::{Device, Tensor};
use nulltext_models::{Ddim, NoControl, StableDiffusion};

use crate::error::{invalid, Result};
use crate::events::Progress;
use crate::sampling::{sample, SampleSpec};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    pub height: usize,
    pub width: usize,
}

/// Standard normal noise from a seeded generator on the CPU, so a seed gives the same
/// image on every device.
pub fn seeded_noise(
    seed: u64,
    shape: (usize, usize, usize, usize),
    device: &Device,
) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        // Box–Muller
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        v.push((r * (std::f64::consts::TAU * u2).cos()) as f32);
        v.push((r * (std::f64::consts::TAU * u2).sin()) as f32);
    }
    v.truncate(n);
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)?)
}

/// Samples latents `[1, C, h, w]` for `opts.prompt`.
pub fn generate(
    sd: &StableDiffusion,
    opts: &GenerateOptions,
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    let f = sd.vae_scale_factor();
    if !opts.height.is_multiple_of(f)
        || !opts.width.is_multiple_of(f)
        || opts.height == 0
        || opts.width == 0
    {
        return Err(invalid(format!(
            "height and width must be positive multiples of {f}, got {}×{}",
            opts.width, opts.height
        )));
    }
    let ddim = Ddim::new(&sd.scheduler, opts.steps)?;
    let (emb, _) = sd.encode_prompts(&[&opts.prompt, &opts.negative_prompt])?;
    let cond = emb.narrow(0, 0, 1)?;
    let uncond = emb.narrow(0, 1, 1)?;
    let noise = seeded_noise(
        opts.seed,
        (1, sd.latent_channels(), opts.height / f, opts.width / f),
        &sd.device,
    )?;
    let nulls = vec![uncond; opts.steps];
    let spec = SampleSpec {
        start: &noise,
        cond: &cond,
        uncond: &nulls,
        guidance: opts.guidance,
        first_step: 0,
        source_offsets: None,
    };
    sample(sd, &ddim, &spec, &mut NoControl, progress, |_, _| Ok(()))
}
