//! Models, one file per diffusers component (`diffusers/models/*`).

pub mod attention_processor;
pub mod autoencoders;
pub mod embeddings;
pub mod layers;
pub mod modeling_utils;
pub mod normalization;
pub mod text_encoders;
pub mod transformers;

pub use transformers::sana_transformer::{SanaTransformer2DModel, SanaTransformerConfig};
pub use transformers::transformer_sana_video::{
    SanaVideoTransformer3DModel, SanaVideoTransformerConfig,
};
pub use transformers::DiffusionTransformer;
