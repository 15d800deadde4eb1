//! Errors of the model layer: every one names the file, tensor or key at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not found", .0.display())]
    MissingFile(PathBuf),
    #[error("{}: not a valid safetensors file ({msg})", path.display())]
    Safetensors { path: PathBuf, msg: String },
    #[error("tensor `{name}` is missing from {location}")]
    MissingTensor { name: String, location: String },
    #[error("tensor `{name}` in {location} has shape {got:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        location: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tensor `{name}` in {location} has unsupported dtype {dtype}")]
    TensorDtype {
        name: String,
        location: String,
        dtype: String,
    },
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Msg(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile(path)
        } else {
            Error::Io { path, source }
        }
    }
}
