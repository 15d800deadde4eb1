use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use image::RgbImage;
use nulltext::image_io;
use nulltext_eval::metrics::{compare, Mask, SsimWindow};
use nulltext_eval::pie_bench;

use super::context::Ctx;

#[derive(Args)]
pub struct EvalArgs {
    /// The reference image (e.g. the input photo).
    #[arg(long, short, required_unless_present = "pie_bench_dir")]
    reference: Option<PathBuf>,
    /// An image to compare with it; repeat for several.
    #[arg(long, short, required_unless_present = "pie_bench_dir")]
    candidate: Vec<PathBuf>,
    /// Measure other tools' PIE-Bench edits as its evaluate.py does: the benchmark's folder
    /// (mapping_file.json, annotation_images/), with --outputs.
    #[arg(long, value_name = "DIR", requires = "outputs", conflicts_with_all = ["reference", "candidate", "pie_bench"])]
    pie_bench_dir: Option<PathBuf>,
    /// With --pie-bench-dir: a folder of edited images laid out like annotation_images/
    /// (e.g. PnPInversion's output/METHOD/annotation_images); repeat for several methods.
    #[arg(long, requires = "pie_bench_dir")]
    outputs: Vec<PathBuf>,
    /// With --pie-bench-dir: only these edit types (0–9), e.g. 0,1,2.
    #[arg(long, requires = "pie_bench_dir")]
    edit_types: Option<String>,
    /// With --pie-bench-dir: one table row per edit type.
    #[arg(long, requires = "pie_bench_dir")]
    by_edit_type: bool,
    /// With --pie-bench-dir: write OUT.csv (evaluate.py's per-photo file) and the table as
    /// OUT-table.md and OUT-table.csv.
    #[arg(long, requires = "pie_bench_dir")]
    out: Option<PathBuf>,
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
    #[arg(long)]
    clip: Option<PathBuf>,
    /// The caption for the CLIP score.
    #[arg(long, requires = "clip")]
    caption: Option<String>,
}

pub fn run(a: EvalArgs, ctx: &Ctx) -> Result<()> {
    if a.pie_bench_dir.is_some() {
        return run_outputs(&a, ctx);
    }
    if a.clip.is_some() && a.caption.is_none() {
        anyhow::bail!("--clip needs --caption (the caption the images are scored against)");
    }
    let reference_path = a.reference.clone().context("--reference is needed")?;
    let reference = image_io::read_rgb(&reference_path)?;
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
        Some(p) => Some(nulltext_eval::lpips::Lpips::load(p, &device)?),
        None => None,
    };
    let clip = match &a.clip {
        Some(p) => Some(nulltext::models::clip_score::ClipScorer::load(p, &device)?),
        None => None,
    };
    let mut rows = Vec::new();
    for c in &a.candidate {
        let img = image_io::read_rgb(c)?;
        let m = compare(&reference, &img, mask.as_ref(), window).with_context(|| {
            format!(
                "comparing {} with {}",
                c.display(),
                reference_path.display()
            )
        })?;
        let l = match &lpips {
            Some(net) => Some(net.distance(&reference, &img, mask.as_ref())?),
            None => None,
        };
        let s = match (&clip, &a.caption) {
            (Some(net), Some(caption)) => Some(nulltext_eval::clip_score::clip_score(
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
                "reference": reference_path.display().to_string(),
                "mask": a.mask.as_ref().map(|p| p.display().to_string()),
                "mask_inverted": a.invert_mask,
                "mask_coverage": mask.as_ref().map(|m| m.coverage()),
                "candidates": v,
            }))?
        );
        return Ok(());
    }
    println!(
        "reference {}{}",
        reference_path.display(),
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

/// The networks asked for.
struct Nets {
    lpips: Option<nulltext_eval::lpips::Lpips>,
    clip: Option<nulltext::models::clip_score::ClipScorer>,
    structure: Option<nulltext_eval::structure::StructureDistance>,
}

impl Nets {
    fn load(a: &EvalArgs, device: &candle_core::Device) -> Result<Self> {
        let lpips = a
            .lpips
            .as_deref()
            .map(|p| nulltext_eval::lpips::Lpips::load(p, device))
            .transpose()?;
        if let Some(l) = &lpips {
            if l.net() != nulltext_eval::lpips::Net::Squeeze {
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
            .map(|p| nulltext_eval::structure::StructureDistance::load(p, device))
            .transpose()?;
        Ok(Self {
            lpips,
            clip,
            structure,
        })
    }

    fn refs(&self) -> pie_bench::Networks<'_> {
        pie_bench::Networks {
            lpips: self.lpips.as_ref(),
            clip: self.clip.as_ref(),
            structure: self.structure.as_ref(),
        }
    }
}

/// `--pie-bench-dir`: evaluate.py over folders of edited images.
fn run_outputs(a: &EvalArgs, ctx: &Ctx) -> Result<()> {
    let dir = a.pie_bench_dir.as_deref().context("--pie-bench-dir")?;
    let nets = Nets::load(a, &candle_core::Device::Cpu)?;
    let types = a
        .edit_types
        .as_deref()
        .map(pie_bench::parse_edit_types)
        .transpose()?;
    let window = a.ssim_window.unwrap_or(SsimWindow::Gaussian);
    let mut rows = Vec::new();
    let mut per_photo = Vec::new();
    for folder in &a.outputs {
        // PnPInversion's layout output/METHOD/annotation_images names the method.
        let named = match folder.file_name().and_then(|n| n.to_str()) {
            Some("annotation_images") => folder.parent().unwrap_or(folder),
            _ => folder.as_path(),
        };
        let name = named
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| folder.display().to_string());
        let entries = pie_bench::evaluate_outputs(
            dir,
            folder,
            &nets.refs(),
            window,
            types.as_deref(),
            |key| {
                if !ctx.quiet {
                    eprint!("\r{name}: {key}");
                }
            },
        )?;
        if !ctx.quiet {
            eprintln!();
        }
        for e in &entries {
            if let Err(why) = &e.scores {
                eprintln!("{name}: {}: {why}", e.key);
            }
        }
        rows.extend(nulltext_eval::report::rows_from_scores(
            &name,
            &entries,
            a.by_edit_type,
        ));
        per_photo.push((name, entries));
    }
    print!("{}", nulltext_eval::report::to_markdown(&rows));
    if let Some(prefix) = &a.out {
        let with = |tail: &str| {
            let mut p = prefix.as_os_str().to_owned();
            p.push(tail);
            PathBuf::from(p)
        };
        // evaluate.py's layout: one row per photo, the methods' columns side by side.
        let tables: Vec<Vec<String>> = per_photo
            .iter()
            .map(|(name, entries)| {
                pie_bench::evaluate_py_csv(name, entries)
                    .lines()
                    .map(String::from)
                    .collect()
            })
            .collect();
        let mut csv = String::new();
        for i in 0..tables.first().map_or(0, |t| t.len()) {
            let cells: Vec<&str> = tables
                .iter()
                .enumerate()
                .map(|(k, t)| match (k, t[i].split_once(',')) {
                    (0, _) => t[i].as_str(),
                    (_, Some((_, rest))) => rest,
                    (_, None) => "",
                })
                .collect();
            csv += &cells.join(",");
            csv.push('\n');
        }
        nulltext::atomic::write_bytes_atomic(&with(".csv"), csv.as_bytes())?;
        let (t_csv, t_md) = nulltext_eval::report::write(&rows, &with("-table"))?;
        ctx.say(format!(
            "wrote {}, {} and {}",
            with(".csv").display(),
            t_csv.display(),
            t_md.display()
        ));
    }
    Ok(())
}

fn run_pie_bench(
    a: &EvalArgs,
    reference: &RgbImage,
    region: Option<&Mask>,
    device: &candle_core::Device,
) -> Result<()> {
    let region = region.context("--pie-bench needs --mask")?;
    let reference_path = a.reference.clone().unwrap_or_default();
    let loaded = Nets::load(a, device)?;
    let nets = loaded.refs();
    let window = a.ssim_window.unwrap_or(SsimWindow::Gaussian);
    let source_caption = a.source_caption.as_deref().unwrap_or("");
    let target_caption = a.caption.as_deref().unwrap_or("");
    let mut rows = Vec::new();
    for c in &a.candidate {
        let img = pie_bench::last_square(image_io::read_rgb(c)?, reference.width());
        let mut s = pie_bench::score(
            &nets,
            reference,
            &img,
            region,
            (source_caption, target_caption),
            window,
        )
        .with_context(|| {
            format!(
                "comparing {} with {}",
                c.display(),
                reference_path.display()
            )
        })?;
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
                "reference": reference_path.display().to_string(),
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
