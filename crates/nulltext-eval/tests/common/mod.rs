//! What the evaluation's reference tests share with the model crate's: fixture paths.
#![allow(dead_code)]

#[path = "../../../nulltext-models/tests/common/mod.rs"]
mod shared;

pub use shared::*;
