//! `diffusers/models/autoencoders/*`.

pub mod autoencoder_dc;

pub use autoencoder_dc::{AutoencoderDC, AutoencoderDCConfig, TilingConfig};
