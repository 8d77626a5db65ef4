//! Sampling loops (`diffusers/pipelines/sana/*`). The text-to-image pipeline
//! builds on [`denoise`], the loop shared by every SANA pipeline.

pub mod aspect_ratio_bins;
pub mod denoise;
pub mod pipeline_sana;
pub mod preview;
pub mod text_encoding;
