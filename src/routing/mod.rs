//! Read/write routing: deciding which statements a streaming replica may run.

mod classify;
mod lex;

#[cfg(test)]
mod corpus;
#[cfg(test)]
mod tests;

pub use classify::{Class, Classified, Hint, WriteFunctions, classify};
