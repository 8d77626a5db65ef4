//! `sana bench-forward`: how fast a transformer of a given config runs here,
//! with random weights (no checkpoint needed).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use tch::{Device, Kind, Tensor};

use super::{DeviceArg, DtypeArg};
use crate::models::modeling_utils::parse_json;
use crate::models::transformers::sana_transformer::TransformerInputs;
use crate::models::{SanaTransformer2DModel, SanaTransformerConfig};

/// SANA 1.0 1.6B at 1024 px, as published in diffusers format.
pub const SANA_1600M_CONFIG_JSON: &str =
    include_str!("../../../configs/models/sana-1600m-1024px-transformer.json");

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A transformer config.json (default: SANA 1.6B 1024px).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub batch: i64,
    /// Latent size (pixels / 32).
    #[arg(long, default_value_t = 32)]
    pub latent_size: i64,
    #[arg(long, default_value_t = 300)]
    pub caption_len: i64,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16)]
    pub dtype: DtypeArg,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Also time forward+backward (gradients for all parameters).
    #[arg(long)]
    pub backward: bool,
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let device = args.device.resolve()?;
    let (path, text) = match &args.config {
        Some(p) => (
            p.clone(),
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        ),
        None => (
            PathBuf::from("<SANA 1.6B 1024px>"),
            SANA_1600M_CONFIG_JSON.to_string(),
        ),
    };
    let config: SanaTransformerConfig = parse_json(&path, &text)?;
    let t0 = Instant::now();
    let mut model = SanaTransformer2DModel::new(config.clone(), device)?;
    model.set_kind(args.dtype.kind());
    let n_params: i64 = model
        .vs
        .variables()
        .values()
        .map(|t| t.numel() as i64)
        .sum();
    tracing::info!(
        params = n_params,
        seconds = format!("{:.1}", t0.elapsed().as_secs_f64()),
        "built random-weight model"
    );

    let f = (Kind::Float, device);
    let b = args.batch;
    let hidden = Tensor::randn(
        [b, config.in_channels, args.latent_size, args.latent_size],
        f,
    );
    let enc = Tensor::randn([b, args.caption_len, config.caption_channels], f);
    let mask = Tensor::ones([b, args.caption_len], (Kind::Int64, device));
    let timestep = Tensor::full([b], 500.0, f);
    let inputs = TransformerInputs {
        hidden_states: &hidden,
        encoder_hidden_states: &enc,
        timestep: &timestep,
        guidance: None,
        encoder_attention_mask: Some(&mask),
    };
    let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        for _ in 0..args.warmup {
            f()?;
        }
        sync(device);
        let t = Instant::now();
        for _ in 0..args.iters {
            f()?;
        }
        sync(device);
        Ok(t.elapsed().as_secs_f64() / args.iters as f64)
    };
    let fwd = time(&mut || {
        let _ = tch::no_grad(|| model.forward(&inputs))?;
        Ok(())
    })?;
    tracing::info!(
        params = n_params,
        batch = b,
        latent = args.latent_size,
        dtype = ?args.dtype,
        device = ?device,
        ms = format!("{:.2}", fwd * 1e3),
        "forward"
    );
    if args.backward {
        let fb = time(&mut || {
            let out = model.forward(&inputs)?;
            out.to_kind(Kind::Float).square().mean(None).backward();
            Ok(())
        })?;
        tracing::info!(ms = format!("{:.2}", fb * 1e3), "forward+backward");
    }
    Ok(())
}
