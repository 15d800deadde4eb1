use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use nulltext::figures::{self, Against};
use nulltext::trace::Trace;

use super::Ctx;

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
    let mut chart = figures::figure4(&traces, against).size(a.width, a.height);
    if let Some(t) = a.title {
        chart.title = t;
    }
    figures::save(&chart, &a.out)?;
    for t in &traces {
        for p in &t.points {
            ctx.say(format!(
                "{:<18} N = {:>2} {:>5} iterations  PSNR {:>6.2} dB (vs VAE {:>6.2} dB)",
                t.method, p.budget, p.iterations, p.psnr, p.psnr_vs_vae
            ));
        }
    }
    ctx.say(format!("wrote {}", a.out.display()));
    Ok(())
}
