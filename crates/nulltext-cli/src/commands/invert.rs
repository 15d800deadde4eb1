use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;
use clap::Args;
use nulltext::image_io::{self, Crop};
use nulltext::{InvertOptions, Method};

use super::context::{Ctx, ModelArg};

#[derive(Args)]
pub struct InvertArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The photo (PNG, JPEG or WebP).
    #[arg(long, short)]
    image: PathBuf,
    /// A caption of the photo; edits change this caption.
    #[arg(long, short)]
    prompt: String,
    /// The inversion file to write (conventionally *.nti.safetensors).
    #[arg(long, short)]
    out: PathBuf,
    #[command(flatten)]
    settings: super::context::InvertSettings,
    /// Pixels to cut from the sides before the centre square is taken: LEFT,RIGHT,TOP,BOTTOM.
    #[arg(long)]
    crop: Option<Crop>,
    /// Also write the reconstruction as a PNG.
    #[arg(long)]
    reconstruction: Option<PathBuf>,
    /// Also reconstruct plain DDIM inversion (w = guidance, ∅ = "") and report it.
    #[arg(long)]
    compare: bool,
    /// Run the inversion once per budget of --trace-budgets iterations per step and write
    /// each reconstruction's PSNR and losses here (JSON), for `nulltext plot`. The file of
    /// --out is the run with --inner-steps iterations.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Iterations per step to trace (--inner-steps is always added).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,5")]
    trace_budgets: Vec<usize>,
    /// With --trace: also edit each traced inversion to this caption (Prompt-to-Prompt
    /// with the default settings) and record the edit's PSNR outside --trace-mask.
    #[arg(long, requires = "trace", requires = "trace_mask")]
    trace_edit: Option<String>,
    /// The region the traced edit may change (a white-on-black image of the photo's size
    /// after --crop and --size).
    #[arg(long, requires = "trace_edit")]
    trace_mask: Option<PathBuf>,
}

pub fn run(a: InvertArgs, ctx: &Ctx) -> Result<()> {
    let start = Instant::now();
    // Check what can be checked before the model loads and long before any file is
    // written: the prompt, where the outputs go, the image.
    let limits = a.settings.limits();
    limits.check_prompt("--prompt", &a.prompt)?;
    for p in [Some(&a.out), a.reconstruction.as_ref(), a.trace.as_ref()]
        .into_iter()
        .flatten()
    {
        nulltext::atomic::check_target(p)?;
    }
    let raw = image_io::read_rgb_limited(&a.image, limits.max_pixels)?;
    let sd = ctx.load(&a.model)?;
    let f = sd.vae_scale_factor() as u32;
    let size = limits.image_size("--size", a.settings.size, sd.default_image_size(), f)?;
    a.settings.options().validate(&sd.scheduler)?;
    let img = image_io::prepare(&raw, a.crop.unwrap_or_default(), size, &a.image)?;
    let enc = sd.tokenizer.encode_padded(&a.prompt);
    if let Some(cut) = &enc.truncated {
        eprintln!("warning: the prompt is longer than 77 tokens; cut off: \"{cut}\"");
    }
    let opts = a.settings.options();
    if let Some(trace_path) = &a.trace {
        return run_trace(&a, ctx, &sd, &img, &opts, trace_path, start);
    }
    let mut bars = ctx.bars().with_inner_steps(a.settings.inner_steps);
    let (inv, report) = nulltext::invert_image(&sd, &img, &a.prompt, &opts, &mut bars)?;
    nulltext::inversion_file::save(&inv, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    ctx.wrote(&a.out);
    let wall = start.elapsed().as_secs_f64();

    // The report: reconstruction quality against the VAE round trip and the input.
    let z0 = inv.image_latent.clone().expect("invert keeps z0");
    let rec_latent = match &report.final_latent {
        Some(z) => z.clone(),
        None => nulltext::reconstruct(&sd, &inv, &mut bars)?,
    };
    let rec = nulltext::image_io::decode_latents(&sd, &rec_latent)?.remove(0);
    let vae = nulltext::image_io::decode_latents(&sd, &z0)?.remove(0);
    if let Some(p) = &a.reconstruction {
        image_io::save_png(&rec, p)?;
        ctx.wrote(p);
    }
    let iters: usize = report.iterations.iter().sum();
    let stopped = report
        .iterations
        .iter()
        .filter(|n| **n < a.settings.inner_steps)
        .count();
    let second_stage = match a.settings.method {
        Method::Direct => format!(", offset pass {:.1} s", report.seconds_optimization),
        m if m.optimizes() => format!(", optimization {:.1} s", report.seconds_optimization),
        _ => String::new(),
    };
    ctx.say(format!(
        "inverted {} with {} in {wall:.1} s (DDIM inversion {:.1} s{second_stage}; {} UNet \
         passes)",
        a.image.display(),
        a.settings.method,
        report.seconds_ddim,
        report.unet_passes
    ));
    if a.settings.method.optimizes() {
        ctx.say(format!(
            "  {iters} Adam iterations over {} steps ({stopped} steps stopped early)",
            a.settings.steps
        ));
    }
    ctx.say(format!(
        "  {:<24} {:>12} {:>13} {:>14}",
        "", "PSNR vs VAE", "PSNR vs input", "latent MSE"
    ));
    let line = |name: &str, im: &image::RgbImage, z: Option<&Tensor>| -> Result<String> {
        let mse = match z {
            Some(z) => format!("{:>14.6}", nulltext_eval::metrics::latent_mse(z, &z0)?),
            None => format!("{:>14}", "-"),
        };
        let vs_vae = if std::ptr::eq(im, &vae) {
            "         -   ".to_string()
        } else {
            format!("{:>9.2} dB", image_io::psnr(im, &vae))
        };
        Ok(format!(
            "  {name:<24} {vs_vae} {:>10.2} dB {mse}",
            image_io::psnr(im, &img)
        ))
    };
    ctx.say(line(
        &format!("{} (this file)", a.settings.method),
        &rec,
        Some(&rec_latent),
    )?);
    if a.compare && a.settings.method != Method::Ddim {
        let mut base = inv.clone();
        let empty = sd.encode_negative("")?.expand_rows(a.settings.steps)?;
        base.null_embeddings = empty.context;
        base.null_pooled = empty.pooled;
        base.method = Method::Ddim;
        base.latent_offsets = None;
        let z = nulltext::reconstruct(&sd, &base, &mut bars)?;
        let im = nulltext::image_io::decode_latents(&sd, &z)?.remove(0);
        ctx.say(line("ddim (baseline)", &im, Some(&z))?);
    }
    ctx.say(line("VAE round trip", &vae, None)?);
    ctx.say(format!("wrote {}", a.out.display()));
    if let Some(p) = &a.reconstruction {
        ctx.say(format!("wrote {}", p.display()));
    }
    Ok(())
}

fn run_trace(
    a: &InvertArgs,
    ctx: &Ctx,
    sd: &nulltext::StableDiffusion,
    img: &image::RgbImage,
    opts: &InvertOptions,
    trace_path: &std::path::Path,
    start: Instant,
) -> Result<()> {
    let mut budgets = a.trace_budgets.clone();
    budgets.push(a.settings.inner_steps);
    let mut bars = ctx.bars().with_inner_steps(a.settings.inner_steps);
    let mut kept = None;
    let traced_edit = match (&a.trace_edit, &a.trace_mask) {
        (Some(target), Some(mask)) => Some(nulltext_eval::trace::TraceEdit {
            target: target.clone(),
            options: Default::default(),
            region: nulltext_eval::metrics::load_mask(
                mask,
                a.crop.unwrap_or_default(),
                img.width(),
                a.settings.limits().max_pixels,
            )?,
        }),
        _ => None,
    };
    let trace = nulltext_eval::trace::trace(
        sd,
        img,
        &a.prompt,
        opts,
        &budgets,
        traced_edit.as_ref(),
        &mut bars,
        |b, inv, _| {
            if b == a.settings.inner_steps || !a.settings.method.optimizes() {
                kept = Some(inv.clone());
            }
            Ok(())
        },
    )?;
    let inv = kept.expect("the --inner-steps budget is traced");
    nulltext::inversion_file::save(&inv, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    ctx.wrote(&a.out);
    let mut json = serde_json::to_vec_pretty(&trace)?;
    json.push(b'\n');
    nulltext::atomic::write_bytes_atomic(trace_path, &json)?;
    ctx.wrote(trace_path);
    if let Some(p) = &a.reconstruction {
        let rec = nulltext::reconstruct(sd, &inv, &mut bars)?;
        image_io::save_png(&nulltext::image_io::decode_latents(sd, &rec)?.remove(0), p)?;
    }
    ctx.say(format!(
        "traced {} with {} in {:.1} s; VAE round trip {:.2} dB",
        a.image.display(),
        a.settings.method,
        start.elapsed().as_secs_f64(),
        trace.vae_psnr
    ));
    ctx.say(format!(
        "  {:>3} {:>10} {:>11} {:>10} {:>10} {:>12} {:>8} {:>12} {:>15}",
        "N",
        "iterations",
        "UNet passes",
        "seconds",
        "PSNR (dB)",
        "vs VAE (dB)",
        "SSIM",
        "latent MSE",
        "edit bg PSNR"
    ));
    for p in &trace.points {
        let edit = p
            .edit_background_psnr
            .map_or("-".to_string(), |v| format!("{v:.2} dB"));
        ctx.say(format!(
            "  {:>3} {:>10} {:>11} {:>10.1} {:>10.2} {:>12.2} {:>8.4} {:>12.6} {edit:>15}",
            p.budget,
            p.iterations,
            p.unet_passes,
            p.seconds,
            p.psnr,
            p.psnr_vs_vae,
            p.ssim,
            p.latent_mse,
        ));
    }
    ctx.say(format!(
        "wrote {} and {}",
        a.out.display(),
        trace_path.display()
    ));
    Ok(())
}
