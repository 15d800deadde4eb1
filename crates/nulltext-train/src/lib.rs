//! nulltext-train: the bundled shapes model (`models/shapes`), made from scratch.
//!
//! [`shapes`] is its dataset, captioned scenes of one flat-coloured shape generated on the
//! fly, with a pixel-statistics classifier that reads a picture back into its caption (the
//! end-to-end tests check generated and edited pictures with it). [`trainer`] trains a small
//! Stable-Diffusion-shaped model on those scenes with `nulltext-models`' layers, the VAE
//! first, then the UNet and text encoder (`nulltext train`); the result loads like any
//! Stable Diffusion.

pub mod shapes;
pub mod trainer;

pub use trainer::{export_fp16, train, Phase, TrainEvent, TrainOptions, TrainProgress, TrainState};
