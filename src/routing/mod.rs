//! Read/write routing: deciding which statements a streaming replica may run.

mod classify;
mod lex;

pub use classify::{Class, Classified, Hint, WriteFunctions, classify};
