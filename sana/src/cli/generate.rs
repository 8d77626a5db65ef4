//! `sana generate`: text to image with a SANA diffusers pipeline directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tch::{Device, Kind, Tensor};

use super::sample::SamplerArg;
use super::{DeviceArg, DtypeArg};
use crate::models::modeling_utils::read_safetensors;
use crate::pipelines::pipeline_sana::{write_png, GenerateRequest, Sampler, SanaPipeline};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// SANA pipeline directory as `save_pretrained` writes it (model_index.json,
    /// transformer/, vae/, text_encoder/, tokenizer/, scheduler/).
    #[arg(long)]
    pub model: PathBuf,
    /// A prompt; repeat for several.
    #[arg(long = "prompt", required = true)]
    pub prompts: Vec<String>,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Classifier-free guidance scale (≤ 1 disables it).
    #[arg(long, default_value_t = 4.5)]
    pub guidance_scale: f64,
    #[arg(long, default_value_t = 1024)]
    pub height: i64,
    #[arg(long, default_value_t = 1024)]
    pub width: i64,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    #[arg(long)]
    pub seed: Option<i64>,
    /// `dpm`: the pipeline's scheduler/ config; `euler`: flow-matching Euler with its flow_shift.
    #[arg(long, value_enum, default_value_t = SamplerArg::Dpm)]
    pub sampler: SamplerArg,
    /// Generate at exactly --height × --width instead of snapping to diffusers' resolution bins.
    #[arg(long)]
    pub no_resolution_binning: bool,
    #[arg(long, default_value_t = 300)]
    pub max_sequence_length: usize,
    /// Do not prefix prompts with SANA's complex human instruction.
    #[arg(long)]
    pub no_complex_human_instruction: bool,
    /// safetensors with tensor `noise` [B,C,h,w]: the initial latents (B = prompts × images).
    #[arg(long)]
    pub init_noise: Option<PathBuf>,
    /// Write the final latents (before the VAE) as tensor `latents` to this safetensors file.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Output: a `.png` path (several images get `_<i>` suffixes) or a directory.
    #[arg(long, default_value = "out/generate")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Default: bf16 on GPU, fp32 on CPU.
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
}

/// Output file names: `--out x.png` → x.png (or x_0.png, x_1.png…); a directory → image_<i>.png.
pub fn output_paths(out: &Path, n: usize) -> Vec<PathBuf> {
    let is_png = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    match (is_png, n) {
        (true, 1) => vec![out.to_path_buf()],
        (true, _) => {
            let stem = out.file_stem().unwrap_or_default().to_string_lossy();
            (0..n)
                .map(|i| out.with_file_name(format!("{stem}_{i}.png")))
                .collect()
        }
        (false, _) => (0..n).map(|i| out.join(format!("image_{i}.png"))).collect(),
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let device = args.device.resolve()?;
    let kind = args
        .dtype
        .map(DtypeArg::kind)
        .unwrap_or(if device.is_cuda() {
            Kind::BFloat16
        } else {
            Kind::Float
        });
    let t0 = Instant::now();
    let pipe = SanaPipeline::from_pretrained(&args.model, device, kind)
        .with_context(|| format!("loading pipeline {}", args.model.display()))?;
    tracing::info!(
        seconds = format!("{:.1}", t0.elapsed().as_secs_f64()),
        "pipeline loaded"
    );
    let init_noise = match &args.init_noise {
        Some(p) => Some(
            read_safetensors(p)?
                .into_iter()
                .find(|(n, _)| n == "noise")
                .map(|(_, t)| t)
                .with_context(|| format!("{}: missing tensor `noise`", p.display()))?,
        ),
        None => None,
    };
    let mut req = GenerateRequest {
        prompts: args.prompts.clone(),
        negative_prompt: args.negative_prompt.clone(),
        num_inference_steps: args.steps,
        guidance_scale: args.guidance_scale,
        height: args.height,
        width: args.width,
        num_images_per_prompt: args.num_images,
        sampler: match args.sampler {
            SamplerArg::Dpm => Sampler::Dpm,
            SamplerArg::Euler => Sampler::Euler,
        },
        seed: args.seed,
        init_noise,
        use_resolution_binning: !args.no_resolution_binning,
        ..Default::default()
    };
    req.prompt_options.max_sequence_length = args.max_sequence_length;
    if args.no_complex_human_instruction {
        req.prompt_options.complex_human_instruction = None;
    }

    let bar = ProgressBar::new(args.steps as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps {elapsed_precise}")
            .expect("valid template"),
    );
    bar.set_message("generating");
    let t1 = Instant::now();
    let out = pipe.generate(&req, |i, _| bar.set_position(i as u64))?;
    bar.finish();
    let secs = t1.elapsed().as_secs_f64();

    let n = out.images.size()[0] as usize;
    let paths = output_paths(&args.out, n);
    if let Some(parent) = paths[0].parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    for (i, p) in paths.iter().enumerate() {
        write_png(&out.images.get(i as i64), p)?;
        tracing::info!(image = %p.display(), "wrote");
    }
    if let Some(p) = &args.save_latents {
        let latents: Tensor = out.latents.to_device(Device::Cpu).contiguous();
        Tensor::write_safetensors(&[("latents", &latents)], p)
            .with_context(|| format!("writing {}", p.display()))?;
        tracing::info!(latents = %p.display(), "wrote final latents");
    }
    tracing::info!(images = n, seconds = format!("{secs:.2}"), "done");
    Ok(())
}
