//! Text encoders (from `transformers`): SANA conditions on Gemma-2.

pub mod gemma2;

pub use gemma2::{Gemma2Config, Gemma2Model};
