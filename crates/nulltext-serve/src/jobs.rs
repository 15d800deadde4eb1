//! Jobs: records kept in memory and in `DATA/jobs/<id>.json`, a bounded queue feeding the
//! one worker, cancellation, and a broadcast of each job's events for its listeners.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::Result;
use image::RgbImage;
use nulltext::edit::EditOptions;
use nulltext::CancelFlag;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::ids::Id;
use crate::params::{EditRequest, InvertParams};
use crate::store::write_json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Inversion,
    Edit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// Where a running job is: the library's current stage and, during null-text
/// optimization, the step, iteration and loss.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgressInfo {
    pub stage: String,
    pub done: usize,
    pub total: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iteration: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: Id,
    pub kind: JobKind,
    pub state: JobState,
    /// The inversion this job makes (kind `inversion`) or edits (kind `edit`).
    pub inversion_id: Id,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit_id: Option<Id>,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub error: Option<String>,
    pub progress: Option<ProgressInfo>,
}

/// What listeners of a job hear.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// The whole record, on every change of state.
    State(Box<JobRecord>),
    /// The stage or its count changed.
    Progress(ProgressInfo),
    /// One null-text iteration.
    Iteration {
        step: usize,
        iteration: usize,
        loss: f64,
    },
    /// One null-text step finished.
    Step {
        step: usize,
        iterations: usize,
        loss: f64,
    },
}

/// The work of a queued job (kept in memory only: a restart fails queued jobs).
pub enum Work {
    Invert {
        image: Box<RgbImage>,
        params: InvertParams,
    },
    Edit {
        request: EditRequest,
        options: Box<EditOptions>,
    },
}

pub struct Job {
    record: Mutex<JobRecord>,
    pub cancel: CancelFlag,
    events: Mutex<Option<broadcast::Sender<JobEvent>>>,
}

impl Job {
    fn new(record: JobRecord) -> Self {
        let live = !record.state.is_terminal();
        Self {
            record: Mutex::new(record),
            cancel: CancelFlag::new(),
            events: Mutex::new(live.then(|| broadcast::channel(512).0)),
        }
    }

    pub fn record(&self) -> JobRecord {
        self.record.lock().unwrap().clone()
    }

    /// A receiver of the job's events from now on; `None` once the job has finished.
    pub fn subscribe(&self) -> Option<broadcast::Receiver<JobEvent>> {
        self.events.lock().unwrap().as_ref().map(|s| s.subscribe())
    }

    pub fn emit(&self, event: JobEvent) {
        if let Some(s) = self.events.lock().unwrap().as_ref() {
            let _ = s.send(event);
        }
    }

    /// Changes the progress and tells the listeners.
    pub fn update_progress(&self, f: impl FnOnce(&mut ProgressInfo)) -> ProgressInfo {
        let mut r = self.record.lock().unwrap();
        let p = r.progress.get_or_insert_with(Default::default);
        f(p);
        p.clone()
    }

    /// Applies `f` to the record, persists it and tells the listeners; a terminal state
    /// closes the event stream.
    fn transition(&self, dir: &Path, f: impl FnOnce(&mut JobRecord)) -> JobRecord {
        let r = {
            let mut r = self.record.lock().unwrap();
            f(&mut r);
            r.clone()
        };
        persist(dir, &r);
        self.emit(JobEvent::State(Box::new(r.clone())));
        if r.state.is_terminal() {
            self.events.lock().unwrap().take();
        }
        r
    }
}

fn persist(dir: &Path, r: &JobRecord) {
    if let Err(e) = write_json(&dir.join(format!("{}.json", r.id)), r) {
        tracing::warn!("cannot save job {}: {e:#}", r.id);
    }
}

struct Inner {
    all: HashMap<Id, Arc<Job>>,
    queue: VecDeque<(Arc<Job>, Work)>,
    running: Option<Arc<Job>>,
    shutting_down: bool,
    /// Mean duration of the jobs finished since start, for Retry-After.
    mean_seconds: Option<f64>,
}

pub struct Jobs {
    dir: PathBuf,
    capacity: usize,
    /// Finished jobs whose records are kept; older ones are forgotten.
    keep: usize,
    inner: Mutex<Inner>,
    wake: Condvar,
}

/// The message of a job that a restart or shutdown cut off.
pub const INTERRUPTED: &str = "interrupted: the server stopped before this job finished";

impl Jobs {
    /// Loads the job records of `dir`; jobs that were queued or running when the last
    /// server stopped are marked failed.
    pub fn open(dir: &Path, capacity: usize, keep: usize) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut all = HashMap::new();
        for e in std::fs::read_dir(dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            let Some(id) = name.strip_suffix(".json").and_then(Id::parse) else {
                continue;
            };
            let mut r: JobRecord = match std::fs::read(e.path())
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(serde_json::from_slice(&b)?))
            {
                Ok(r) => r,
                Err(err) => {
                    tracing::warn!("skipping job record {}: {err:#}", e.path().display());
                    continue;
                }
            };
            if r.id != id {
                continue;
            }
            if !r.state.is_terminal() {
                r.state = JobState::Failed;
                r.error = Some(INTERRUPTED.into());
                r.finished_ms = Some(now_ms());
                persist(dir, &r);
            }
            all.insert(id, Arc::new(Job::new(r)));
        }
        let jobs = Self {
            dir: dir.to_path_buf(),
            capacity,
            keep,
            inner: Mutex::new(Inner {
                all,
                queue: VecDeque::new(),
                running: None,
                shutting_down: false,
                mean_seconds: None,
            }),
            wake: Condvar::new(),
        };
        jobs.prune(&mut jobs.inner.lock().unwrap());
        Ok(jobs)
    }

    /// Forgets the oldest finished jobs beyond the `keep` newest, in memory and on disk.
    /// Their results (inversions, edits) stay; only the job records go.
    fn prune(&self, inner: &mut Inner) {
        let mut done: Vec<(u64, Id)> = inner
            .all
            .values()
            .map(|j| j.record())
            .filter(|r| r.state.is_terminal())
            .map(|r| (r.finished_ms.unwrap_or(r.created_ms), r.id))
            .collect();
        if done.len() <= self.keep {
            return;
        }
        done.sort_unstable();
        for (_, id) in &done[..done.len() - self.keep] {
            inner.all.remove(id);
            let _ = std::fs::remove_file(self.dir.join(format!("{id}.json")));
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether a job could be queued now: cheap, for handlers to answer 429 (or 503)
    /// before they read or decode anything. [`Jobs::submit`] checks again.
    pub fn check_capacity(&self) -> Result<(), ApiError> {
        self.refusal(&self.inner.lock().unwrap())
    }

    fn refusal(&self, inner: &Inner) -> Result<(), ApiError> {
        if inner.shutting_down {
            return Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down",
            ));
        }
        if inner.queue.len() >= self.capacity {
            let retry = retry_after(inner);
            return Err(ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                format!(
                    "{} jobs are waiting, the most this server queues; try again in about {retry} s",
                    inner.queue.len()
                ),
            )
            .with_retry_after(retry));
        }
        Ok(())
    }

    /// Queues work; refused with 429 (and Retry-After) when the queue is full.
    pub fn submit(
        &self,
        kind: JobKind,
        inversion_id: Id,
        edit_id: Option<Id>,
        work: Work,
    ) -> Result<JobRecord, ApiError> {
        let mut inner = self.inner.lock().unwrap();
        self.refusal(&inner)?;
        let record = JobRecord {
            id: Id::random(),
            kind,
            state: JobState::Queued,
            inversion_id,
            edit_id,
            created_ms: now_ms(),
            started_ms: None,
            finished_ms: None,
            error: None,
            progress: None,
        };
        write_json(&self.dir.join(format!("{}.json", record.id)), &record)
            .map_err(|e| ApiError::internal(format!("cannot save the job: {e:#}")))?;
        let job = Arc::new(Job::new(record.clone()));
        inner.all.insert(record.id, job.clone());
        inner.queue.push_back((job, work));
        self.wake.notify_all();
        Ok(record)
    }

    pub fn get(&self, id: Id) -> Option<Arc<Job>> {
        self.inner.lock().unwrap().all.get(&id).cloned()
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<JobRecord> {
        let jobs: Vec<Arc<Job>> = self.inner.lock().unwrap().all.values().cloned().collect();
        let mut v: Vec<JobRecord> = jobs.iter().map(|j| j.record()).collect();
        v.sort_by_key(|r| std::cmp::Reverse(r.created_ms));
        v
    }

    /// Place in the queue (0: next) of a queued job.
    pub fn queue_position(&self, id: Id) -> Option<usize> {
        self.inner
            .lock()
            .unwrap()
            .queue
            .iter()
            .position(|(j, _)| j.record.lock().unwrap().id == id)
    }

    /// (queued, running job).
    pub fn status(&self) -> (usize, Option<Id>) {
        let inner = self.inner.lock().unwrap();
        (
            inner.queue.len(),
            inner.running.as_ref().map(|j| j.record().id),
        )
    }

    /// Whether a queued or running job works on inversion `inv`.
    pub fn uses_inversion(&self, inv: Id) -> bool {
        let inner = self.inner.lock().unwrap();
        inner
            .queue
            .iter()
            .map(|(j, _)| j)
            .chain(inner.running.iter())
            .any(|j| j.record().inversion_id == inv)
    }

    /// Cancels a queued job at once, a running one at its next check.
    pub fn cancel(&self, id: Id) -> Result<JobRecord, ApiError> {
        let mut inner = self.inner.lock().unwrap();
        let job = inner
            .all
            .get(&id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no job {id}")))?;
        let state = job.record().state;
        match state {
            JobState::Queued => {
                inner.queue.retain(|(j, _)| !Arc::ptr_eq(j, &job));
                drop(inner);
                let r = job.transition(&self.dir, |r| {
                    r.state = JobState::Cancelled;
                    r.finished_ms = Some(now_ms());
                    r.error = Some("cancelled before it started".into());
                });
                self.prune(&mut self.inner.lock().unwrap());
                Ok(r)
            }
            JobState::Running => {
                job.cancel.cancel();
                Ok(job.record())
            }
            s => Err(ApiError::conflict(format!(
                "job {id} has already finished ({})",
                serde_json::to_value(s).unwrap().as_str().unwrap_or("")
            ))),
        }
    }

    /// The next job for the worker, marked running; waits for one. `None` once the server
    /// shuts down.
    pub fn next(&self) -> Option<(Arc<Job>, Work)> {
        let mut inner = self.inner.lock().unwrap();
        loop {
            if inner.shutting_down {
                return None;
            }
            if let Some((job, work)) = inner.queue.pop_front() {
                inner.running = Some(job.clone());
                // Marked running before the queue is unlocked: a cancel that comes between
                // must see a running job (and stop it), not a queued one it only thinks it
                // removed.
                job.transition(&self.dir, |r| {
                    r.state = JobState::Running;
                    r.started_ms = Some(now_ms());
                });
                drop(inner);
                return Some((job, work));
            }
            inner = self.wake.wait(inner).unwrap();
        }
    }

    /// Records how the running job ended.
    pub fn finish(&self, job: &Job, state: JobState, error: Option<String>) -> JobRecord {
        debug_assert!(state.is_terminal());
        let r = job.transition(&self.dir, |r| {
            r.state = state;
            r.error = error;
            r.finished_ms = Some(now_ms());
        });
        let mut inner = self.inner.lock().unwrap();
        inner.running = None;
        self.prune(&mut inner);
        if state == JobState::Succeeded {
            let secs = (r.finished_ms.unwrap_or(0) - r.started_ms.unwrap_or(0)) as f64 / 1e3;
            inner.mean_seconds = Some(match inner.mean_seconds {
                Some(m) => 0.8 * m + 0.2 * secs,
                None => secs,
            });
        }
        r
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.lock().unwrap().shutting_down
    }

    /// Stops the queue: queued jobs fail, the running one is asked to stop.
    pub fn shutdown(&self) {
        let (queued, running) = {
            let mut inner = self.inner.lock().unwrap();
            inner.shutting_down = true;
            self.wake.notify_all();
            (std::mem::take(&mut inner.queue), inner.running.clone())
        };
        for (job, _) in queued {
            job.transition(&self.dir, |r| {
                r.state = JobState::Failed;
                r.error = Some(INTERRUPTED.into());
                r.finished_ms = Some(now_ms());
            });
        }
        if let Some(job) = running {
            job.cancel.cancel();
        }
    }
}

/// Seconds until the running job likely ends (and a queue slot frees).
fn retry_after(inner: &Inner) -> u64 {
    let mean = inner.mean_seconds.unwrap_or(30.0);
    let elapsed = inner
        .running
        .as_ref()
        .and_then(|j| j.record().started_ms)
        .map_or(0.0, |s| now_ms().saturating_sub(s) as f64 / 1e3);
    (mean - elapsed).ceil().clamp(1.0, 3600.0) as u64
}

/// Milliseconds since the Unix epoch (0 before it).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit_work() -> Work {
        Work::Edit {
            request: EditRequest::default(),
            options: Box::default(),
        }
    }

    /// The worker's `next` marks a job running before anyone else can look at the queue:
    /// a job is never out of the queue while its record still says queued (a cancel then
    /// would answer "cancelled" and the job would run anyway).
    #[test]
    fn a_job_leaves_the_queue_and_becomes_running_at_once() {
        let dir = std::env::temp_dir().join(format!("nulltext-jobs-next-{}", std::process::id()));
        let jobs = Arc::new(Jobs::open(&dir, 4, 10).unwrap());
        let id = jobs
            .submit(JobKind::Edit, Id::random(), Some(Id::random()), edit_work())
            .unwrap()
            .id;
        let job = jobs.get(id).unwrap();
        // Holding the record keeps it "queued" for as long as this test likes.
        let held = job.record.lock().unwrap();
        let j = jobs.clone();
        let worker = std::thread::spawn(move || j.next().map(|(job, _)| job));
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(200) {
            if let Ok(inner) = jobs.inner.try_lock() {
                assert!(
                    inner.queue.iter().any(|(j, _)| Arc::ptr_eq(j, &job)),
                    "the job left the queue while its record still said queued"
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(held);
        let taken = worker.join().unwrap().expect("the worker takes the job");
        assert!(Arc::ptr_eq(&taken, &job));
        // A cancel now finds it running and tells it to stop.
        assert_eq!(jobs.cancel(id).unwrap().state, JobState::Running);
        assert!(job.cancel.is_cancelled());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Finished job records beyond the retention are forgotten, oldest first, from memory
    /// and from the folder; a reopened folder is pruned too.
    #[test]
    fn finished_jobs_are_pruned() {
        let dir = std::env::temp_dir().join(format!("nulltext-jobs-keep-{}", std::process::id()));
        let files = || std::fs::read_dir(&dir).unwrap().count();
        {
            let jobs = Jobs::open(&dir, 100, 3).unwrap();
            for _ in 0..8 {
                jobs.submit(JobKind::Edit, Id::random(), Some(Id::random()), edit_work())
                    .unwrap();
                let (job, _) = jobs.next().unwrap();
                jobs.finish(&job, JobState::Failed, Some("test".into()));
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            assert_eq!(jobs.list().len(), 3);
            assert_eq!(files(), 3);
        }
        let jobs = Jobs::open(&dir, 100, 1).unwrap();
        assert_eq!((jobs.list().len(), files()), (1, 1));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
