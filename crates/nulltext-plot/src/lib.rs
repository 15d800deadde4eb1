//! nulltext's figures: line charts drawn by plotters, written as PNG or SVG (so that they
//! drop into a paper), captioned grids of pictures and Prompt-to-Prompt attention maps
//! ([`render`]), and text for image labels, all in the bundled DejaVu Sans.
//!
//! A chart is a description — titled axes, named series, a legend — that its users
//! (Figure 4 from inversion traces, the training curves) fill in and render.

pub mod chart;
pub mod render;
pub mod text;

pub use chart::{Chart, Format, Scale, Series, PALETTE};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: charts are written as .png or .svg", .0.display())]
    Format(std::path::PathBuf),
    #[error("drawing the chart: {0}")]
    Draw(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
