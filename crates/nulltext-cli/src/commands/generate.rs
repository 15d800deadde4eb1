use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use nulltext::text2img::{generate, GenerateOptions};

use super::context::{Ctx, ModelArg};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    #[arg(long, short)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Image height in pixels (default: the model's size).
    #[arg(long)]
    height: Option<usize>,
    /// Image width in pixels (default: the model's size).
    #[arg(long)]
    width: Option<usize>,
    /// Output PNG.
    #[arg(long, short)]
    out: PathBuf,
}

pub fn run(a: GenerateArgs, ctx: &Ctx) -> Result<()> {
    nulltext::atomic::check_target(&a.out)?;
    let sd = ctx.load(&a.model)?;
    let size = sd.default_image_size();
    let limits = nulltext::Limits::default();
    let f = sd.vae_scale_factor() as u32;
    let side = |flag: &str, v: Option<usize>| {
        let v = v.map(|v| u32::try_from(v).unwrap_or(u32::MAX));
        limits.image_size(flag, v, size, f).map(|s| s as usize)
    };
    let opts = GenerateOptions {
        height: side("--height", a.height)?,
        width: side("--width", a.width)?,
        prompt: a.prompt,
        negative_prompt: a.negative_prompt,
        seed: a.seed,
        steps: a.steps,
        guidance: a.guidance,
    };
    let start = std::time::Instant::now();
    let z = generate(&sd, &opts, &mut ctx.bars())?;
    let img = nulltext::image_io::decode_latents(&sd, &z)?.remove(0);
    nulltext::image_io::save_png(&img, &a.out)?;
    ctx.say(format!(
        "wrote {} ({}×{}, {} steps in {:.1} s)",
        a.out.display(),
        opts.width,
        opts.height,
        opts.steps,
        start.elapsed().as_secs_f64()
    ));
    Ok(())
}
