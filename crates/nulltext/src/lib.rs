//! nulltext: edit real photographs with text using Stable Diffusion.
//!
//! Null-text inversion (Mokady et al., CVPR 2023) finds the noise latent and per-step
//! unconditional embeddings from which Stable Diffusion reproduces a photo; Prompt-to-Prompt
//! then edits it by changing its caption. This crate holds the pipelines; the models live in
//! `nulltext-models`.

pub mod atomic;
pub mod batch;
pub mod clip_score;
pub mod cluster;
pub mod edit;
pub mod error;
pub mod events;
pub mod figures;
pub mod image_io;
pub mod inversion;
pub mod inversion_file;
pub mod limits;
pub mod lpips;
pub mod metrics;
pub mod pie_bench;
pub mod render;
pub mod report;
pub mod runtime;
pub mod sampling;
pub mod shapes;
pub mod structure;
pub mod text2img;
pub mod trace;
pub mod train;

pub use edit::{edit, EditMode, EditOptions, EditResult};
pub use error::{Error, Result};
pub use events::{CancelFlag, Event, NoProgress, Progress, Recorder, Stage};
pub use inversion::{
    invert_image, invert_latent, reconstruct, Inversion, InvertOptions, InvertReport, Method,
};
pub use limits::Limits;
pub use nulltext_models as models;
pub use nulltext_models::StableDiffusion;
pub use nulltext_plot as plot;
