use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::Tensor;
use clap::Args;
use nulltext::edit::{BlendOptions, CrossReplace, EditMode, EditOptions, Window};
use nulltext::image_io;
use nulltext::plot::render;

use super::context::{Ctx, ModelArg};

#[derive(Args)]
pub struct EditArgs {
    #[command(flatten)]
    model: ModelArg,
    /// An inversion file written by `nulltext invert`.
    #[arg(long, short)]
    inversion: PathBuf,
    /// A target caption; repeat for several edits in one batch.
    #[arg(long, short, required = true)]
    target: Vec<String>,
    /// auto (replace for equal word counts, else refine), replace (word swap) or refine
    /// (words added or removed).
    #[arg(long, default_value = "auto")]
    mode: EditMode,
    /// Cross-attention replacement window: a fraction of the steps (0.8), a range
    /// (0.1:0.8), optionally with per-word windows: "0.8,tiger=0.4".
    #[arg(long, default_value = "0.8")]
    cross_replace: CrossReplace,
    /// Self-attention injection window: a fraction (0.5) or a range (0.1:0.5).
    #[arg(long, default_value = "0.5")]
    self_replace: Window,
    /// Local blend: SOURCE_WORDS:TARGET_WORDS, e.g. "cat:tiger"; only the region these
    /// words attend to changes.
    #[arg(long)]
    blend: Option<String>,
    /// Blend mask threshold.
    #[arg(long, default_value_t = 0.3)]
    blend_threshold: f64,
    /// Words whose attention is removed from the blend mask (space or + separated).
    #[arg(long)]
    blend_subtract: Option<String>,
    /// Blend masks and attention maps come from the cross-attention layers at 1/N of the
    /// latent size: 4 (16×16 at 512 px, the reference's choice), 2 or 1 (sharper masks for
    /// models with very small latents).
    #[arg(long, default_value_t = 4)]
    attention_downscale: usize,
    /// Attention reweighting of target words: "tiger=2" or "fluffy=2,cat=0.5".
    #[arg(long)]
    reweight: Option<String>,
    /// Guidance scale to sample with (default: the inversion's). A direct inversion edits
    /// only at the scale it was made with.
    #[arg(long)]
    guidance: Option<f64>,
    /// SDEdit from the inverted trajectory at this fraction of the noise (e.g. 0.6),
    /// instead of Prompt-to-Prompt.
    #[arg(long)]
    sdedit: Option<f64>,
    /// Folder for the reconstruction and the edited images.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// A captioned grid: input | reconstruction | each edit.
    #[arg(long)]
    grid: Option<PathBuf>,
    /// The original photo, shown in the grid (default: the VAE decoding of its latent).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Cross-attention maps of every token of every prompt, averaged over the steps and
    /// the layers at 1/4 latent resolution (see --attention-downscale).
    #[arg(long)]
    attention_maps: Option<PathBuf>,
    /// Final latents as safetensors (tensor `latents`, [B, 4, h, w], row 0 the source).
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// Use the inversion even if it was made with other weights.
    #[arg(long)]
    force: bool,
}

pub fn save_latents(z: &Tensor, path: &Path) -> Result<()> {
    let z = z.to_device(&candle_core::Device::Cpu)?.contiguous()?;
    let bytes = safetensors::tensor::serialize([("latents", &z)], None)?;
    nulltext::atomic::write_bytes_atomic(path, &bytes)?;
    Ok(())
}

fn slug(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    out.trim_matches('-').chars().take(48).collect()
}

pub fn run(a: EditArgs, ctx: &Ctx) -> Result<()> {
    let limits = nulltext::Limits::default();
    for t in &a.target {
        limits.check_prompt("--target", t)?;
    }
    let dir_probe = a.out_dir.as_ref().map(|d| d.join("reconstruction.png"));
    for p in [&dir_probe, &a.grid, &a.attention_maps, &a.save_latents]
        .into_iter()
        .flatten()
    {
        nulltext::atomic::check_target(p)?;
    }
    let inv = nulltext::inversion_file::load(&a.inversion)?;
    let mut opts = EditOptions {
        mode: a.mode,
        cross_replace: a.cross_replace.clone(),
        self_replace: a.self_replace,
        sdedit: a.sdedit,
        record_attention: a.attention_maps.is_some(),
        attention_downscale: a.attention_downscale,
        guidance: a.guidance,
        ..Default::default()
    };
    nulltext::edit::edit_guidance(&inv, opts.guidance)?;
    if let Some(b) = &a.blend {
        let mut bo = BlendOptions::parse(b)?;
        bo.threshold = a.blend_threshold;
        if let Some(s) = &a.blend_subtract {
            bo.subtract = nulltext::edit::parse_words(s);
        }
        opts.blend = Some(bo);
    } else if a.blend_subtract.is_some() {
        bail!("--blend-subtract needs --blend");
    }
    if let Some(r) = &a.reweight {
        opts.reweight = nulltext::edit::parse_reweight(r)?;
    }
    let sd = ctx.load(&a.model)?;
    inv.check_model(&sd, a.force)?;
    // Check prompts, words and windows before any sampling.
    let (_, _, h, w) = inv.latent_t.dims4()?;
    nulltext::edit::check_edit(&sd, &inv.prompt, &a.target, &opts, inv.num_steps, (h, w))?;
    if opts.sdedit.is_none() {
        // Maps of 2×2 cells cannot show or mask where a word is.
        let (mh, mw) = nulltext::edit::attention_map_grid((h, w), opts.attention_downscale);
        if (opts.blend.is_some() || opts.record_attention) && mh.min(mw) <= 2 {
            let better = nulltext::edit::attention_downscale_for((h, w));
            let (bh, bw) = nulltext::edit::attention_map_grid((h, w), better);
            eprintln!(
                "warning: --attention-downscale {} leaves {mh}×{mw} attention maps on this \
                 model's {h}×{w} latents; --attention-downscale {better} gives {bh}×{bw}",
                opts.attention_downscale
            );
        }
    }
    for t in &a.target {
        if let Some(cut) = sd.tokenizer.encode_padded(t).truncated {
            eprintln!("warning: target \"{t}\" is longer than 77 tokens; cut off: \"{cut}\"");
        }
    }
    let start = std::time::Instant::now();
    let res = nulltext::edit::edit(&sd, &inv, &a.target, &opts, &mut ctx.bars())?;
    let secs = start.elapsed().as_secs_f64();
    let images = nulltext::image_io::decode_latents(&sd, &res.latents)?;
    let out_dir = match (&a.out_dir, &a.grid, &a.save_latents, &a.attention_maps) {
        (Some(d), ..) => Some(d.clone()),
        (None, None, None, None) => Some(PathBuf::from("edits")),
        _ => None,
    };
    let mut written = Vec::new();
    if let Some(dir) = &out_dir {
        let p = dir.join("reconstruction.png");
        image_io::save_png(&images[0], &p)?;
        ctx.wrote(&p);
        written.push(p);
        for (k, (img, t)) in images[1..].iter().zip(&a.target).enumerate() {
            let p = dir.join(format!("{:02}-{}.png", k + 1, slug(t)));
            image_io::save_png(img, &p)?;
            ctx.wrote(&p);
            written.push(p);
        }
    }
    if let Some(p) = &a.save_latents {
        save_latents(&res.latents, p)?;
        ctx.wrote(p);
        written.push(p.clone());
    }
    if let Some(p) = &a.grid {
        let (w, h) = images[0].dimensions();
        let input = match &a.image {
            Some(path) => (
                image_io::load_image(path, Default::default(), w.min(h))?,
                "input".to_string(),
            ),
            None => match &inv.image_latent {
                Some(z0) => (
                    nulltext::image_io::decode_latents(&sd, z0)?.remove(0),
                    "input (VAE)".to_string(),
                ),
                None => (image::RgbImage::new(w, h), "input".to_string()),
            },
        };
        let mut items = vec![
            input,
            (images[0].clone(), format!("reconstruction: {}", inv.prompt)),
        ];
        for (img, t) in images[1..].iter().zip(&a.target) {
            items.push((img.clone(), t.clone()));
        }
        image_io::save_png(&render::captioned_row(&items), p)?;
        ctx.wrote(p);
        written.push(p.clone());
    }
    if let Some(p) = a
        .attention_maps
        .as_ref()
        .filter(|_| res.attention_maps.is_some())
    {
        let rows = res.attention_strips(&sd.tokenizer)?;
        image_io::save_png(&render::stack_vertical(&rows), p)?;
        ctx.wrote(p);
        written.push(p.clone());
    }
    ctx.say(format!(
        "edited \"{}\" → {} target{} ({}) in {secs:.1} s",
        inv.prompt,
        a.target.len(),
        if a.target.len() == 1 { "" } else { "s" },
        if a.sdedit.is_some() {
            "sdedit".to_string()
        } else {
            res.mode.to_string()
        }
    ));
    for p in written {
        ctx.say(format!("wrote {}", p.display()));
    }
    Ok(())
}
