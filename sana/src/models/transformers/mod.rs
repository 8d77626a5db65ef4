//! `diffusers/models/transformers/*`.

pub mod sana_transformer;
pub mod transformer_sana_video;
