//! Read/write routing: deciding which statements a streaming replica may run.

mod classify;
mod lex;
pub mod monitor;
pub mod route;

#[cfg(test)]
mod corpus;
#[cfg(test)]
mod tests;

pub use classify::{Class, Classified, Hint, WriteFunctions, classify};
