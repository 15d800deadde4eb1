//! Stable Diffusion 1.x/2.x and SDXL for nulltext: tokenizer, text encoders, UNet with an
//! attention-control hook, VAE and DDIM, on candle, matching diffusers numerically.

pub mod attention;
pub mod clip;
pub mod clip_score;
pub mod config;
pub mod control;
pub mod cpu;
pub mod device;
pub mod dino;
pub mod embeddings;
pub mod error;
pub mod fingerprint;
pub(crate) mod fused;
pub mod model;
pub mod nn;
pub mod prompt;
pub mod random;
pub mod resnet;
pub mod scheduler;
pub mod sdxl;
pub mod single_file;
pub mod tensors;
#[cfg(test)]
mod testing;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use candle_core;
pub use clip::{ClipTextModelWithProjection, ClipTextTransformer};
pub use config::{ClipTextConfig, SchedulerConfig, UNetConfig, VaeConfig};
pub use control::{
    AttentionCall, AttentionControl, AttentionKind, AttentionSite, NoControl, Place,
};
pub use error::{Error, Result};
pub use model::{LoadOptions, StableDiffusion};
pub use prompt::PromptEmbeds;
pub use scheduler::Ddim;
pub use tokenizer::ClipTokenizer;
pub use unet::{AddedCond, Execution, UNet2DConditionModel};
pub use vae::AutoencoderKL;
