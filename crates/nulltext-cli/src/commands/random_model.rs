use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use nulltext::models::random::{
    parameter_counts, write_random_model, write_random_single_file, Preset,
};

use super::context::Ctx;

#[derive(Args)]
pub struct RandomModelArgs {
    /// sd15, sd21-base, sd21-v, tiny, tiny-v, shapes, sdxl (base 1.0's shapes) or tiny-sdxl.
    #[arg(long, default_value = "sd15")]
    preset: Preset,
    /// Copy the configs of this diffusers folder instead of a preset.
    #[arg(long)]
    like: Option<PathBuf>,
    /// Output folder (diffusers layout).
    #[arg(long, short, required_unless_present = "single_file")]
    out: Option<PathBuf>,
    /// Also (or only) write the same weights as one single-file checkpoint in the
    /// original CompVis/A1111 key layout.
    #[arg(long)]
    single_file: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write half-precision files (`*.fp16.safetensors`).
    #[arg(long)]
    fp16: bool,
}

fn read(dir: &std::path::Path, file: &str) -> Result<serde_json::Value> {
    let p = dir.join(file);
    Ok(serde_json::from_str(
        &std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
    )?)
}

pub fn run(a: RandomModelArgs, ctx: &Ctx) -> Result<()> {
    let mut configs = a.preset.configs();
    if let Some(dir) = &a.like {
        configs.unet = read(dir, "unet/config.json")?;
        configs.vae = read(dir, "vae/config.json")?;
        configs.text_encoder = read(dir, "text_encoder/config.json")?;
        configs.text_encoder_2 = read(dir, "text_encoder_2/config.json").ok();
        if let Ok(s) = read(dir, "scheduler/scheduler_config.json") {
            configs.scheduler = s;
        }
    }
    let start = std::time::Instant::now();
    let mut written = Vec::new();
    if let Some(out) = &a.out {
        let sp = crate::progress::spinner(ctx.quiet, &format!("writing {}", out.display()));
        write_random_model(out, &configs, a.seed, a.fp16)?;
        if let Some(s) = sp {
            s.finish_and_clear();
        }
        written.push(out.display().to_string());
    }
    if let Some(path) = &a.single_file {
        let openclip = a.preset.openclip() && a.like.is_none();
        write_random_single_file(path, &configs, openclip, a.seed)?;
        written.push(path.display().to_string());
    }
    let counts = parameter_counts(&configs)?;
    let total: usize = counts.iter().map(|(_, n)| n).sum();
    ctx.say(format!(
        "wrote {} in {:.1} s: {}; {:.1} M parameters in all",
        written.join(" and "),
        start.elapsed().as_secs_f64(),
        counts
            .iter()
            .map(|(c, n)| format!("{c} {:.1} M", *n as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", "),
        total as f64 / 1e6
    ));
    Ok(())
}
