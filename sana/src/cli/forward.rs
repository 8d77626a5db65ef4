//! `sana forward`: one transformer forward on tensors from a file, for checking a
//! checkpoint against another implementation.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tch::{Kind, Tensor};

use super::{DeviceArg, DtypeArg};
use crate::models::modeling_utils::read_safetensors;
use crate::models::transformers::sana_transformer::TransformerInputs;
use crate::models::SanaTransformer2DModel;

#[derive(Args, Debug)]
pub struct ForwardArgs {
    /// diffusers transformer directory (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// safetensors with `hidden_states` [B,C,H,W], `encoder_hidden_states` [B,L,D],
    /// `timestep` [B], and optionally `encoder_attention_mask` [B,L] (1 keep, 0 pad)
    /// and `guidance` [B] (SANA-Sprint).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Output safetensors; gets one tensor, `sample`.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    #[arg(long, value_enum, default_value_t = DtypeArg::Fp32)]
    pub dtype: DtypeArg,
}

pub fn run(args: ForwardArgs) -> anyhow::Result<()> {
    let device = args.device.resolve()?;
    let model = SanaTransformer2DModel::from_pretrained(&args.model, device, args.dtype.kind())
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let tensors = read_safetensors(&args.inputs)?;
    let get = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t);
    let required = |name: &str| {
        get(name).with_context(|| format!("{}: missing tensor `{name}`", args.inputs.display()))
    };
    let inputs = TransformerInputs {
        hidden_states: required("hidden_states")?,
        encoder_hidden_states: required("encoder_hidden_states")?,
        timestep: required("timestep")?,
        guidance: get("guidance"),
        encoder_attention_mask: get("encoder_attention_mask"),
    };
    let sample = tch::no_grad(|| model.forward(&inputs))
        .with_context(|| format!("running the model on {}", args.inputs.display()))?;
    let sample = sample
        .to_kind(Kind::Float)
        .to_device(tch::Device::Cpu)
        .contiguous();
    Tensor::write_safetensors(&[("sample", &sample)], &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    tracing::info!(out = %args.out.display(), shape = ?sample.size(), "wrote sample");
    Ok(())
}
