//! nulltext: edit real photographs with text using Stable Diffusion.
//!
//! Null-text inversion (Mokady et al., CVPR 2023) finds the noise latent and per-step
//! unconditional embeddings from which Stable Diffusion reproduces a photo; Prompt-to-Prompt
//! then edits it by changing its caption. This crate holds the pipelines; the models live in
//! `nulltext-models`, the metrics, benchmarks and batch runs in `nulltext-eval`, the trainer
//! of the bundled shapes model in `nulltext-train`, charts and captioned pictures in
//! `nulltext-plot` (re-exported as [`plot`]).

pub mod atomic;
pub mod edit;
pub mod error;
pub mod events;
pub mod image_io;
pub mod inversion;
pub mod inversion_file;
pub mod limits;
pub mod runtime;
pub mod sampling;
pub mod text2img;

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
