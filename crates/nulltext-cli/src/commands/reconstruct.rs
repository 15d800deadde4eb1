use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::context::{Ctx, ModelArg};

#[derive(Args)]
pub struct ReconstructArgs {
    #[command(flatten)]
    model: ModelArg,
    /// An inversion file written by `nulltext invert`.
    #[arg(long, short)]
    inversion: PathBuf,
    /// Output PNG.
    #[arg(long, short)]
    out: PathBuf,
    /// Also write the final latents (safetensors, tensor `latents`).
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// Use the inversion even if it was made with other weights.
    #[arg(long)]
    force: bool,
}

pub fn run(a: ReconstructArgs, ctx: &Ctx) -> Result<()> {
    for p in [Some(&a.out), a.save_latents.as_ref()]
        .into_iter()
        .flatten()
    {
        nulltext::atomic::check_target(p)?;
    }
    let inv = nulltext::inversion_file::load(&a.inversion)?;
    let sd = ctx.load(&a.model)?;
    inv.check_model(&sd, a.force)?;
    let z = nulltext::reconstruct(&sd, &inv, &mut ctx.bars())?;
    let img = nulltext::image_io::decode_latents(&sd, &z)?.remove(0);
    if let Some(p) = &a.save_latents {
        super::edit::save_latents(&z, p)?;
        ctx.wrote(p);
    }
    nulltext::image_io::save_png(&img, &a.out)?;
    ctx.say(format!("wrote {}", a.out.display()));
    Ok(())
}
