//! The one worker: it owns the model's time, takes jobs in order, runs them with the
//! library, forwards the library's progress events to the job's listeners and publishes
//! each result whole.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use candle_core::Tensor;
use image::RgbImage;
use nulltext::edit::EditOptions;
use nulltext::image_io::{psnr, save_png, tensor_to_images};
use nulltext::{Event, Progress, StableDiffusion, Stage};

use crate::app::App;
use crate::error::api_wording;
use crate::ids::Id;
use crate::jobs::{now_ms, Job, JobEvent, JobKind, JobState, ProgressInfo, Work, INTERRUPTED};
use crate::params::{EditRequest, InvertParams};
use crate::store::{
    EditRecord, InversionRecord, StoredImage, INPUT_PNG, INVERSION_FILE, RECONSTRUCTION_PNG,
};

/// Forwards the library's events to a job's record and listeners; asks the library to
/// stop when the job is cancelled.
struct Forward<'a> {
    job: &'a Job,
    inner_steps: usize,
}

impl Progress for Forward<'_> {
    fn event(&mut self, event: &Event) {
        let job = self.job;
        match *event {
            Event::Start { stage, total } => {
                let p = job.update_progress(|p| {
                    *p = ProgressInfo {
                        stage: stage.name().into(),
                        total,
                        ..Default::default()
                    }
                });
                job.emit(JobEvent::Progress(p));
            }
            Event::Advance { done, .. } => {
                let p = job.update_progress(|p| p.done = done);
                job.emit(JobEvent::Progress(p));
            }
            Event::Iteration {
                step,
                iteration,
                loss,
            } => {
                job.update_progress(|p| {
                    p.step = Some(step);
                    p.iteration = Some(iteration);
                    p.loss = Some(loss);
                });
                job.emit(JobEvent::Iteration {
                    step,
                    iteration,
                    loss,
                });
            }
            Event::StepDone {
                step,
                iterations,
                loss,
            } => {
                // An early-stopped step skips its remaining iterations.
                let inner = self.inner_steps;
                let p = job.update_progress(|p| p.done = p.done.max((step + 1) * inner));
                job.emit(JobEvent::Step {
                    step,
                    iterations,
                    loss,
                });
                job.emit(JobEvent::Progress(p));
            }
            Event::Finish { .. } => {
                let p = job.update_progress(|p| p.done = p.total);
                job.emit(JobEvent::Progress(p));
            }
        }
    }

    fn cancelled(&self) -> bool {
        self.job.cancel.is_cancelled()
    }
}

fn check_cancelled(job: &Job) -> Result<()> {
    if job.cancel.is_cancelled() {
        return Err(nulltext::Error::Cancelled.into());
    }
    Ok(())
}

/// Latents `[B, C, h, w]` → images, one row at a time.
fn decode(sd: &StableDiffusion, latents: &Tensor, progress: &mut Forward) -> Result<Vec<RgbImage>> {
    let n = latents.dim(0)?;
    progress.event(&Event::Start {
        stage: Stage::Decode,
        total: n,
    });
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        check_cancelled(progress.job)?;
        let x = sd.latent_to_image(&latents.narrow(0, i, 1)?)?;
        out.extend(tensor_to_images(&x)?);
        progress.event(&Event::Advance {
            stage: Stage::Decode,
            done: i + 1,
        });
    }
    progress.event(&Event::Finish {
        stage: Stage::Decode,
    });
    Ok(out)
}

fn invert(app: &App, job: &Job, image: &RgbImage, params: &InvertParams) -> Result<()> {
    let sd = &app.sd;
    let start = Instant::now();
    let record = job.record();
    let opts = &params.options;
    let mut progress = Forward {
        job,
        inner_steps: opts.inner_steps,
    };
    let (inv, report) = nulltext::invert_image(sd, image, &params.prompt, opts, &mut progress)?;
    let latent = match &report.final_latent {
        Some(z) => z.clone(),
        None => nulltext::reconstruct(sd, &inv, &mut progress)?,
    };
    let rec = decode(sd, &latent, &mut progress)?.remove(0);
    check_cancelled(job)?;
    let staging = app.store.stage()?;
    nulltext::inversion_file::save(&inv, &staging.path(INVERSION_FILE))?;
    save_png(image, &staging.path(INPUT_PNG))?;
    save_png(&rec, &staging.path(RECONSTRUCTION_PNG))?;
    let db = psnr(&rec, image);
    let (width, height) = image.dimensions();
    let inversion = InversionRecord {
        id: record.inversion_id,
        job_id: record.id,
        prompt: params.prompt.clone(),
        method: opts.method.to_string(),
        steps: opts.num_steps,
        inner_steps: opts.inner_steps,
        guidance: opts.guidance,
        early_stop: opts.early_stop,
        width,
        height,
        iterations: report.iterations.iter().sum(),
        psnr: db.is_finite().then_some(db),
        seconds: start.elapsed().as_secs_f64(),
        model: sd.name.clone(),
        model_fingerprint: sd.fingerprint.clone(),
        created_ms: now_ms(),
    };
    app.store.publish_inversion(staging, inversion)
}

fn edit(
    app: &App,
    job: &Job,
    edit_id: Id,
    request: &EditRequest,
    opts: &EditOptions,
) -> Result<()> {
    let sd = &app.sd;
    let start = Instant::now();
    let record = job.record();
    let inv_id = record.inversion_id;
    let path = app
        .store
        .inversion_file(inv_id, INVERSION_FILE)
        .ok_or_else(|| anyhow!("inversion {inv_id} was deleted"))?;
    let inv = nulltext::inversion_file::load(&path)?;
    inv.check_model(sd, false)?;
    let mut progress = Forward {
        job,
        inner_steps: 1,
    };
    let res = nulltext::edit::edit(sd, &inv, &request.targets, opts, &mut progress)?;
    let images = decode(sd, &res.latents, &mut progress)?;
    check_cancelled(job)?;
    let staging = app.store.stage()?;
    let mut stored = Vec::new();
    for (k, (img, prompt)) in images.iter().zip(&res.prompts).enumerate() {
        let file = if k == 0 {
            RECONSTRUCTION_PNG.to_string()
        } else {
            format!("target-{k}.png")
        };
        save_png(img, &staging.path(&file))?;
        stored.push(StoredImage {
            prompt: prompt.clone(),
            file,
        });
    }
    let mut maps_stored = Vec::new();
    for (b, (strip, prompt)) in res
        .attention_strips(&sd.tokenizer)?
        .iter()
        .zip(&res.prompts)
        .enumerate()
    {
        let file = format!("attention-{b}.png");
        save_png(strip, &staging.path(&file))?;
        maps_stored.push(StoredImage {
            prompt: prompt.clone(),
            file,
        });
    }
    let edit = EditRecord {
        id: edit_id,
        inversion_id: inv_id,
        job_id: record.id,
        prompt: inv.prompt.clone(),
        targets: request.targets.clone(),
        mode: if opts.sdedit.is_some() {
            "sdedit".into()
        } else {
            res.mode.to_string()
        },
        settings: request.clone(),
        images: stored,
        attention_maps: maps_stored,
        seconds: start.elapsed().as_secs_f64(),
        created_ms: now_ms(),
    };
    app.store.publish_edit(staging, edit)
}

fn run(app: &App, job: &Job, work: Work) -> Result<()> {
    let record = job.record();
    match (record.kind, work) {
        (JobKind::Inversion, Work::Invert { image, params }) => invert(app, job, &image, &params),
        (JobKind::Edit, Work::Edit { request, options }) => {
            let edit_id = record.edit_id.context("an edit job without an edit id")?;
            edit(app, job, edit_id, &request, &options)
        }
        _ => Err(anyhow!("job {} has work of another kind", record.id)),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// Starts the worker thread; it returns when the job queue shuts down.
pub fn spawn(app: Arc<App>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("nulltext-worker".into())
        .spawn(move || {
            while let Some((job, work)) = app.jobs.next() {
                let outcome = catch_unwind(AssertUnwindSafe(|| run(&app, &job, work)));
                let (state, error) = match outcome {
                    Ok(Ok(())) => (JobState::Succeeded, None),
                    Ok(Err(e))
                        if e.downcast_ref::<nulltext::Error>()
                            .is_some_and(|e| matches!(e, nulltext::Error::Cancelled)) =>
                    {
                        if app.jobs.is_shutting_down() {
                            (JobState::Failed, Some(INTERRUPTED.to_string()))
                        } else {
                            (JobState::Cancelled, Some("cancelled".to_string()))
                        }
                    }
                    Ok(Err(e)) => (JobState::Failed, Some(api_wording(&format!("{e:#}")))),
                    Err(p) => (
                        JobState::Failed,
                        Some(format!("internal error: {}", panic_message(&*p))),
                    ),
                };
                let r = app.jobs.finish(&job, state, error);
                tracing::info!("job {} {:?}", r.id, r.state);
            }
        })
}
