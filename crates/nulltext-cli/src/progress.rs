//! Renders the library's progress events with indicatif, and turns Ctrl-C into a clean
//! cancellation.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nulltext::{CancelFlag, Event, Progress, Stage};

pub struct Bars {
    bar: Option<ProgressBar>,
    stage: Option<Stage>,
    quiet: bool,
    cancel: CancelFlag,
    inner_steps: usize,
    last_loss: f64,
    multi: Option<MultiProgress>,
}

impl Bars {
    pub fn new(quiet: bool, cancel: CancelFlag) -> Self {
        Self {
            bar: None,
            stage: None,
            quiet,
            cancel,
            inner_steps: 1,
            last_loss: f64::NAN,
            multi: None,
        }
    }

    /// Null-text inner iterations per step, for the step/iteration display.
    pub fn with_inner_steps(mut self, n: usize) -> Self {
        self.inner_steps = n.max(1);
        self
    }

    /// Draws the stage bars below the bars of `multi` (e.g. a batch's item bar).
    pub fn in_multi(mut self, multi: MultiProgress) -> Self {
        self.multi = Some(multi);
        self
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Progress for Bars {
    fn event(&mut self, event: &Event) {
        if self.quiet {
            return;
        }
        match event {
            Event::Start { stage, total } => {
                self.finish();
                let bar = match &self.multi {
                    Some(m) => m.add(ProgressBar::new(*total as u64)),
                    None => ProgressBar::with_draw_target(
                        Some(*total as u64),
                        ProgressDrawTarget::stderr(),
                    ),
                };
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>24} [{bar:30}] {pos}/{len} {msg} ({elapsed}, ETA {eta})",
                    )
                    .unwrap()
                    .progress_chars("=> "),
                );
                bar.set_prefix(stage.name());
                self.bar = Some(bar);
                self.stage = Some(*stage);
            }
            Event::Advance { done, .. } => {
                if let Some(b) = &self.bar {
                    b.set_position(*done as u64);
                }
            }
            Event::Iteration {
                step,
                iteration,
                loss,
            } => {
                self.last_loss = *loss;
                if let Some(b) = &self.bar {
                    b.set_message(format!(
                        "step {} iter {} loss {loss:.3e}",
                        step + 1,
                        iteration + 1
                    ));
                }
            }
            Event::StepDone {
                step, iterations, ..
            } => {
                if let Some(b) = &self.bar {
                    // early-stopped steps skip their remaining iterations
                    b.set_position(((step + 1) * self.inner_steps) as u64);
                    let _ = iterations;
                }
            }
            Event::Finish { .. } => self.finish(),
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// A flag set by the first Ctrl-C; a second Ctrl-C exits at once.
pub fn install_ctrlc() -> CancelFlag {
    let flag = CancelFlag::new();
    let f = flag.clone();
    let _ = ctrlc::set_handler(move || {
        if f.is_cancelled() {
            eprintln!("\ninterrupted twice: exiting now");
            std::process::exit(130);
        }
        eprintln!("\ninterrupting: finishing the current iteration (Ctrl-C again to exit at once)");
        f.cancel();
    });
    flag
}

/// A spinner for short untracked work (loading a model).
pub fn spinner(quiet: bool, msg: &str) -> Option<ProgressBar> {
    if quiet {
        return None;
    }
    let s = ProgressBar::new_spinner();
    s.set_draw_target(ProgressDrawTarget::stderr());
    s.set_message(msg.to_string());
    s.enable_steady_tick(std::time::Duration::from_millis(120));
    Some(s)
}
