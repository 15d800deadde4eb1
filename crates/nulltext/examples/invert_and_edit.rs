//! Invert a picture and edit it with the library, on the bundled shapes model:
//!
//! ```sh
//! cargo run --release --example invert_and_edit
//! ```
//!
//! Null-text inversion finds z_T and per-step unconditional embeddings from which the model
//! reproduces the picture; Prompt-to-Prompt then changes its caption. Writes the
//! reconstruction and the edit to `target/invert_and_edit/`. With real weights, load e.g.
//! `runwayml/stable-diffusion-v1-5` and use your own photo at 512².

use std::path::Path;

use nulltext::image_io::{self, decode_latents};
use nulltext::{edit, invert_image, EditOptions, InvertOptions, NoProgress, StableDiffusion};

fn main() -> nulltext::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/nulltext lies two folders below the repository root");
    let model = root.join("models/shapes");
    let photo = root.join("models/shapes/examples/red-circle-on-blue.png");
    let out = root.join("target/invert_and_edit");

    // A diffusers folder, a single .safetensors checkpoint or a cached Hugging Face repo id.
    let sd = StableDiffusion::load(&model.to_string_lossy(), &Default::default())?;
    let size = sd.default_image_size() as u32;
    let img = image_io::load_image(&photo, Default::default(), size)?;

    // The paper's settings: 50 DDIM steps, w = 7.5, up to 10 Adam iterations per step.
    let prompt = "a red circle on a blue background";
    let (inv, report) = invert_image(
        &sd,
        &img,
        prompt,
        &InvertOptions::default(),
        &mut NoProgress,
    )?;
    let iterations: usize = report.iterations.iter().sum();
    println!(
        "inverted in {iterations} Adam iterations, {} UNet passes",
        report.unet_passes
    );
    nulltext::inversion_file::save(&inv, &out.join("red-circle.nti.safetensors"))?;

    // Row 0 reconstructs the picture; row 1 is the edit.
    let target = "a green circle on a blue background".to_string();
    let res = edit(
        &sd,
        &inv,
        &[target],
        &EditOptions::default(),
        &mut NoProgress,
    )?;
    let images = decode_latents(&sd, &res.latents)?;
    println!(
        "reconstruction PSNR {:.2} dB ({} mode)",
        image_io::psnr(&images[0], &img),
        res.mode
    );
    for (image, name) in images
        .iter()
        .zip(["reconstruction.png", "green-circle.png"])
    {
        let path = out.join(name);
        image_io::save_png(image, &path)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
