//! Sampling loops (`diffusers/pipelines/sana/*`, `sana_video/*`). The text-to-image
//! and text-to-video pipelines build on [`denoise`], the loop they share.

pub mod aspect_ratio_bins;
pub mod auto_pipeline;
pub mod denoise;
pub mod pipeline_sana;
pub mod pipeline_sana_video;
pub mod preview;
pub mod text_encoding;
