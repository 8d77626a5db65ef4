//! `diffusers/models/transformers/*`.

pub mod sana_transformer;
