#![warn(missing_docs)]

//! nulltext: edit real photographs with text using Stable Diffusion.
//!
//! Null-text inversion (Mokady et al., CVPR 2023) finds the noise latent and per-step
//! unconditional embeddings from which Stable Diffusion reproduces a photo; Prompt-to-Prompt
//! then edits it by changing its caption.
//!
//! This crate holds the pipelines and what they read and write:
//!
//! - [`inversion`]: DDIM, null-text, negative-prompt and direct inversion
//!   ([`invert_image`], [`invert_latent`]) and reconstruction from an inversion
//!   ([`reconstruct`]);
//! - [`edit`](mod@edit): Prompt-to-Prompt (word swap, refinement, reweighting, local blend) and
//!   SDEdit on an inversion;
//! - [`sampling`]: the guided DDIM loop they share, and [`text2img`] on top of it;
//! - [`inversion_file`]: the `*.nti.safetensors` file an inversion is saved as;
//! - [`image_io`]: images in and out, and between pixels and tensors;
//! - [`events`]: progress reports and cancellation; [`limits`]: the bounds every input is
//!   checked against before work starts; [`runtime`]: threads, allocator, device and dtype;
//!   [`atomic`]: files written whole or not at all; [`error`]: the error type.
//!
//! The rest of the workspace:
//!
//! - `nulltext-models`: the networks (CLIP tokenizer and text encoder, UNet with its
//!   attention-control hook, VAE, DDIM) and their kernels, re-exported as [`models`];
//! - `nulltext-eval`: image metrics, PIE-Bench, batch runs and reconstruction traces;
//! - `nulltext-train`: the dataset and trainer of the bundled shapes model (`models/shapes`);
//! - `nulltext-plot`: charts and captioned picture grids, re-exported as [`plot`];
//! - `nulltext-cli` (the `nulltext` command), `nulltext-serve` (web app and HTTP API) and
//!   `nulltext-py` (the Python module) are thin front ends over this crate.
//!
//! A model (SD 1.x, 2.x or XL) loads with [`StableDiffusion::load`] from a diffusers folder,
//! a single-file checkpoint or a cached Hugging Face repository id; every pipeline takes
//! prompts as [`PromptEmbeds`], whose pooled part SDXL adds. [`invert_image`] and [`edit()`] show the
//! whole round trip; the examples run on the small models in the repository
//! (`tests/fixtures/models/tiny-sd15`, and `models/shapes`, which draws 64×64 shapes).

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
pub use nulltext_models::{PromptEmbeds, StableDiffusion};
pub use nulltext_plot as plot;
