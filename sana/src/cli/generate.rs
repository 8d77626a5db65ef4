//! `sana generate`: text to image with a SANA diffusers pipeline directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
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
    /// LoRA adapter to apply: a PEFT folder (adapter_config.json + adapter_model.safetensors)
    /// or diffusers' pytorch_lora_weights.safetensors (the file, or a folder holding it).
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// Strength of the LoRA (diffusers' attention_kwargs={"scale": S}); needs --lora.
    #[arg(long, default_value_t = 1.0, requires = "lora")]
    pub lora_scale: f64,
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

/// Loads `--model` and, with `--lora`, the adapter (active, as diffusers' `load_lora_weights`).
pub fn load_pipeline(
    args: &GenerateArgs,
    device: Device,
    kind: Kind,
) -> anyhow::Result<SanaPipeline> {
    let t0 = Instant::now();
    let mut pipe = SanaPipeline::from_pretrained(&args.model, device, kind)
        .with_context(|| format!("loading pipeline {}", args.model.display()))?;
    if let Some(lora) = &args.lora {
        let format = pipe
            .load_lora_weights(lora, "default")
            .with_context(|| format!("loading LoRA {}", lora.display()))?;
        tracing::info!(lora = %lora.display(), ?format, scale = args.lora_scale, "LoRA adapter active");
    }
    tracing::info!(
        seconds = format!("{:.1}", t0.elapsed().as_secs_f64()),
        "pipeline loaded"
    );
    Ok(pipe)
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let device = args.device.resolve()?;
    let kind = DtypeArg::or_default_for(args.dtype, device);
    let pipe = load_pipeline(&args, device, kind)?;
    let req = build_request(&args)?;

    let bar = super::steps_bar(args.steps, "generating");
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

/// The `SanaPipeline.__call__` arguments the flags ask for.
pub fn build_request(args: &GenerateArgs) -> anyhow::Result<GenerateRequest> {
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
        lora_scale: args.lora_scale,
        ..Default::default()
    };
    req.prompt_options.max_sequence_length = args.max_sequence_length;
    if args.no_complex_human_instruction {
        req.prompt_options.complex_human_instruction = None;
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};
    use crate::lora::ActiveAdapter;
    use crate::testing::{load_named, max_abs_diff, parity_case};

    /// `sana generate --lora DIR --lora-scale S` against diffusers' `SanaPipeline` with
    /// the same adapter loaded (scripts/parity/lora.py, case `lora_pipeline`).
    fn check(case: &str) {
        let Some(dir) = parity_case("lora_pipeline") else {
            return;
        };
        let cases: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        let c = &cases[case];
        let reference = load_named(&dir.join(format!("{case}.safetensors")));
        let tmp = tempfile::tempdir().unwrap();
        let noise = tmp.path().join("noise.safetensors");
        Tensor::write_safetensors(&[("noise", &reference["noise"])], &noise).unwrap();
        let s = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        let mut argv: Vec<String> = ["sana", "generate", "--model"].map(String::from).to_vec();
        argv.push(dir.join("pipeline").display().to_string());
        for p in c["prompts"].as_array().unwrap() {
            argv.extend(["--prompt".into(), s(p)]);
        }
        for (flag, key) in [
            ("--negative-prompt", "negative_prompt"),
            ("--steps", "steps"),
            ("--guidance-scale", "guidance_scale"),
            ("--height", "height"),
            ("--width", "width"),
            ("--sampler", "sampler"),
            ("--lora-scale", "lora_scale"),
        ] {
            argv.extend([flag.into(), s(&c[key])]);
        }
        argv.extend([
            "--lora".into(),
            dir.join(s(&c["lora"])).display().to_string(),
        ]);
        argv.extend(["--init-noise".into(), noise.display().to_string()]);
        argv.extend(
            [
                "--no-resolution-binning",
                "--device",
                "cpu",
                "--dtype",
                "fp32",
            ]
            .map(String::from),
        );
        let Command::Generate(args) = Cli::try_parse_from(&argv).unwrap().command else {
            panic!("not a generate command")
        };
        let pipe = load_pipeline(&args, Device::Cpu, Kind::Float).unwrap();
        let req = build_request(&args).unwrap();
        let out = pipe.generate(&req, |_, _| {}).unwrap();
        let lat_err = max_abs_diff(&out.latents, &reference["latents"]);
        let img_err = max_abs_diff(&out.images, &reference["images"]);
        eprintln!(
            "generate --lora {case}: latents max abs err {lat_err:.3e}, images {img_err:.3e}"
        );
        assert!(
            img_err <= 1e-3,
            "{case}: image max abs error {img_err:e} > 1e-3"
        );
        assert_eq!(
            pipe.transformer.lora.scale(),
            1.0,
            "the per-call scale is restored"
        );

        // Without the adapter the same call must miss the reference (the LoRA matters).
        pipe.transformer
            .lora
            .set_active(ActiveAdapter::Disabled)
            .unwrap();
        let base = pipe.generate(&req, |_, _| {}).unwrap();
        let err = max_abs_diff(&base.images, &reference["images"]);
        eprintln!("generate without the LoRA {case}: images max abs err {err:.3e}");
        assert!(
            err > 1e-3,
            "the adapter made no visible difference ({err:e})"
        );
    }

    #[test]
    fn lora_parity_peft_folder_dpm_cfg() {
        check("dpm_cfg");
    }

    #[test]
    fn lora_parity_diffusers_file_scaled_euler() {
        check("euler_scaled");
    }

    #[test]
    fn lora_scale_needs_lora() {
        let err = Cli::try_parse_from([
            "sana",
            "generate",
            "--model",
            "m",
            "--prompt",
            "p",
            "--lora-scale",
            "0.5",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--lora"), "{err}");
        Cli::try_parse_from(["sana", "generate", "--model", "m", "--prompt", "p"]).unwrap();
    }
}
