//! Sampling loops (`diffusers/pipelines/sana/*`). The text-to-image pipeline
//! builds on [`denoise`], the loop shared by every SANA pipeline.

pub mod denoise;
pub mod preview;
