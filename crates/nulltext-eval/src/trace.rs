//! Reconstruction quality against the optimization budget: the data of the paper's Figure 4
//! (PSNR vs. null-text iterations, per method).
//!
//! The paper runs Algorithm 1 with N = 1 … 20 iterations per step and measures the PSNR of
//! each reconstruction; a point of the curve is one whole inversion with budget N, since a
//! smaller budget changes every later step's starting point. [`trace`] does exactly that
//! for a list of budgets, and records the losses of each run. Each point also records its
//! compute (UNet passes and seconds) and, optionally, how well an edit made from that
//! inversion keeps what it should not change: quality per compute across methods.

use std::time::Instant;

use image::RgbImage;
use nulltext::edit::{edit, EditOptions};
use nulltext::error::{invalid, Result};
use nulltext::events::Progress;
use nulltext::inversion::{invert_latent, reconstruct, Inversion, InvertOptions, InvertReport};
use nulltext_models::StableDiffusion;
use serde::{Deserialize, Serialize};

use crate::metrics::{compare, Mask, SsimWindow};

/// One inversion of a trace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TracePoint {
    /// Iterations allowed per step (N); 0 for methods that do not optimize.
    pub budget: usize,
    /// Adam iterations actually run, summed over the steps (fewer than N·T when steps stop
    /// early).
    pub iterations: usize,
    /// Reconstruction PSNR against the input image, dB.
    #[serde(with = "crate::metrics::infinite_as_null")]
    pub psnr: f64,
    /// Reconstruction SSIM against the input image.
    pub ssim: f64,
    /// Reconstruction PSNR against the VAE round trip of the input (the upper bound), dB;
    /// infinite where the reconstruction is that round trip (`null` in JSON).
    #[serde(with = "crate::metrics::infinite_as_null")]
    pub psnr_vs_vae: f64,
    /// Mean squared error of the reconstructed latent against z₀.
    pub latent_mse: f64,
    /// The last loss of each step.
    pub final_losses: Vec<f64>,
    /// Seconds of this inversion (DDIM inversion + optimization).
    pub seconds: f64,
    /// UNet passes of this inversion (forward or backward, one latent each).
    #[serde(default)]
    pub unet_passes: usize,
    /// The traced edit's image against the input outside the edited region, if asked for.
    #[serde(default)]
    pub edit_background_psnr: Option<f64>,
}

/// An edit to make from every traced inversion, measured where it should change nothing.
pub struct TraceEdit {
    pub target: String,
    pub options: EditOptions,
    /// The region the edit may change (white); the metrics use the rest of the image.
    pub region: Mask,
}

/// A method's reconstruction quality for each budget, for one image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trace {
    pub method: String,
    pub prompt: String,
    pub model: String,
    pub size: usize,
    pub steps: usize,
    pub guidance: f64,
    pub early_stop: f64,
    /// PSNR of the VAE round trip against the input: no inversion can beat it.
    pub vae_psnr: f64,
    /// The traced edit's target caption, if any.
    #[serde(default)]
    pub edit_target: Option<String>,
    pub points: Vec<TracePoint>,
}

/// Inverts `image` (already at the model's size) once per budget in `budgets` (iterations per
/// step) and measures each reconstruction. Methods that do not optimize give one point.
/// `keep(budget, inversion, report)` receives each run, e.g. to save the one wanted.
#[allow(clippy::too_many_arguments)]
pub fn trace(
    sd: &StableDiffusion,
    image: &RgbImage,
    prompt: &str,
    opts: &InvertOptions,
    budgets: &[usize],
    traced_edit: Option<&TraceEdit>,
    progress: &mut dyn Progress,
    mut keep: impl FnMut(usize, &Inversion, &InvertReport) -> Result<()>,
) -> Result<Trace> {
    let budgets: Vec<usize> = if opts.method.optimizes() {
        let mut b: Vec<usize> = budgets.to_vec();
        b.sort_unstable();
        b.dedup();
        if b.is_empty() || b[0] == 0 {
            return Err(invalid(
                "trace budgets must be iterations per step of at least 1",
            ));
        }
        b
    } else {
        vec![0]
    };
    let (w, h) = image.dimensions();
    if let Some(e) = traced_edit {
        // the edit's words and the mask's size are checked before hours of inversions
        if e.region.dimensions() != (w, h) {
            return Err(invalid(format!(
                "the traced edit's mask is {:?}, the image {w}×{h}",
                e.region.dimensions()
            )));
        }
        let f = sd.vae_scale_factor();
        let grid = (h as usize / f, w as usize / f);
        let targets = [e.target.clone()];
        nulltext::edit::build_controller(sd, prompt, &targets, &e.options, opts.num_steps, grid)?;
    }
    let x = nulltext::image_io::image_to_tensor(image, &sd.device)?;
    let z0 = sd.image_to_latent(&x)?;
    let vae = nulltext::image_io::decode_latents(sd, &z0)?.remove(0);
    let vae_psnr = compare(image, &vae, None, SsimWindow::Uniform7)?.psnr;
    let mut points = Vec::new();
    for budget in budgets {
        let o = InvertOptions {
            inner_steps: budget.max(1),
            ..opts.clone()
        };
        let start = Instant::now();
        let (inv, report) = invert_latent(sd, &z0, prompt, h as usize, w as usize, &o, progress)?;
        let seconds = start.elapsed().as_secs_f64();
        let rec_latent = match &report.final_latent {
            Some(z) => z.clone(),
            None => reconstruct(sd, &inv, progress)?,
        };
        let rec = nulltext::image_io::decode_latents(sd, &rec_latent)?.remove(0);
        let m = compare(image, &rec, None, SsimWindow::Uniform7)?;
        let latent_mse = crate::metrics::latent_mse(&rec_latent, &z0)?;
        let edit_background_psnr = match traced_edit {
            Some(e) => {
                let targets = [e.target.clone()];
                let res = edit(sd, &inv, &targets, &e.options, progress)?;
                let edited = nulltext::image_io::decode_latents(sd, &res.latents.narrow(0, 1, 1)?)?;
                let background = e.region.complement();
                Some(compare(image, &edited[0], Some(&background), SsimWindow::Uniform7)?.psnr)
            }
            None => None,
        };
        points.push(TracePoint {
            budget,
            iterations: report.iterations.iter().sum(),
            psnr: m.psnr,
            ssim: m.ssim,
            psnr_vs_vae: compare(&vae, &rec, None, SsimWindow::Uniform7)?.psnr,
            latent_mse,
            final_losses: report
                .losses
                .iter()
                .filter_map(|l| l.last().copied())
                .collect(),
            seconds,
            unet_passes: report.unet_passes,
            edit_background_psnr,
        });
        keep(budget, &inv, &report)?;
    }
    Ok(Trace {
        method: opts.method.to_string(),
        prompt: prompt.to_string(),
        model: sd.name.clone(),
        size: w.max(h) as usize,
        steps: opts.num_steps,
        guidance: opts.guidance,
        early_stop: opts.early_stop,
        vae_psnr,
        edit_target: traced_edit.map(|e| e.target.clone()),
        points,
    })
}
