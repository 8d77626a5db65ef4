//! `sana sample` (the README's main job for now) and `sana init-model`.
//!
//! Until the text encoder and VAE land, sampling starts from random caption
//! embeddings and stops at the final latents, written as safetensors with a
//! preview PNG of their first three channels.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tch::{Device, Kind, Tensor};

use super::{DeviceArg, DtypeArg};
use crate::models::modeling_utils::parse_json;
use crate::models::{SanaTransformer2DModel, SanaTransformerConfig};
use crate::pipelines::denoise::{denoise, Conditioning, DenoiseRequest};
use crate::pipelines::preview::write_latent_preview;
use crate::schedulers::{
    DPMSolverMultistepConfig, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
    Scheduler,
};

/// The embedded default model: a tiny SANA-1.5-shaped transformer.
pub const TINY_CONFIG_JSON: &str = include_str!("../../../configs/demo/tiny-sana-transformer.json");

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerArg {
    /// DPM-Solver++ (2M) with flow sigmas: SANA's own scheduler config.
    Dpm,
    /// Flow-matching Euler with the same flow shift.
    Euler,
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// diffusers transformer directory; default: the embedded tiny random-weight model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A diffusers `scheduler_config.json` (default: SANA's DPM-Solver++ config, flow_shift 3).
    #[arg(long)]
    pub scheduler_config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = SamplerArg::Dpm)]
    pub sampler: SamplerArg,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 disables it).
    #[arg(long, default_value_t = 4.5)]
    pub guidance_scale: f64,
    /// Latent height (pixels / 32 for SANA's DC-AE).
    #[arg(long, default_value_t = 32)]
    pub latent_height: i64,
    #[arg(long, default_value_t = 32)]
    pub latent_width: i64,
    #[arg(long, default_value_t = 1)]
    pub num_samples: i64,
    /// Caption length of the random caption embeddings.
    #[arg(long, default_value_t = 16)]
    pub caption_len: i64,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Output directory: latents.safetensors and preview_<i>.png.
    #[arg(long, default_value = "out/sample")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Weights dtype (default: bf16 on GPU, fp32 on CPU).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
}

#[derive(Args, Debug)]
pub struct InitModelArgs {
    /// A transformer `config.json` (default: the embedded tiny config).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
}

fn config_from(path: Option<&PathBuf>) -> anyhow::Result<SanaTransformerConfig> {
    let (p, text) = match path {
        Some(p) => (
            p.clone(),
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        ),
        None => (
            PathBuf::from("<embedded tiny config>"),
            TINY_CONFIG_JSON.to_string(),
        ),
    };
    Ok(parse_json(&p, &text)?)
}

pub fn init_model(args: InitModelArgs) -> anyhow::Result<()> {
    tch::manual_seed(args.seed);
    let config = config_from(args.config.as_ref())?;
    let model = SanaTransformer2DModel::new(config, Device::Cpu)?;
    model.save_pretrained(&args.out)?;
    tracing::info!(out = %args.out.display(), "wrote random-weight transformer");
    Ok(())
}

pub fn run(args: SampleArgs) -> anyhow::Result<()> {
    let device = args.device.resolve()?;
    let kind = DtypeArg::or_default_for(args.dtype, device);
    tch::manual_seed(args.seed);
    let model = match &args.model {
        Some(dir) => SanaTransformer2DModel::from_pretrained(dir, device, kind)
            .with_context(|| format!("loading model {}", dir.display()))?,
        None => {
            tracing::info!("no --model: using the embedded tiny random-weight SANA transformer");
            let mut m = SanaTransformer2DModel::new(config_from(None)?, device)?;
            m.set_kind(kind);
            m
        }
    };
    let dpm = match &args.scheduler_config {
        Some(p) => {
            DPMSolverMultistepScheduler::from_config(DPMSolverMultistepConfig::from_json_file(p)?)?
        }
        None => DPMSolverMultistepScheduler::sana_default(),
    };
    let mut scheduler: Box<dyn Scheduler> = match args.sampler {
        SamplerArg::Dpm => Box::new(dpm),
        SamplerArg::Euler => Box::new(FlowMatchEulerDiscreteScheduler::new(
            dpm.config().flow_shift,
        )),
    };

    let cfg = &model.config;
    let b = args.num_samples;
    let fopts = (Kind::Float, device);
    let latents = Tensor::randn(
        [b, cfg.in_channels, args.latent_height, args.latent_width],
        fopts,
    ) * scheduler.init_noise_sigma();
    // Stand-ins for Gemma-2 caption states until the text encoder lands.
    let embeds = Tensor::randn([b, args.caption_len, cfg.caption_channels], fopts);
    let mask = Tensor::ones([b, args.caption_len], (Kind::Int64, device));
    let neg_embeds = Tensor::zeros([b, args.caption_len, cfg.caption_channels], fopts);

    let bar = super::steps_bar(args.steps, "sampling");
    let start = Instant::now();
    let out = denoise(
        &model,
        scheduler.as_mut(),
        DenoiseRequest {
            latents,
            prompt: Conditioning {
                embeds: &embeds,
                mask: &mask,
            },
            negative: Some(Conditioning {
                embeds: &neg_embeds,
                mask: &mask,
            }),
            guidance_scale: args.guidance_scale,
            num_inference_steps: args.steps,
            solver: None,
            step_noise: Default::default(),
        },
        |i, _| bar.set_position(i as u64),
    )?;
    bar.finish();
    let secs = start.elapsed().as_secs_f64();

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let latents_path = args.out.join("latents.safetensors");
    let out = out.to_device(Device::Cpu).contiguous();
    Tensor::write_safetensors(&[("latents", &out)], &latents_path)
        .with_context(|| format!("writing {}", latents_path.display()))?;
    let mut previews = Vec::new();
    for i in 0..b {
        let p = args.out.join(format!("preview_{i}.png"));
        write_latent_preview(&out.get(i), &p, 8)?;
        previews.push(p);
    }
    tracing::info!(
        steps = args.steps,
        seconds = format!("{secs:.2}"),
        latents = %latents_path.display(),
        shape = ?out.size(),
        "done"
    );
    for p in &previews {
        tracing::info!(preview = %p.display(), "wrote latent preview (first 3 channels)");
    }
    Ok(())
}
