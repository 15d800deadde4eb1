//! Progress as a stream of events: the library reports, the CLI draws bars, a server
//! forwards them, tests record them. Cancellation is asked for through the same handle.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A long-running stage of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    EncodeImage,
    DdimInversion,
    NullTextOptimization,
    /// Direct inversion's offset pass.
    DirectOffsets,
    Sampling,
    Decode,
}

impl Stage {
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

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A stage begins; `total` units of work (steps, or steps × inner iterations).
    Start { stage: Stage, total: usize },
    /// One unit of a stage is done (`done` of `total`).
    Advance { stage: Stage, done: usize },
    /// One null-text Adam iteration: sampling step, iteration (0-based), loss before the update.
    Iteration {
        step: usize,
        iteration: usize,
        loss: f64,
    },
    /// A null-text step finished after `iterations` updates.
    StepDone {
        step: usize,
        iterations: usize,
        loss: f64,
    },
    /// A stage ended.
    Finish { stage: Stage },
}

/// Receives events; may ask the work to stop.
pub trait Progress {
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
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
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
