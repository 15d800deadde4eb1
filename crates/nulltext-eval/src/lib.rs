//! nulltext-eval: how well nulltext inverts and edits, measured.
//!
//! The image metrics ([`metrics`]: PSNR, SSIM, MSE, under a mask or not; [`lpips`];
//! [`clip_score`]; PIE-Bench's [`structure`] distance), each checked against the Python
//! package whose numbers it reproduces; batch runs over a dataset ([`batch`], sharded by hand
//! or by a cluster scheduler: [`cluster`]); PIE-Bench as batch items and its table
//! ([`pie_bench`], [`report`]); and reconstruction quality against the optimization budget
//! ([`trace`]) with its charts ([`figures`], the paper's Figure 4). The pipelines themselves
//! are the `nulltext` crate's.

pub mod batch;
pub mod clip_score;
pub mod cluster;
pub mod figures;
pub mod lpips;
pub mod metrics;
pub mod pie_bench;
pub mod report;
pub mod structure;
pub mod trace;
