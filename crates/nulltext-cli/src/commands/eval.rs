use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use nulltext::image_io;
use nulltext::metrics::{compare, Mask, SsimWindow};

use super::Ctx;

#[derive(Clone, Copy, ValueEnum)]
enum Window {
    /// 7×7 box, sample covariance (scikit-image's default).
    Uniform,
    /// Gaussian σ = 1.5, 11×11 (Wang et al. 2004).
    Gaussian,
}

#[derive(Args)]
pub struct EvalArgs {
    /// The reference image (e.g. the input photo).
    #[arg(long, short)]
    reference: PathBuf,
    /// An image to compare with it; repeat for several.
    #[arg(long, short, required = true)]
    candidate: Vec<PathBuf>,
    /// Only where this grayscale image is white counts: both images are multiplied by it
    /// (value / 255) before comparing, as PIE-Bench measures background preservation.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Use the mask's complement (for masks that mark the edited region).
    #[arg(long, requires = "mask")]
    invert_mask: bool,
    /// SSIM window.
    #[arg(long, value_enum, default_value = "uniform")]
    ssim_window: Window,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also LPIPS, with these weights (the `lpips` package's state dict as safetensors:
    /// `tools/lpips_reference.py export --net alex`; AlexNet or SqueezeNet).
    #[arg(long)]
    lpips: Option<PathBuf>,
    /// Also the CLIP score of each candidate with --caption, with this transformers CLIP
    /// folder (config.json + model.safetensors, e.g. openai/clip-vit-large-patch14).
    #[arg(long, requires = "caption")]
    clip: Option<PathBuf>,
    /// The caption for the CLIP score.
    #[arg(long, requires = "clip")]
    caption: Option<String>,
}

pub fn run(a: EvalArgs, ctx: &Ctx) -> Result<()> {
    let reference = image_io::read_rgb(&a.reference)?;
    let mask = match &a.mask {
        Some(p) => {
            let gray = image::DynamicImage::ImageRgb8(image_io::read_rgb(p)?).to_luma8();
            Some(Mask::from_gray(&gray, a.invert_mask))
        }
        None => None,
    };
    let window = match a.ssim_window {
        Window::Uniform => SsimWindow::Uniform7,
        Window::Gaussian => SsimWindow::Gaussian,
    };
    let device = candle_core::Device::Cpu;
    let lpips = match &a.lpips {
        Some(p) => Some(nulltext::lpips::Lpips::load(p, &device)?),
        None => None,
    };
    let clip = match &a.clip {
        Some(p) => Some(nulltext::models::clip_score::ClipScorer::load(p, &device)?),
        None => None,
    };
    let mut rows = Vec::new();
    for c in &a.candidate {
        let img = image_io::read_rgb(c)?;
        let m = compare(&reference, &img, mask.as_ref(), window)
            .with_context(|| format!("comparing {} with {}", c.display(), a.reference.display()))?;
        let l = match &lpips {
            Some(net) => Some(net.distance(&reference, &img, mask.as_ref())?),
            None => None,
        };
        let s = match (&clip, &a.caption) {
            (Some(net), Some(caption)) => Some(nulltext::clip_score::clip_score(
                net,
                &img,
                caption,
                mask.as_ref(),
            )?),
            _ => None,
        };
        rows.push((c, m, l, s));
    }
    if a.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(c, m, l, s)| {
                let mut v = serde_json::to_value(m).unwrap_or_default();
                v["candidate"] = serde_json::json!(c.display().to_string());
                v["lpips"] = serde_json::json!(l);
                v["clip_score"] = serde_json::json!(s);
                v
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "reference": a.reference.display().to_string(),
                "mask": a.mask.as_ref().map(|p| p.display().to_string()),
                "mask_inverted": a.invert_mask,
                "mask_coverage": mask.as_ref().map(|m| m.coverage()),
                "candidates": v,
            }))?
        );
        return Ok(());
    }
    let _ = ctx;
    println!(
        "reference {}{}",
        a.reference.display(),
        match (&a.mask, &mask) {
            (Some(p), Some(m)) => format!(
                ", mask {}{} ({:.1}% of the image)",
                p.display(),
                if a.invert_mask { " (inverted)" } else { "" },
                100.0 * m.coverage()
            ),
            _ => String::new(),
        }
    );
    println!(
        "{:<40} {:>10} {:>8} {:>12} {:>8} {:>10}",
        "candidate", "PSNR (dB)", "SSIM", "MSE", "LPIPS", "CLIP score"
    );
    let opt = |v: &Option<f64>, p: usize| v.map_or("-".to_string(), |x| format!("{x:.p$}"));
    for (c, m, l, s) in &rows {
        println!(
            "{:<40} {:>10.3} {:>8.4} {:>12.6} {:>8} {:>10}",
            c.display().to_string(),
            m.psnr,
            m.ssim,
            m.mse,
            opt(l, 4),
            opt(s, 2)
        );
    }
    if lpips.is_none() || clip.is_none() {
        let missing: Vec<&str> = [
            (lpips.is_none(), "LPIPS (--lpips WEIGHTS)"),
            (clip.is_none(), "CLIP score (--clip MODEL --caption TEXT)"),
        ]
        .iter()
        .filter(|(m, _)| *m)
        .map(|(_, s)| *s)
        .collect();
        println!(
            "unavailable without their networks' weights: {}",
            missing.join(", ")
        );
    }
    Ok(())
}
