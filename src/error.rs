//! Library error type. Each variant says which area failed and, where possible, how to fix it.

use std::path::PathBuf;

/// Errors raised by the flowlab library. The binary wraps them with `anyhow`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A layer was given an input shape it cannot handle (e.g. squeeze of odd height).
    #[error("shape error in {layer}: {msg}")]
    Shape { layer: String, msg: String },

    /// Host-side linear algebra failed (singular matrix, non-square input).
    #[error("linear algebra: {0}")]
    Linalg(String),

    /// A layer was called without the context it needs (e.g. a conditional coupling without its condition).
    #[error("{0}")]
    Usage(String),

    /// Reading or writing a file failed. The I/O error is part of the message, not a
    /// `source()`: printed as a chain (`{:#}`) it would otherwise appear twice.
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    /// A dataset could not be read or found; the message says where we looked.
    #[error("data: {0}")]
    Data(String),

    /// A checkpoint does not match the model it is loaded into.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },

    /// A stop request (Ctrl-C) ended an evaluation before its last batch.
    #[error("stopped on request")]
    Stopped,
}

impl Error {
    pub(crate) fn shape(layer: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Shape {
            layer: layer.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }
}

/// `Result` with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
