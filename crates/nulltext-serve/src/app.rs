//! The state the HTTP handlers and the worker share.

use nulltext::StableDiffusion;

use crate::jobs::Jobs;
use crate::params::Limits;
use crate::store::Store;

/// What the handlers and the worker share.
pub struct App {
    pub(crate) sd: StableDiffusion,
    pub(crate) store: Store,
    pub(crate) jobs: Jobs,
    pub(crate) limits: Limits,
    /// Listening on a loopback address: only loopback host names are answered.
    pub(crate) local_only: bool,
    /// Uploads being decoded at once (each may take a few hundred MB for a moment).
    pub(crate) decodes: tokio::sync::Semaphore,
}
