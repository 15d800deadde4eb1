use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use nulltext::text2img::{generate, GenerateOptions};

use super::{Ctx, ModelArg};

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
    let sd = ctx.load(&a.model)?;
    let size = sd.default_image_size();
    let opts = GenerateOptions {
        prompt: a.prompt,
        negative_prompt: a.negative_prompt,
        seed: a.seed,
        steps: a.steps,
        guidance: a.guidance,
        height: a.height.unwrap_or(size),
        width: a.width.unwrap_or(size),
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
