//! `sana`: the model library of sana-rl.
//!
//! Layout mirrors diffusers so a reader can hold the two side by side:
//! `models/` (one file per component, named as diffusers names it),
//! `schedulers/` (one file per scheduler), `pipelines/` (sampling loops).

pub mod cli;
pub mod config;
pub mod config_json;
pub mod data;
pub mod error;
pub mod lora;
pub mod models;
pub mod pipelines;
pub mod safetensors_io;
pub mod schedulers;
pub mod training;
pub mod video_io;

pub use error::{Result, SanaError};

#[cfg(test)]
pub(crate) mod testing;
