//! `diffusers/models/transformers/*`.

pub mod sana_transformer;
pub mod transformer_sana_video;

use tch::{nn, Device, Kind, Tensor};

use crate::lora::LoraAdapters;
use crate::Result;
pub use sana_transformer::{SanaTransformer2DModel, TransformerInputs};
pub use transformer_sana_video::SanaVideoTransformer3DModel;

/// What the sampling loop and the trainers need of a SANA transformer: the image
/// model (`[B, C, H, W]` latents) and the video model (`[B, C, T, H, W]`) run the
/// same pipeline and training code through this.
pub trait DiffusionTransformer {
    /// The velocity prediction, shaped like `hidden_states`.
    fn forward(&self, x: &TransformerInputs<'_>) -> Result<Tensor>;
    fn lora(&self) -> &LoraAdapters;
    fn var_store(&self) -> &nn::VarStore;
    fn var_store_mut(&mut self) -> &mut nn::VarStore;
    fn in_channels(&self) -> i64;
    fn out_channels(&self) -> i64;
    /// What the pipeline multiplies the scheduler's timestep by (SANA-Sprint's
    /// `timestep_scale`; 1 for the video model, whose pipeline passes it raw).
    fn timestep_scale(&self) -> f64;
    fn device(&self) -> Device;
    fn kind(&self) -> Kind;
}

impl DiffusionTransformer for SanaTransformer2DModel {
    fn forward(&self, x: &TransformerInputs<'_>) -> Result<Tensor> {
        SanaTransformer2DModel::forward(self, x)
    }
    fn lora(&self) -> &LoraAdapters {
        &self.lora
    }
    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }
    fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }
    fn in_channels(&self) -> i64 {
        self.config.in_channels
    }
    fn out_channels(&self) -> i64 {
        self.config.out_channels()
    }
    fn timestep_scale(&self) -> f64 {
        self.config.timestep_scale
    }
    fn device(&self) -> Device {
        SanaTransformer2DModel::device(self)
    }
    fn kind(&self) -> Kind {
        SanaTransformer2DModel::kind(self)
    }
}

impl DiffusionTransformer for SanaVideoTransformer3DModel {
    fn forward(&self, x: &TransformerInputs<'_>) -> Result<Tensor> {
        SanaVideoTransformer3DModel::forward(self, x)
    }
    fn lora(&self) -> &LoraAdapters {
        &self.lora
    }
    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }
    fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }
    fn in_channels(&self) -> i64 {
        self.config.in_channels
    }
    fn out_channels(&self) -> i64 {
        self.config.out_channels()
    }
    fn timestep_scale(&self) -> f64 {
        1.0
    }
    fn device(&self) -> Device {
        SanaVideoTransformer3DModel::device(self)
    }
    fn kind(&self) -> Kind {
        SanaVideoTransformer3DModel::kind(self)
    }
}
