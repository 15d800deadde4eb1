//! `nulltext demo`: the main job on the bundled shapes model, from the repository root.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Parser};

use super::context::Ctx;

#[derive(Args)]
pub struct DemoArgs {
    /// Model (default: the bundled shapes model, trained by `nulltext train`).
    #[arg(long, short = 'm', default_value = "models/shapes")]
    model: String,
    /// Image (default: a bundled generated scene).
    #[arg(
        long,
        short,
        default_value = "models/shapes/examples/red-circle-on-blue.png"
    )]
    image: PathBuf,
    #[arg(long, short, default_value = "a red circle on a blue background")]
    prompt: String,
    #[arg(long, short, default_value = "a green circle on a blue background")]
    target: String,
    /// Where the inversion, the edited images, the grid and the attention maps go.
    #[arg(long, short, default_value = "demo")]
    out_dir: PathBuf,
    /// Adam iterations per step (10 in the paper).
    #[arg(long, default_value_t = 10)]
    inner_steps: usize,
}

#[derive(Parser)]
#[command(no_binary_name = true)]
struct Wrap<T: Args> {
    #[command(flatten)]
    args: T,
}

fn parse<T: Args>(argv: Vec<String>) -> Result<T> {
    Ok(Wrap::<T>::try_parse_from(argv)?.args)
}

pub fn run(a: DemoArgs, ctx: &Ctx) -> Result<()> {
    if !std::path::Path::new(&a.model).exists() || !a.image.exists() {
        bail!(
            "{} or {} not found: run `nulltext demo` from the repository root, or pass --model and --image",
            a.model,
            a.image.display()
        );
    }
    let inv = a.out_dir.join("inversion.nti.safetensors");
    let s = |p: &std::path::Path| p.display().to_string();
    ctx.say(format!(
        "1/2 inverting {} as \"{}\"",
        a.image.display(),
        a.prompt
    ));
    let inv_args = vec![
        "--model".into(),
        a.model.clone(),
        "--image".into(),
        s(&a.image),
        "--prompt".into(),
        a.prompt.clone(),
        "--out".into(),
        s(&inv),
        "--inner-steps".into(),
        a.inner_steps.to_string(),
        "--reconstruction".into(),
        s(&a.out_dir.join("reconstruction.png")),
    ];
    super::invert::run(parse(inv_args)?, ctx)?;
    // Attention maps the latent's size supports: 8×8 from the shapes model's 8×8 latents
    // (--attention-downscale 1), the reference's 16×16 at 512 px (4).
    let (_, _, h, w) = nulltext::inversion_file::load(&inv)?.latent_t.dims4()?;
    let downscale = nulltext::edit::attention_downscale_for((h, w));
    ctx.say(format!("2/2 editing to \"{}\"", a.target));
    let edit_args = vec![
        "--model".into(),
        a.model.clone(),
        "--inversion".into(),
        s(&inv),
        "--target".into(),
        a.target.clone(),
        "--image".into(),
        s(&a.image),
        "--out-dir".into(),
        s(&a.out_dir),
        "--grid".into(),
        s(&a.out_dir.join("grid.png")),
        "--attention-maps".into(),
        s(&a.out_dir.join("attention.png")),
        "--attention-downscale".into(),
        downscale.to_string(),
    ];
    super::edit::run(parse(edit_args)?, ctx)
}
