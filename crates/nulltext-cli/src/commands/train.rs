use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use nulltext::CancelFlag;
use nulltext_train::{train, Phase, TrainEvent, TrainOptions, TrainProgress};

use super::context::Ctx;

#[derive(Args)]
pub struct TrainArgs {
    /// The model folder to create (or to resume training in): diffusers layout, with the
    /// training state in `train/`.
    #[arg(long, short)]
    out: PathBuf,
    /// VAE training steps [default: 1500]. Given on a run past its VAE stage and above the
    /// steps it did, it reopens the VAE stage; the UNet stage then runs again (from its
    /// current weights) on the new latents.
    #[arg(long)]
    vae_steps: Option<usize>,
    /// UNet + text encoder training steps.
    #[arg(long, default_value_t = TrainOptions::default().unet_steps)]
    unet_steps: usize,
    #[arg(long, default_value_t = TrainOptions::default().vae_batch)]
    vae_batch: usize,
    #[arg(long, default_value_t = TrainOptions::default().unet_batch)]
    unet_batch: usize,
    #[arg(long, default_value_t = TrainOptions::default().vae_lr)]
    vae_lr: f64,
    #[arg(long, default_value_t = TrainOptions::default().unet_lr)]
    unet_lr: f64,
    /// Weight of the VAE's KL term (per element, against the per-pixel reconstruction loss).
    #[arg(long, default_value_t = TrainOptions::default().vae_kl_weight)]
    vae_kl_weight: f64,
    /// Weight of the UNet stage's attention-grounding term, which pulls each caption word's
    /// cross-attention map onto its part of the scene (0 turns it off).
    #[arg(long, default_value_t = TrainOptions::default().attention_loss)]
    attention_loss: f64,
    /// Seeds the initial weights, the scenes and the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = TrainOptions::default().checkpoint_every)]
    checkpoint_every: usize,
    /// Scenes whose latents the UNet stage trains on (encoded once, the VAE being frozen).
    #[arg(long, default_value_t = TrainOptions::default().latent_pool)]
    latent_pool: usize,
    /// Once trained, also write a copy with half-precision weights and no training state
    /// here (how `models/shapes` is shipped).
    #[arg(long)]
    export_fp16: Option<PathBuf>,
}

struct Bar {
    bar: Option<ProgressBar>,
    quiet: bool,
    cancel: CancelFlag,
    /// Running means of the loss and of the attention-grounding term.
    mean: f64,
    grounding: f64,
}

impl Bar {
    fn losses(&self) -> String {
        if self.grounding.is_nan() {
            format!("loss {:.4}", self.mean)
        } else {
            format!("loss {:.4}, grounding {:.3}", self.mean, self.grounding)
        }
    }
}

impl TrainProgress for Bar {
    fn event(&mut self, e: &TrainEvent) {
        if self.quiet {
            return;
        }
        match e {
            TrainEvent::Stage { phase, step, total } => {
                if let Some(b) = self.bar.take() {
                    b.finish();
                }
                let b = ProgressBar::new(*total as u64).with_position(*step as u64);
                b.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>5} [{bar:30}] {pos}/{len} {msg} ({elapsed} elapsed, ETA {eta})",
                    )
                    .unwrap()
                    .progress_chars("=> "),
                );
                b.set_prefix(phase.name());
                self.bar = Some(b);
                self.mean = f64::NAN;
                self.grounding = f64::NAN;
            }
            TrainEvent::Step {
                step,
                loss,
                grounding,
                ..
            } => {
                let ema = |mean: f64, x: f64| {
                    if mean.is_nan() {
                        x
                    } else {
                        0.98 * mean + 0.02 * x
                    }
                };
                self.mean = ema(self.mean, *loss);
                if let Some(g) = grounding {
                    self.grounding = ema(self.grounding, *g);
                }
                if let Some(b) = &self.bar {
                    b.set_position(*step as u64);
                    b.set_message(self.losses());
                }
            }
            TrainEvent::Checkpoint { phase, step } => {
                if let Some(b) = &self.bar {
                    b.println(format!(
                        "{}: checkpoint at step {step}, {}",
                        phase.name(),
                        self.losses()
                    ));
                }
            }
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

pub fn run(a: TrainArgs, ctx: &Ctx) -> Result<()> {
    let opts = TrainOptions {
        out: a.out.clone(),
        vae_steps: a.vae_steps.unwrap_or(TrainOptions::default().vae_steps),
        extend_vae: a.vae_steps.is_some(),
        unet_steps: a.unet_steps,
        vae_batch: a.vae_batch,
        unet_batch: a.unet_batch,
        vae_lr: a.vae_lr,
        unet_lr: a.unet_lr,
        vae_kl_weight: a.vae_kl_weight,
        attention_loss: a.attention_loss,
        seed: a.seed,
        checkpoint_every: a.checkpoint_every,
        latent_pool: a.latent_pool,
        ..TrainOptions::default()
    };
    let mut bar = Bar {
        bar: None,
        quiet: ctx.quiet,
        cancel: ctx.cancel.clone(),
        mean: f64::NAN,
        grounding: f64::NAN,
    };
    let state = train(&opts, &mut bar)?;
    if let Some(b) = bar.bar.take() {
        b.finish();
    }
    let loss = |p| {
        state
            .recent_loss(p, 100)
            .map_or("-".to_string(), |l| format!("{l:.4}"))
    };
    if state.phase == Phase::Done {
        if let Some(dest) = &a.export_fp16 {
            nulltext_train::export_fp16(&a.out, dest)?;
            ctx.say(format!("wrote {} (half-precision weights)", dest.display()));
        }
        ctx.say(format!(
            "trained {} in {:.1} min: VAE loss {} (mean of the last 100 steps), UNet loss {}",
            a.out.display(),
            state.seconds / 60.0,
            loss(Phase::Vae),
            loss(Phase::Unet)
        ));
    } else {
        ctx.say(format!(
            "stopped at {} step {}; run the same command again to resume",
            state.phase.name(),
            state.step
        ));
        // the checkpoint is written: exit as interrupted, without the generic
        // "nothing was written"
        std::process::exit(130);
    }
    Ok(())
}
