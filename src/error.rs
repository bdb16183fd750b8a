//! The library's one error type. Every failure names what it is about (tensor, field, op).
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CUDA driver error in {op}: {msg}")]
    Driver { op: String, msg: String },
    #[error("no CUDA device: {0}")]
    NoCuda(String),
    #[error("{op}: tensor `{tensor}` has shape {got:?}, expected {expected:?}")]
    Shape { op: String, tensor: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("config field `{field}`: {msg}")]
    Config { field: String, msg: String },
    #[error("weights: tensor `{name}`: {msg}")]
    Weights { name: String, msg: String },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("bad input: {0}")]
    BadInput(String),
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn config(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { field: field.into(), msg: msg.into() }
    }
    pub fn weights(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Weights { name: name.into(), msg: msg.into() }
    }
    pub fn file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::File { path: path.into(), msg: msg.to_string() }
    }
    pub fn bad_input(msg: impl Into<String>) -> Self {
        Error::BadInput(msg.into())
    }
    pub fn shape(op: &str, tensor: &str, expected: &[usize], got: &[usize]) -> Self {
        Error::Shape { op: op.into(), tensor: tensor.into(), expected: expected.to_vec(), got: got.to_vec() }
    }
}
