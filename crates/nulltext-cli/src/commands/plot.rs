use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use nulltext_eval::figures::{self, Against, Compute, Quality};
use nulltext_eval::trace::Trace;

use super::context::Ctx;

#[derive(Args)]
pub struct PlotArgs {
    /// Traces written by `nulltext invert --trace` (one per method) for the same image.
    #[arg(required = true)]
    traces: Vec<PathBuf>,
    /// The chart to write: .png, or .svg for a vector figure.
    #[arg(long, short)]
    out: PathBuf,
    /// PSNR against the input image (the paper's choice) or against its VAE round trip
    /// (for models whose VAE cannot reproduce photos, e.g. random test models).
    #[arg(long, value_enum, default_value = "input")]
    against: AgainstArg,
    /// The x axis: Figure 4's null-text iterations, or what each inversion cost (UNet
    /// passes or seconds), which puts every method on one scale.
    #[arg(long, value_enum, default_value = "iterations")]
    x: XArg,
    /// The y axis: the reconstruction's PSNR, or the traced edit's PSNR outside the region
    /// it may change (traces made with `invert --trace-edit`).
    #[arg(long, value_enum, default_value = "reconstruction")]
    y: YArg,
    /// A title instead of the default.
    #[arg(long)]
    title: Option<String>,
    #[arg(long, default_value_t = 900)]
    width: u32,
    #[arg(long, default_value_t = 560)]
    height: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum AgainstArg {
    Input,
    Vae,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum XArg {
    Iterations,
    UnetPasses,
    Seconds,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum YArg {
    Reconstruction,
    EditBackground,
}

pub fn run(a: PlotArgs, ctx: &Ctx) -> Result<()> {
    let traces: Vec<Trace> = a
        .traces
        .iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| {
                format!(
                    "{}: not a trace written by `nulltext invert --trace`",
                    p.display()
                )
            })
        })
        .collect::<Result<_>>()?;
    let against = match a.against {
        AgainstArg::Input => Against::Input,
        AgainstArg::Vae => Against::Vae,
    };
    let quality = match a.y {
        YArg::Reconstruction => Quality::Reconstruction(against),
        YArg::EditBackground => {
            if traces.iter().all(|t| t.edit_target.is_none()) {
                bail!("--y edit-background needs traces made with `invert --trace-edit`");
            }
            Quality::EditBackground
        }
    };
    let chart = match (a.x, a.y) {
        (XArg::Iterations, YArg::Reconstruction) => figures::figure4(&traces, against),
        (XArg::Iterations, YArg::EditBackground) => {
            bail!("--y edit-background is drawn against --x unet-passes or seconds")
        }
        (XArg::UnetPasses, _) => {
            figures::quality_per_compute(&traces, Compute::UnetPasses, quality)
        }
        (XArg::Seconds, _) => figures::quality_per_compute(&traces, Compute::Seconds, quality),
    };
    let mut chart = chart.size(a.width, a.height);
    if let Some(t) = a.title {
        chart.title = t;
    }
    figures::save(&chart, &a.out)?;
    for t in &traces {
        for p in &t.points {
            let edit = p.edit_background_psnr.map_or(String::new(), |v| {
                format!(", edit outside its region {v:>6.2} dB")
            });
            ctx.say(format!(
                "{:<18} N = {:>2} {:>5} iterations {:>6} UNet passes {:>8.1} s  PSNR {:>6.2} dB \
                 (vs VAE {:>6.2} dB){edit}",
                t.method, p.budget, p.iterations, p.unet_passes, p.seconds, p.psnr, p.psnr_vs_vae
            ));
        }
    }
    ctx.say(format!("wrote {}", a.out.display()));
    Ok(())
}
