//! `diffusers/models/transformers/*`.

pub mod sana_transformer;
pub mod transformer_sana_video;

use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

use crate::lora::LoraAdapters;
use crate::models::modeling_utils::SaveOptions;
use crate::Result;
pub use sana_transformer::{BlockContext, SanaTransformer2DModel, TransformerInputs};
pub use transformer_sana_video::SanaVideoTransformer3DModel;

/// What the sampling loop and the trainers need of a SANA transformer: the image
/// model (`[B, C, H, W]` latents) and the video model (`[B, C, T, H, W]`) run the
/// same pipeline and training code through this.
pub trait DiffusionTransformer: Send {
    /// The velocity prediction, shaped like `hidden_states`.
    fn forward(&self, x: &TransformerInputs<'_>) -> Result<Tensor>;
    fn lora(&self) -> &LoraAdapters;
    fn lora_mut(&mut self) -> &mut LoraAdapters;
    fn var_store(&self) -> &nn::VarStore;
    fn var_store_mut(&mut self) -> &mut nn::VarStore;
    fn in_channels(&self) -> i64;
    fn out_channels(&self) -> i64;
    /// What the pipeline multiplies the scheduler's timestep by (SANA-Sprint's
    /// `timestep_scale`; 1 for the video model, whose pipeline passes it raw).
    fn timestep_scale(&self) -> f64;
    fn device(&self) -> Device;
    fn kind(&self) -> Kind;
    /// Writes the base weights as a diffusers model folder (LoRA adapters excluded).
    fn save_pretrained_with(&self, dir: &Path, opts: &SaveOptions) -> Result<()>;
    /// The model in three stages, for FSDP's per-block sharding
    /// (`forward` = prelude, every block, finale).
    fn num_blocks(&self) -> usize;
    fn prelude(&self, x: &TransformerInputs<'_>) -> Result<(Tensor, BlockContext)>;
    fn block_forward(&self, i: usize, hs: &Tensor, ctx: &BlockContext) -> Tensor;
    fn finale(&self, hs: &Tensor, ctx: &BlockContext) -> Tensor;
}

/// Loads the transformer a diffusers folder's `config.json` names
/// (`SanaTransformer2DModel` or `SanaVideoTransformer3DModel`).
pub fn load_transformer(
    dir: &Path,
    device: Device,
    kind: Kind,
) -> Result<Box<dyn DiffusionTransformer>> {
    let file = dir.join("config.json");
    let text = std::fs::read_to_string(&file).map_err(|e| crate::SanaError::io(&file, e))?;
    let json: serde_json::Value = crate::models::modeling_utils::parse_json(&file, &text)?;
    Ok(match json.get("_class_name").and_then(|v| v.as_str()) {
        Some("SanaVideoTransformer3DModel") => Box::new(
            SanaVideoTransformer3DModel::from_pretrained(dir, device, kind)?,
        ),
        _ => Box::new(SanaTransformer2DModel::from_pretrained(dir, device, kind)?),
    })
}

impl DiffusionTransformer for SanaTransformer2DModel {
    fn forward(&self, x: &TransformerInputs<'_>) -> Result<Tensor> {
        SanaTransformer2DModel::forward(self, x)
    }
    fn lora(&self) -> &LoraAdapters {
        &self.lora
    }
    fn lora_mut(&mut self) -> &mut LoraAdapters {
        &mut self.lora
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
    fn save_pretrained_with(&self, dir: &Path, opts: &SaveOptions) -> Result<()> {
        SanaTransformer2DModel::save_pretrained_with(self, dir, opts)
    }
    fn num_blocks(&self) -> usize {
        SanaTransformer2DModel::num_blocks(self)
    }
    fn prelude(&self, x: &TransformerInputs<'_>) -> Result<(Tensor, BlockContext)> {
        SanaTransformer2DModel::prelude(self, x)
    }
    fn block_forward(&self, i: usize, hs: &Tensor, ctx: &BlockContext) -> Tensor {
        SanaTransformer2DModel::block_forward(self, i, hs, ctx)
    }
    fn finale(&self, hs: &Tensor, ctx: &BlockContext) -> Tensor {
        SanaTransformer2DModel::finale(self, hs, ctx)
    }
}

impl DiffusionTransformer for SanaVideoTransformer3DModel {
    fn forward(&self, x: &TransformerInputs<'_>) -> Result<Tensor> {
        SanaVideoTransformer3DModel::forward(self, x)
    }
    fn lora(&self) -> &LoraAdapters {
        &self.lora
    }
    fn lora_mut(&mut self) -> &mut LoraAdapters {
        &mut self.lora
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
    fn save_pretrained_with(&self, dir: &Path, opts: &SaveOptions) -> Result<()> {
        crate::models::modeling_utils::save_pretrained_with(&self.vs, &self.config, dir, opts)
    }
    fn num_blocks(&self) -> usize {
        SanaVideoTransformer3DModel::num_blocks(self)
    }
    fn prelude(&self, x: &TransformerInputs<'_>) -> Result<(Tensor, BlockContext)> {
        SanaVideoTransformer3DModel::prelude(self, x)
    }
    fn block_forward(&self, i: usize, hs: &Tensor, ctx: &BlockContext) -> Tensor {
        SanaVideoTransformer3DModel::block_forward(self, i, hs, ctx)
    }
    fn finale(&self, hs: &Tensor, ctx: &BlockContext) -> Tensor {
        SanaVideoTransformer3DModel::finale(self, hs, ctx)
    }
}
