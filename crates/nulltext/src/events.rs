//! Progress as a stream of events: the library reports, the CLI draws bars, a server
//! forwards them, tests record them. Cancellation is asked for through the same handle.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A long-running stage of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The VAE encodes the input image into z₀ (one unit).
    EncodeImage,
    /// DDIM inversion z₀ → z_T (one unit per step).
    DdimInversion,
    /// Null-text optimization (steps × inner iterations units; a step that stops early
    /// skips its remaining units).
    NullTextOptimization,
    /// Direct inversion's offset pass.
    DirectOffsets,
    /// Guided DDIM sampling: reconstruction, edit or text-to-image (one unit per step).
    Sampling,
    /// The VAE decodes latents into images (reported by front ends, not by this crate).
    Decode,
}

impl Stage {
    /// A short label for progress bars and logs (`"DDIM inversion"`, `"sampling"`).
    pub fn name(self) -> &'static str {
        match self {
            Stage::EncodeImage => "encoding image",
            Stage::DdimInversion => "DDIM inversion",
            Stage::NullTextOptimization => "null-text optimization",
            Stage::DirectOffsets => "direct inversion offsets",
            Stage::Sampling => "sampling",
            Stage::Decode => "decoding",
        }
    }
}

/// What the pipeline reports while it works, in order: `Start`, then `Advance` (and, in
/// null-text optimization, `Iteration` and `StepDone`), then `Finish`, for each stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A stage begins; `total` units of work (steps, or steps × inner iterations).
    Start {
        /// The stage.
        stage: Stage,
        /// Units of work it has at most.
        total: usize,
    },
    /// One unit of a stage is done (`done` of `total`).
    Advance {
        /// The stage.
        stage: Stage,
        /// Units done so far, counted from the stage's start; may jump when a null-text
        /// step stops early.
        done: usize,
    },
    /// One null-text Adam iteration: sampling step, iteration (0-based), loss before the update.
    Iteration {
        /// Sampling step (0-based, in sampling order).
        step: usize,
        /// Iteration within the step (0-based).
        iteration: usize,
        /// The step's loss before this iteration's update.
        loss: f64,
    },
    /// A null-text step finished after `iterations` updates.
    StepDone {
        /// Sampling step (0-based, in sampling order).
        step: usize,
        /// Adam updates applied in this step.
        iterations: usize,
        /// The loss before the last update.
        loss: f64,
    },
    /// A stage ended.
    Finish {
        /// The stage.
        stage: Stage,
    },
}

/// Receives events; may ask the work to stop.
pub trait Progress {
    /// Called for every event, on the thread doing the work: keep it short.
    fn event(&mut self, event: &Event);

    /// Polled between units of work; `true` makes the work return `Error::Cancelled`.
    fn cancelled(&self) -> bool {
        false
    }
}

/// Ignores everything.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&mut self, _: &Event) {}
}

/// Keeps every event (for tests and reports).
#[derive(Debug, Default)]
pub struct Recorder {
    /// The events received, oldest first.
    pub events: Vec<Event>,
}

impl Progress for Recorder {
    fn event(&mut self, event: &Event) {
        self.events.push(event.clone());
    }
}

/// A flag shared between the work and whoever may cancel it (a Ctrl-C handler, a server).
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    /// A flag not yet raised.
    pub fn new() -> Self {
        Self::default()
    }
    /// Raises the flag, for this handle and every clone of it; it stays raised.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether [`CancelFlag::cancel`] was called on any clone. A [`Progress`] returns it
    /// from [`Progress::cancelled`] to stop the work.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

pub(crate) fn check(progress: &dyn Progress) -> crate::Result<()> {
    if progress.cancelled() {
        Err(crate::Error::Cancelled)
    } else {
        Ok(())
    }
}
