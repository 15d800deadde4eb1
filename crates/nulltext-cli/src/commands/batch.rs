use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nulltext_eval::batch::{self, BatchOptions, ItemEvent, Shard};
use nulltext_eval::metrics::SsimWindow;
use nulltext_eval::{cluster, pie_bench, report};

use super::context::{Ctx, ModelArg};

#[derive(Args)]
pub struct BatchArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A JSON-lines file, one item per line: {"id": "cat-1", "image": "cat.jpg", "prompt":
    /// "a cat sitting on a table", "edits": ["a tiger sitting on a table", {"target": "…",
    /// "cross_replace": "0.6", "blend": "cat:tiger"}], "mask": "cat-mask.png", "crop":
    /// "0,0,0,0"}; paths relative to the manifest.
    #[arg(required_unless_present = "pie_bench", conflicts_with = "pie_bench")]
    manifest: Option<PathBuf>,
    /// Run PIE-Bench from its folder (mapping_file.json, annotation_images/) as its
    /// run_editing_p2p.py does, measure it as its evaluate.py does, and write the table to
    /// OUT_DIR/report.csv and report.md.
    #[arg(long, value_name = "DIR")]
    pie_bench: Option<PathBuf>,
    /// With --pie-bench: only these edit types (0–9), e.g. 0,1,2.
    #[arg(long, requires = "pie_bench")]
    edit_types: Option<String>,
    /// Where each item's folder (items/ID/) and the summary go.
    #[arg(long)]
    out_dir: PathBuf,
    /// Take only every N-th item from the I-th (0-based): I/N, or `auto` for the task of a
    /// Slurm job array, Kubernetes Indexed Job, AWS Batch array job or torchrun.
    #[arg(long, default_value = "0/1")]
    shard: ShardArg,
    /// The number of tasks, for --shard auto where the scheduler does not say it
    /// (Kubernetes, AWS Batch); or set NULLTEXT_SHARD_COUNT.
    #[arg(long)]
    shard_count: Option<usize>,
    /// How every item is inverted.
    #[command(flatten)]
    settings: super::context::InvertSettings,
    /// Also measure LPIPS with these weights (the `lpips` package's state dict as
    /// safetensors: `tools/lpips_reference.py export`; AlexNet or SqueezeNet).
    #[arg(long)]
    lpips: Option<PathBuf>,
    /// Also measure the CLIP score of each edit with its caption, with this transformers
    /// CLIP folder (config.json + model.safetensors, e.g. openai/clip-vit-large-patch14).
    #[arg(long)]
    clip: Option<PathBuf>,
    /// Also PIE-Bench's structure distance of each edit, with these DINO ViT-B/8 weights
    /// (DINO's state dict as safetensors; docs/evaluation.md).
    #[arg(long)]
    dino: Option<PathBuf>,
    /// SSIM window: uniform (scikit-image's default), gaussian (PIE-Bench's published
    /// numbers; the default with --pie-bench) or gaussian-padded (torchmetrics ≥ 1.4.2).
    #[arg(long)]
    ssim_window: Option<SsimWindow>,
}

/// `--shard`: fixed, or from the scheduler's environment.
#[derive(Clone, Copy)]
enum ShardArg {
    Fixed(Shard),
    Auto,
}

impl std::str::FromStr for ShardArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "auto" {
            Ok(ShardArg::Auto)
        } else {
            Ok(ShardArg::Fixed(
                s.parse().map_err(|e| format!("{e}, or auto"))?,
            ))
        }
    }
}

pub fn run(a: BatchArgs, ctx: &Ctx) -> Result<()> {
    let shard = match a.shard {
        ShardArg::Fixed(s) => s,
        ShardArg::Auto => {
            let (s, by) = cluster::resolve(|k| std::env::var(k).ok(), a.shard_count)?;
            ctx.say(format!(
                "shard {}/{} from the {}",
                s.index,
                s.count,
                by.name()
            ));
            s
        }
    };
    let manifest = match (&a.pie_bench, &a.manifest) {
        (Some(dir), _) => {
            let types = a
                .edit_types
                .as_deref()
                .map(pie_bench::parse_edit_types)
                .transpose()?;
            pie_bench::import(dir, &a.out_dir, types.as_deref())?
        }
        (None, Some(m)) => batch::read_manifest(m)?,
        (None, None) => bail!("give a manifest or --pie-bench DIR"),
    };
    let sd = ctx.load(&a.model)?;
    let opts = BatchOptions {
        invert: a.settings.options(),
        size: a.settings.size,
        shard,
        lpips: a.lpips.clone(),
        clip: a.clip.clone(),
        dino: a.dino.clone(),
        ssim: a.ssim_window.unwrap_or(if a.pie_bench.is_some() {
            SsimWindow::Gaussian
        } else {
            SsimWindow::Uniform7
        }),
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
        shard.index,
        shard.count,
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
    if a.pie_bench.is_some() {
        let rows = report::collect(std::slice::from_ref(&a.out_dir), false)?;
        let (csv, md) = report::write(&rows, &a.out_dir.join("report"))?;
        ctx.say(format!(
            "PIE-Bench table of the items finished so far: {} and {}",
            csv.display(),
            md.display()
        ));
    }
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
