//! Errors of the pipeline: each names the file, word or value at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] nulltext_models::Error),
    #[error(transparent)]
    Plot(#[from] nulltext_plot::Error),
    #[error("{}: {msg}", path.display())]
    Image { path: PathBuf, msg: String },
    /// An image whose header declares more pixels than allowed; nothing was decoded.
    #[error("{}: the image is {width}×{height} pixels; at most {max_pixels} are allowed (--max-pixels)", path.display())]
    TooManyPixels {
        path: PathBuf,
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    #[error("{}: {msg}", path.display())]
    InversionFile { path: PathBuf, msg: String },
    #[error("{0}")]
    InvalidInput(String),
    #[error("non-finite values (NaN or Inf) in {0}; nothing was written")]
    NonFinite(String),
    #[error("cancelled")]
    Cancelled,
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Model(nulltext_models::Error::Candle(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An [`Error::InvalidInput`] with this message.
pub fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidInput(msg.into())
}
