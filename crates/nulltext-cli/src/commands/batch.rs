use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nulltext::batch::{self, BatchOptions, ItemEvent, Shard};

use super::{Ctx, ModelArg};

#[derive(Args)]
pub struct BatchArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A JSON-lines file, one item per line: {"id": "cat-1", "image": "cat.jpg", "prompt":
    /// "a cat sitting on a table", "edits": ["a tiger sitting on a table", {"target": "…",
    /// "cross_replace": "0.6", "blend": "cat:tiger"}], "mask": "cat-mask.png", "crop":
    /// "0,0,0,0"}; paths relative to the manifest.
    manifest: PathBuf,
    /// Where each item's folder (items/ID/) and the summary go.
    #[arg(long)]
    out_dir: PathBuf,
    /// Take only every N-th item from the I-th (0-based): I/N, e.g.
    /// $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT or $JOB_COMPLETION_INDEX/N.
    #[arg(long, default_value = "0/1")]
    shard: Shard,
    /// How every item is inverted.
    #[command(flatten)]
    settings: super::InvertSettings,
    /// Also measure LPIPS with these weights (the `lpips` package's state dict as
    /// safetensors: `tools/lpips_reference.py export`; AlexNet or SqueezeNet).
    #[arg(long)]
    lpips: Option<PathBuf>,
    /// Also measure the CLIP score of each edit with its caption, with this transformers
    /// CLIP folder (config.json + model.safetensors, e.g. openai/clip-vit-large-patch14).
    #[arg(long)]
    clip: Option<PathBuf>,
}

pub fn run(a: BatchArgs, ctx: &Ctx) -> Result<()> {
    let manifest = batch::read_manifest(&a.manifest)?;
    let sd = ctx.load(&a.model)?;
    let opts = BatchOptions {
        invert: a.settings.options(),
        size: a.settings.size,
        shard: a.shard,
        lpips: a.lpips.clone(),
        clip: a.clip.clone(),
        limits: a.settings.limits(),
    };
    let mine = manifest
        .items
        .iter()
        .filter(|i| opts.shard.contains(i))
        .count();
    let multi = MultiProgress::with_draw_target(if ctx.quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    let items_bar = multi.add(ProgressBar::new(mine as u64));
    items_bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>24} [{bar:30}] {pos}/{len} {msg} ({elapsed}, ETA {eta})",
        )?
        .progress_chars("=> "),
    );
    items_bar.set_prefix("items");
    let mut bars = ctx
        .bars()
        .with_inner_steps(a.settings.inner_steps)
        .in_multi(multi.clone());
    let start = std::time::Instant::now();
    let report = batch::run(
        &sd,
        &manifest,
        &a.out_dir,
        &opts,
        &mut bars,
        |ev| match ev {
            ItemEvent::Start { id, .. } => items_bar.set_message(id.to_string()),
            ItemEvent::Skipped { .. } => {
                // Finished before: not part of this run's rate.
                items_bar.dec_length(1);
            }
            ItemEvent::Done { id, result } => {
                items_bar.inc(1);
                let _ = multi.println(format!(
                    "{id}: reconstruction PSNR {:.2} dB, {} edit{}",
                    result.reconstruction.psnr,
                    result.edits.len(),
                    if result.edits.len() == 1 { "" } else { "s" }
                ));
            }
            ItemEvent::Failed { id, error } => {
                items_bar.inc(1);
                let _ = multi.println(format!("{id}: failed: {error}"));
            }
        },
    );
    drop(bars);
    items_bar.finish_and_clear();
    let report = match report {
        Ok(r) => r,
        Err(nulltext::Error::Cancelled) => {
            // Finished items stay; the interrupted one left only whole files (its inversion
            // is reused if it got that far).
            let summary = batch::write_summary(&manifest, &a.out_dir)?;
            eprintln!(
                "interrupted: {} of {} items are finished and kept; run the same command again to do the rest",
                summary.finished,
                manifest.items.len()
            );
            std::process::exit(130);
        }
        Err(e) => return Err(e.into()),
    };
    let summary = batch::write_summary(&manifest, &a.out_dir)?;
    ctx.say(format!(
        "shard {}/{}: {} done, {} skipped (finished before), {} failed in {:.1} s",
        a.shard.index,
        a.shard.count,
        report.done.len(),
        report.skipped.len(),
        report.failed.len(),
        start.elapsed().as_secs_f64()
    ));
    let f = |k: &str| {
        summary.means[k]
            .as_f64()
            .map_or("-".to_string(), |v| format!("{v:.3}"))
    };
    ctx.say(format!(
        "all shards: {} of {} items finished, {} failed, {} pending; mean reconstruction PSNR {} dB, SSIM {}; edits: background PSNR {} dB, SSIM {}",
        summary.finished,
        manifest.items.len(),
        summary.failed.len(),
        summary.pending.len(),
        f("reconstruction_psnr"),
        f("reconstruction_ssim"),
        f("background_psnr"),
        f("background_ssim"),
    ));
    ctx.say(format!(
        "wrote {} and {}",
        a.out_dir.join("summary.csv").display(),
        a.out_dir.join("summary.json").display()
    ));
    if !report.failed.is_empty() {
        for (id, e) in &report.failed {
            eprintln!("{id}: {e}");
        }
        bail!(
            "{} item{} failed (see items/ID/error.json); a rerun retries them",
            report.failed.len(),
            if report.failed.len() == 1 { "" } else { "s" }
        );
    }
    Ok(())
}
