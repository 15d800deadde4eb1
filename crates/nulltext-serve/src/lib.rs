//! `nulltext serve`: a local web app and HTTP API for inverting and editing photos.
//!
//! An adapter over the `nulltext` library, like the command line: handlers check requests
//! and queue jobs ([`jobs`]); one worker thread runs them in order with the library and
//! forwards its progress events ([`worker`]); results are published whole into the data
//! directory ([`store`]) and survive restarts. The page at `/` and the OpenAPI document at
//! `/openapi.json` are embedded in the binary.

pub mod api;
pub mod app;
pub mod error;
pub mod ids;
pub mod jobs;
pub mod middleware;
pub mod params;
pub mod store;
pub mod worker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nulltext::{CancelFlag, StableDiffusion};

pub use app::App;
pub use error::ApiError;
pub use ids::Id;
pub use params::Limits;

/// Options of `nulltext serve` (the model is loaded by the caller).
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct ServeArgs {
    /// Address to listen on, HOST:PORT. There is no authentication: anything but a
    /// loopback address lets whoever reaches it use the service.
    #[arg(long, default_value = "127.0.0.1:7860")]
    pub bind: String,
    /// Folder for inversions, edits and job records (created if missing).
    #[arg(long, default_value = "nulltext-data")]
    pub data_dir: PathBuf,
    /// Jobs that may wait behind the running one; more are refused with 429.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Largest request body (an uploaded photo with its form), in MiB.
    #[arg(long, default_value_t = 32)]
    pub max_upload_mib: usize,
    /// Largest photo, in megapixels (width × height before resizing).
    #[arg(long, default_value_t = 40.0)]
    pub max_megapixels: f64,
    /// Longest prompt or target caption, in characters.
    #[arg(long, default_value_t = 1000)]
    pub max_prompt_chars: usize,
    /// Most target captions in one edit.
    #[arg(long, default_value_t = 8)]
    pub max_targets: usize,
    /// Most DDIM steps an inversion may ask for.
    #[arg(long, default_value_t = 200)]
    pub max_steps: usize,
    /// Largest image side an inversion may ask for, in pixels (the model's own size
    /// included).
    #[arg(long, default_value_t = 1024)]
    pub max_size: u32,
    /// Finished jobs whose records are kept (in memory and in DATA/jobs/); older ones are
    /// forgotten. Inversions and edits stay until deleted.
    #[arg(long, default_value_t = 1000)]
    pub keep_jobs: usize,
}

impl Default for ServeArgs {
    /// The command line's defaults.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Parse {
            #[command(flatten)]
            args: ServeArgs,
        }
        <Parse as clap::Parser>::parse_from(["serve"]).args
    }
}

impl ServeArgs {
    pub fn limits(&self) -> Result<Limits> {
        if self.queue == 0 {
            bail!("--queue must be at least 1");
        }
        if self.max_megapixels.is_nan() || self.max_megapixels <= 0.0 {
            bail!("--max-megapixels must be positive");
        }
        Ok(Limits {
            max_body_bytes: self.max_upload_mib.max(1).saturating_mul(1 << 20),
            max_pixels: (self.max_megapixels * 1e6) as u64,
            max_prompt_chars: self.max_prompt_chars.max(1),
            max_targets: self.max_targets.max(1),
            max_steps: self.max_steps.clamp(1, 1000),
            max_inner_steps: 100,
            max_size: self.max_size.max(params::SIZE_MULTIPLE),
        })
    }
}

/// Uploads decoded at once; more wait their turn.
const DECODES_IN_FLIGHT: usize = 2;

/// How long open connections may linger once a shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A running server (see [`Server::start`]).
pub struct ServerHandle {
    addr: SocketAddr,
    data_dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
}

pub struct Server;

impl Server {
    /// Opens the data directory (failing jobs that a previous server left unfinished),
    /// binds `args.bind` (port 0 picks a free one), starts the worker and serves on
    /// background threads until [`ServerHandle::shutdown`].
    pub fn start(sd: StableDiffusion, args: ServeArgs) -> Result<ServerHandle> {
        let limits = args.limits()?;
        let store = store::Store::open(&args.data_dir)
            .with_context(|| format!("opening the data directory {}", args.data_dir.display()))?;
        let jobs = jobs::Jobs::open(&store.jobs_dir(), args.queue, args.keep_jobs)?;
        let listener = std::net::TcpListener::bind(&args.bind)
            .with_context(|| format!("cannot listen on {}", args.bind))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let app = Arc::new(App {
            sd,
            store,
            jobs,
            limits,
            local_only: addr.ip().is_loopback(),
            decodes: tokio::sync::Semaphore::new(DECODES_IN_FLIGHT),
        });
        let worker = worker::spawn(app.clone())?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("nulltext-http".into())
            .spawn(move || serve(app, listener, stopped, worker))?;
        Ok(ServerHandle {
            addr,
            data_dir: args.data_dir,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

fn serve(
    app: Arc<App>,
    listener: std::net::TcpListener,
    stopped: tokio::sync::oneshot::Receiver<()>,
    worker: JoinHandle<()>,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("nulltext-http")
        .enable_all()
        .build()?;
    let a = app.clone();
    let routes = api::router(app.clone());
    let served = rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let (fired, mut on_fire) = tokio::sync::watch::channel(false);
        let signal = async move {
            let _ = stopped.await;
            // Queued jobs fail, the running one stops at its next check and its listeners
            // hear the end, which closes their streams.
            a.jobs.shutdown();
            let _ = fired.send(true);
        };
        let server = axum::serve(listener, routes).with_graceful_shutdown(signal);
        let grace = async move {
            while !*on_fire.borrow() {
                if on_fire.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            r = server => r.context("serving"),
            _ = grace => {
                tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
                Ok(())
            }
        }
    });
    rt.shutdown_timeout(SHUTDOWN_GRACE);
    app.jobs.shutdown();
    if worker.join().is_err() {
        bail!("the worker thread panicked");
    }
    served
}

impl ServerHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether the server has stopped on its own (an error).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    fn stop_and_join(&mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }

    /// Stops accepting work, fails queued jobs, stops the running one (it is marked
    /// failed: interrupted), lets open connections finish for a few seconds and returns
    /// once the worker has stopped.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_and_join()
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

fn is_loopback(bind: &str) -> bool {
    use std::net::ToSocketAddrs;
    bind.to_socket_addrs()
        .map(|mut a| a.all(|a| a.ip().is_loopback()))
        .unwrap_or(false)
}

/// Serves until `cancel` is set (the command line's Ctrl-C), then shuts down gracefully.
pub fn run(sd: StableDiffusion, args: ServeArgs, cancel: CancelFlag) -> Result<()> {
    if !is_loopback(&args.bind) {
        eprintln!(
            "warning: listening on {}, which is not a loopback address: anyone who can reach \
             it can use this service (there is no authentication)",
            args.bind
        );
    }
    let data_dir = args.data_dir.clone();
    let server = Server::start(sd, args)?;
    println!(
        "nulltext serve: open {}/ (data in {}; Ctrl-C stops)",
        server.url(),
        data_dir.display()
    );
    while !cancel.is_cancelled() && !server.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
    }
    if cancel.is_cancelled() {
        eprintln!("shutting down: a running job is stopped and marked failed (interrupted)");
    }
    server.shutdown()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_command_line() {
        let a = ServeArgs::default();
        assert_eq!(a.bind, "127.0.0.1:7860");
        assert_eq!(a.data_dir, PathBuf::from("nulltext-data"));
        let l = a.limits().unwrap();
        assert_eq!(l.max_body_bytes, 32 << 20);
        assert_eq!(l.max_pixels, 40_000_000);
        assert!(ServeArgs {
            queue: 0,
            ..ServeArgs::default()
        }
        .limits()
        .is_err());
        assert!(is_loopback("127.0.0.1:0") && is_loopback("[::1]:80"));
        assert!(!is_loopback("0.0.0.0:80"));
    }
}
