//! `diffusers/models/autoencoders/*`.

pub mod autoencoder_dc;
pub mod autoencoder_kl_wan;

pub use autoencoder_dc::{AutoencoderDC, AutoencoderDCConfig, TilingConfig};
