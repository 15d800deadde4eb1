//! Errors of the pipeline: each names the file, word or value at fault.

use std::path::PathBuf;

/// Everything the pipeline can fail with. The message (`Display`) is meant for the user
/// and names what to change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From loading or running the model, or from a tensor operation (candle's errors
    /// arrive here too).
    #[error(transparent)]
    Model(#[from] nulltext_models::Error),
    /// From drawing a chart or picture.
    #[error(transparent)]
    Plot(#[from] nulltext_plot::Error),
    /// An image that cannot be decoded, prepared or encoded (unknown format, empty, too
    /// small after cropping).
    #[error("{}: {msg}", path.display())]
    Image {
        /// The file, or the name an in-memory image was given.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// An image whose header declares more pixels than allowed; nothing was decoded.
    #[error("{}: the image is {width}×{height} pixels; at most {max_pixels} are allowed (--max-pixels)", path.display())]
    TooManyPixels {
        /// The file, or the name an in-memory image was given.
        path: PathBuf,
        /// Width in pixels, as the header declares it.
        width: u32,
        /// Height in pixels, as the header declares it.
        height: u32,
        /// The bound it exceeds ([`crate::Limits::max_pixels`]).
        max_pixels: u64,
    },
    /// An inversion file that cannot be used: not a safetensors file, an unknown format
    /// version, missing or inconsistent tensors and keys, non-finite values.
    #[error("{}: {msg}", path.display())]
    InversionFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A setting, prompt or argument refused before (or instead of) any work; the message
    /// names it as the user gave it (`--steps`, `targets[0]`).
    #[error("{0}")]
    InvalidInput(String),
    /// The computation produced NaN or infinite values in the named quantity; nothing was
    /// written.
    #[error("non-finite values (NaN or Inf) in {0}; nothing was written")]
    NonFinite(String),
    /// The work stopped because [`crate::Progress::cancelled`] returned `true`.
    #[error("cancelled")]
    Cancelled,
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Model(nulltext_models::Error::Candle(e))
    }
}

/// A result whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An [`Error::InvalidInput`] with this message.
pub fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidInput(msg.into())
}
