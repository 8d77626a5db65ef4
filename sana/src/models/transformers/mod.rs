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

/// Both models have the same fields and stage methods: the trait delegates to
/// them. `$scale` is the model's `timestep_scale` (the video pipeline passes the
/// scheduler's value raw).
macro_rules! delegate_transformer {
    ($ty:ty, |$m:ident| $scale:expr) => {
        impl DiffusionTransformer for $ty {
            fn forward(&self, x: &TransformerInputs<'_>) -> Result<Tensor> {
                <$ty>::forward(self, x)
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
                let $m = self;
                $scale
            }
            fn device(&self) -> Device {
                <$ty>::device(self)
            }
            fn kind(&self) -> Kind {
                <$ty>::kind(self)
            }
            fn save_pretrained_with(&self, dir: &Path, opts: &SaveOptions) -> Result<()> {
                crate::models::modeling_utils::save_pretrained_with(
                    &self.vs,
                    &self.config,
                    dir,
                    opts,
                )
            }
            fn num_blocks(&self) -> usize {
                <$ty>::num_blocks(self)
            }
            fn prelude(&self, x: &TransformerInputs<'_>) -> Result<(Tensor, BlockContext)> {
                <$ty>::prelude(self, x)
            }
            fn block_forward(&self, i: usize, hs: &Tensor, ctx: &BlockContext) -> Tensor {
                <$ty>::block_forward(self, i, hs, ctx)
            }
            fn finale(&self, hs: &Tensor, ctx: &BlockContext) -> Tensor {
                <$ty>::finale(self, hs, ctx)
            }
        }
    };
}

delegate_transformer!(SanaTransformer2DModel, |m| m.config.timestep_scale);
delegate_transformer!(SanaVideoTransformer3DModel, |_m| 1.0);
