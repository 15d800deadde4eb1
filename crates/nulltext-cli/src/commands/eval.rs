use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use image::RgbImage;
use nulltext::image_io;
use nulltext::metrics::{compare, Mask, SsimWindow};
use nulltext::pie_bench;

use super::Ctx;

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
    /// SSIM window: uniform (7×7 box, sample covariance: scikit-image's default), gaussian
    /// (σ = 1.5, 11×11, Wang et al. 2004; torchmetrics ≤ 1.4.1 and PIE-Bench's published
    /// numbers; the default with --pie-bench) or gaussian-padded (torchmetrics ≥ 1.4.2).
    #[arg(long)]
    ssim_window: Option<SsimWindow>,
    /// PIE-Bench's metrics, as its evaluate.py computes them: --mask marks the edited
    /// region (white; e.g. OUT_DIR/pie-bench/masks/KEY.png of `batch --pie-bench`), the
    /// unedited part is measured, CLIP whole and on the edited part with --caption (and the
    /// reference with --source-caption). Candidates wider than tall are cut to their last
    /// square, as evaluate.py cuts PnPInversion's side-by-side outputs.
    #[arg(long, requires = "mask", conflicts_with = "invert_mask")]
    pie_bench: bool,
    /// With --pie-bench and --clip: the reference's caption.
    #[arg(long, requires = "pie_bench")]
    source_caption: Option<String>,
    /// Also PIE-Bench's structure distance, with these DINO ViT-B/8 weights (DINO's state
    /// dict as safetensors; docs/evaluation.md).
    #[arg(long)]
    dino: Option<PathBuf>,
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
    let device = candle_core::Device::Cpu;
    if a.pie_bench {
        return run_pie_bench(&a, &reference, mask.as_ref(), &device);
    }
    let window = a.ssim_window.unwrap_or_default();
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

/// The last square of an image wider than tall: evaluate.py's cut of PnPInversion's outputs
/// (caption, source, reconstruction, edit side by side).
fn last_square(img: RgbImage, side: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h || w < side || h < side {
        return img;
    }
    image::imageops::crop_imm(&img, w - side, h - side, side, side).to_image()
}

fn run_pie_bench(
    a: &EvalArgs,
    reference: &RgbImage,
    region: Option<&Mask>,
    device: &candle_core::Device,
) -> Result<()> {
    let region = region.context("--pie-bench needs --mask")?;
    let lpips = a
        .lpips
        .as_deref()
        .map(|p| nulltext::lpips::Lpips::load(p, device))
        .transpose()?;
    if let Some(l) = &lpips {
        if l.net() != nulltext::lpips::Net::Squeeze {
            eprintln!(
                "note: PIE-Bench's LPIPS uses SqueezeNet; these weights are {}",
                l.net().name()
            );
        }
    }
    let clip = a
        .clip
        .as_deref()
        .map(|p| nulltext::models::clip_score::ClipScorer::load(p, device))
        .transpose()?;
    let structure = a
        .dino
        .as_deref()
        .map(|p| nulltext::structure::StructureDistance::load(p, device))
        .transpose()?;
    let nets = pie_bench::Networks {
        lpips: lpips.as_ref(),
        clip: clip.as_ref(),
        structure: structure.as_ref(),
    };
    let window = a.ssim_window.unwrap_or(SsimWindow::Gaussian);
    let source_caption = a.source_caption.as_deref().unwrap_or("");
    let target_caption = a.caption.as_deref().unwrap_or("");
    let mut rows = Vec::new();
    for c in &a.candidate {
        let img = last_square(image_io::read_rgb(c)?, reference.width());
        let mut s = pie_bench::score(
            &nets,
            reference,
            &img,
            region,
            (source_caption, target_caption),
            window,
        )
        .with_context(|| format!("comparing {} with {}", c.display(), a.reference.display()))?;
        if a.source_caption.is_none() {
            s.clip_similarity_source_image = None;
        }
        rows.push((c, s));
    }
    if a.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(c, s)| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                v["candidate"] = serde_json::json!(c.display().to_string());
                v
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "reference": a.reference.display().to_string(),
                "mask": a.mask.as_ref().map(|p| p.display().to_string()),
                "edited_fraction": region.coverage(),
                "candidates": v,
            }))?
        );
        return Ok(());
    }
    let opt =
        |v: Option<f64>, scale: f64| v.map_or("–".to_string(), |x| format!("{:.2}", x * scale));
    println!(
        "{:<32} {:>9} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8}",
        "candidate", "struct×1e3", "PSNR", "LPIPS×1e3", "MSE×1e4", "SSIM×1e2", "CLIP", "CLIP ed."
    );
    for (c, s) in &rows {
        println!(
            "{:<32} {:>9} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8}",
            c.display().to_string(),
            opt(s.structure_distance, 1e3),
            opt(s.psnr_unedit_part, 1.0),
            opt(s.lpips_unedit_part, 1e3),
            opt(s.mse_unedit_part, 1e4),
            opt(s.ssim_unedit_part, 1e2),
            opt(s.clip_similarity_target_image, 1.0),
            opt(s.clip_similarity_target_image_edit_part, 1.0),
        );
    }
    Ok(())
}
