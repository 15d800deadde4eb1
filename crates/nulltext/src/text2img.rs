//! Plain text-to-image with classifier-free guidance and DDIM: the smoke test of a model.

use candle_core::{Device, Tensor};
use nulltext_models::{Ddim, NoControl, StableDiffusion};

use crate::error::{invalid, Result};
use crate::events::Progress;
use crate::sampling::{sample, SampleSpec};

/// What [`generate`] samples. There is no default: the size depends on the model
/// ([`StableDiffusion::default_image_size`]).
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// The caption to draw.
    pub prompt: String,
    /// The unconditional input of classifier-free guidance; `""` for none.
    pub negative_prompt: String,
    /// Seed of the starting noise ([`seeded_noise`]), which is the same on every device.
    pub seed: u64,
    /// DDIM steps.
    pub steps: usize,
    /// Classifier-free guidance scale w.
    pub guidance: f64,
    /// Image height in pixels, a multiple of the VAE's scale factor (8 for Stable Diffusion).
    pub height: usize,
    /// Image width in pixels, a multiple of the VAE's scale factor (8 for Stable Diffusion).
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

/// Samples latents `[1, C, h, w]` for `opts.prompt`, from [`seeded_noise`] with
/// classifier-free guidance; decode them with [`crate::image_io::decode_latents`]. Fails
/// with [`crate::Error::InvalidInput`] when the size is not a positive multiple of the VAE's
/// scale factor, and with [`crate::Error::Model`] on a step count the scheduler cannot take.
///
/// ```
/// use nulltext::text2img::{generate, GenerateOptions};
/// use nulltext::{image_io, NoProgress, StableDiffusion};
///
/// let sd = StableDiffusion::load("../../models/shapes", &Default::default())?;
/// let opts = GenerateOptions {
///     prompt: "a yellow square on a black background".into(),
///     negative_prompt: String::new(),
///     seed: 1,
///     steps: 10,
///     guidance: 7.5,
///     height: 64,
///     width: 64,
/// };
/// let z = generate(&sd, &opts, &mut NoProgress)?;
/// assert_eq!(z.dims(), [1, 4, 8, 8]);
/// let picture = image_io::decode_latents(&sd, &z)?.remove(0);
/// assert_eq!(picture.dimensions(), (64, 64));
/// # Ok::<(), nulltext::Error>(())
/// ```
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
    let cond = sd.encode_prompt(&opts.prompt)?;
    let uncond = sd.encode_negative(&opts.negative_prompt)?;
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
