//! `sana generate`: text to image, or text to video, with a SANA diffusers
//! pipeline directory (`SanaPipeline` or `SanaVideoPipeline`, from model_index.json).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use tch::{Device, Kind, Tensor};

use super::sample::SamplerArg;
use super::{DeviceArg, DtypeArg};
use crate::models::modeling_utils::read_safetensors;
use crate::pipelines::auto_pipeline::is_video_pipeline;
use crate::pipelines::pipeline_sana::{write_png, GenerateRequest, Sampler, SanaPipeline};
use crate::pipelines::pipeline_sana_video::{SanaVideoPipeline, VideoGenerateRequest};
use crate::pipelines::text_encoding::PromptOptions;
use crate::schedulers::solver::SolverConfig;
use crate::video_io::{write_mp4, write_png_frames};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// SANA pipeline directory as `save_pretrained` writes it (model_index.json,
    /// transformer/, vae/, text_encoder/, tokenizer/, scheduler/). A
    /// `SanaVideoPipeline` (SANA-Video with the Wan VAE) generates videos.
    #[arg(long)]
    pub model: PathBuf,
    /// A prompt; repeat for several.
    #[arg(long = "prompt", required = true)]
    pub prompts: Vec<String>,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Denoising steps [default: 20 for images, 50 for videos, as diffusers].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale, ≤ 1 disables it [default: 4.5 for images, 6 for videos].
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// [default: 1024 for images, 480 for videos]
    #[arg(long)]
    pub height: Option<i64>,
    /// [default: 1024 for images, 832 for videos]
    #[arg(long)]
    pub width: Option<i64>,
    /// Images (or videos) per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Video frames, 1 + 4k (video pipelines only) [default: 81].
    #[arg(long)]
    pub frames: Option<i64>,
    /// Frame rate written into the mp4 (video pipelines only).
    #[arg(long, default_value_t = 16)]
    pub fps: u32,
    #[arg(long)]
    pub seed: Option<i64>,
    /// `dpm`: the pipeline's scheduler/ config; `euler`: flow-matching Euler with its flow_shift.
    #[arg(long, value_enum, default_value_t = SamplerArg::Dpm)]
    pub sampler: SamplerArg,
    /// Sample with one of DiffusionNFT's rollout solvers instead of --sampler, as a
    /// DiffusionNFT run does: flow, dance, ddim, dpm1, dpm2 (euler = deterministic
    /// flow), over the sigma schedule of the pipeline's scheduler/ config.
    /// Deterministic unless --stochastic.
    #[arg(long, conflicts_with = "sampler")]
    pub solver: Option<String>,
    /// Stochastic sampling with --solver (flow, dance, ddim): the config's
    /// `deterministic_sampling = false`. Step noise comes from --seed when given.
    #[arg(long, requires = "solver")]
    pub stochastic: bool,
    /// eta of a stochastic solver (the config's `noise_level`).
    #[arg(long, default_value_t = 1.0, requires = "stochastic")]
    pub noise_level: f64,
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
    /// safetensors with tensor `noise` [B,C,h,w] (video: [B,C,T,h,w]): the initial
    /// latents (B = prompts × images).
    #[arg(long)]
    pub init_noise: Option<PathBuf>,
    /// Write the final latents (before the VAE) as tensor `latents` to this safetensors file.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Output: images: a `.png` path (several images get `_<i>` suffixes) or a
    /// directory; videos: an `.mp4` path (H.264; several get `_<i>`) or a directory
    /// of lossless PNG frames `<sample>_<frame>.png`.
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
    if is_video_pipeline(&args.model)? {
        return run_video(args);
    }
    if args.frames.is_some() {
        anyhow::bail!(
            "--frames: {} is an image pipeline (model_index.json is not a SanaVideoPipeline)",
            args.model.display()
        );
    }
    let device = args.device.resolve()?;
    let kind = DtypeArg::or_default_for(args.dtype, device);
    let pipe = load_pipeline(&args, device, kind)?;
    let req = build_request(&args)?;

    let bar = super::steps_bar(req.num_inference_steps, "generating");
    let t1 = Instant::now();
    let out = pipe.generate(&req, |i, _| bar.set_position(i as u64))?;
    bar.finish();
    let secs = t1.elapsed().as_secs_f64();

    let n = out.images.size()[0] as usize;
    let paths = output_paths(&args.out, n);
    create_parent(&paths[0])?;
    for (i, p) in paths.iter().enumerate() {
        write_png(&out.images.get(i as i64), p)?;
        tracing::info!(image = %p.display(), "wrote");
    }
    save_latents(&args, &out.latents)?;
    tracing::info!(images = n, seconds = format!("{secs:.2}"), "done");
    Ok(())
}

fn create_parent(path: &Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(())
}

fn save_latents(args: &GenerateArgs, latents: &Tensor) -> anyhow::Result<()> {
    if let Some(p) = &args.save_latents {
        let latents: Tensor = latents.to_device(Device::Cpu).contiguous();
        Tensor::write_safetensors(&[("latents", &latents)], p)
            .with_context(|| format!("writing {}", p.display()))?;
        tracing::info!(latents = %p.display(), "wrote final latents");
    }
    Ok(())
}

/// Where each video goes: `--out x.mp4` → x.mp4 (or x_0.mp4, x_1.mp4…); anything
/// else is a directory of PNG frames, `None` here.
pub fn video_paths(out: &Path, n: usize) -> Option<Vec<PathBuf>> {
    let is_mp4 = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("mp4"));
    if !is_mp4 {
        return None;
    }
    Some(if n == 1 {
        vec![out.to_path_buf()]
    } else {
        let stem = out.file_stem().unwrap_or_default().to_string_lossy();
        (0..n)
            .map(|i| out.with_file_name(format!("{stem}_{i}.mp4")))
            .collect()
    })
}

fn run_video(args: GenerateArgs) -> anyhow::Result<()> {
    let device = args.device.resolve()?;
    let kind = DtypeArg::or_default_for(args.dtype, device);
    let t0 = Instant::now();
    let mut pipe = SanaVideoPipeline::from_pretrained(&args.model, device, kind)
        .with_context(|| format!("loading video pipeline {}", args.model.display()))?;
    if let Some(lora) = &args.lora {
        pipe.load_lora_weights(lora, "default")
            .with_context(|| format!("loading LoRA {}", lora.display()))?;
    }
    tracing::info!(
        seconds = format!("{:.1}", t0.elapsed().as_secs_f64()),
        "pipeline loaded"
    );
    let req = build_video_request(&args)?;
    let bar = super::steps_bar(req.num_inference_steps, "generating video");
    let t1 = Instant::now();
    let out = pipe.generate(&req, |i, _| bar.set_position(i as u64))?;
    bar.finish();
    let secs = t1.elapsed().as_secs_f64();
    let n = out.videos.size()[0] as usize;
    match video_paths(&args.out, n) {
        Some(paths) => {
            create_parent(&paths[0])?;
            for (i, p) in paths.iter().enumerate() {
                // [3, T, H, W] → [T, 3, H, W]
                write_mp4(&out.videos.get(i as i64).transpose(0, 1), p, args.fps)?;
                tracing::info!(video = %p.display(), fps = args.fps, "wrote");
            }
        }
        None => {
            for i in 0..n {
                write_png_frames(
                    &out.videos.get(i as i64).transpose(0, 1),
                    &args.out,
                    &i.to_string(),
                )?;
            }
            tracing::info!(dir = %args.out.display(), "wrote PNG frames <sample>_<frame>.png");
        }
    }
    save_latents(&args, &out.latents)?;
    tracing::info!(
        videos = n,
        frames = out.videos.size()[2],
        seconds = format!("{secs:.2}"),
        "done"
    );
    Ok(())
}

fn read_init_noise(args: &GenerateArgs) -> anyhow::Result<Option<Tensor>> {
    Ok(match &args.init_noise {
        Some(p) => Some(
            read_safetensors(p)?
                .into_iter()
                .find(|(n, _)| n == "noise")
                .map(|(_, t)| t)
                .with_context(|| format!("{}: missing tensor `noise`", p.display()))?,
        ),
        None => None,
    })
}

fn sampler(args: &GenerateArgs) -> anyhow::Result<Sampler> {
    if let Some(name) = &args.solver {
        // The parse errors name config keys; say it with the flags here.
        let cfg =
            SolverConfig::parse(name, !args.stochastic, args.noise_level).map_err(
                |e| match &e {
                    crate::SanaError::Input { name: key, .. }
                        if key == "deterministic_sampling" =>
                    {
                        if name == "euler" {
                            anyhow::anyhow!(
                            "--solver euler is deterministic flow: use --solver flow --stochastic"
                        )
                        } else {
                            anyhow::anyhow!(
                                "--solver {name} is deterministic only: drop --stochastic"
                            )
                        }
                    }
                    crate::SanaError::Input { name: key, msg } if key == "noise_level" => {
                        anyhow::anyhow!("--noise-level: {msg}")
                    }
                    _ => anyhow::anyhow!("--solver {name}: {e}"),
                },
            )?;
        return Ok(Sampler::Solver(cfg));
    }
    Ok(match args.sampler {
        SamplerArg::Dpm => Sampler::Dpm,
        SamplerArg::Euler => Sampler::Euler,
    })
}

/// Per-sample step-noise seeds from `--seed` for a stochastic solver, so that a
/// seeded run repeats; `None` otherwise (the global generator).
fn noise_seeds(args: &GenerateArgs, samples: usize) -> Option<Vec<i64>> {
    let seed = args.seed.filter(|_| args.stochastic)?;
    Some(
        (0..samples as i64)
            .map(|i| seed.wrapping_mul(1_000_003).wrapping_add(i))
            .collect(),
    )
}

fn prompt_options(args: &GenerateArgs, mut opts: PromptOptions) -> PromptOptions {
    opts.max_sequence_length = args.max_sequence_length;
    if args.no_complex_human_instruction {
        opts.complex_human_instruction = None;
    }
    opts
}

/// The `SanaVideoPipeline.__call__` arguments the flags ask for.
pub fn build_video_request(args: &GenerateArgs) -> anyhow::Result<VideoGenerateRequest> {
    let d = VideoGenerateRequest::default();
    Ok(VideoGenerateRequest {
        prompts: args.prompts.clone(),
        negative_prompt: args.negative_prompt.clone(),
        num_inference_steps: args.steps.unwrap_or(d.num_inference_steps),
        guidance_scale: args.guidance_scale.unwrap_or(d.guidance_scale),
        height: args.height.unwrap_or(d.height),
        width: args.width.unwrap_or(d.width),
        frames: args.frames.unwrap_or(d.frames),
        num_videos_per_prompt: args.num_images,
        sampler: sampler(args)?,
        seed: args.seed,
        init_noise: read_init_noise(args)?,
        noise_seeds: noise_seeds(args, args.prompts.len() * args.num_images),
        use_resolution_binning: !args.no_resolution_binning,
        prompt_options: prompt_options(args, PromptOptions::video()),
        lora_scale: args.lora_scale,
    })
}

/// The `SanaPipeline.__call__` arguments the flags ask for.
pub fn build_request(args: &GenerateArgs) -> anyhow::Result<GenerateRequest> {
    let d = GenerateRequest::default();
    Ok(GenerateRequest {
        prompts: args.prompts.clone(),
        negative_prompt: args.negative_prompt.clone(),
        num_inference_steps: args.steps.unwrap_or(d.num_inference_steps),
        guidance_scale: args.guidance_scale.unwrap_or(d.guidance_scale),
        height: args.height.unwrap_or(d.height),
        width: args.width.unwrap_or(d.width),
        num_images_per_prompt: args.num_images,
        sampler: sampler(args)?,
        seed: args.seed,
        init_noise: read_init_noise(args)?,
        noise_seeds: noise_seeds(args, args.prompts.len() * args.num_images),
        use_resolution_binning: !args.no_resolution_binning,
        prompt_options: prompt_options(args, PromptOptions::default()),
        lora_scale: args.lora_scale,
    })
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
        let dir = parity_case("lora_pipeline");
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

    /// `sana generate` on a video pipeline, from diffusers' initial noise
    /// (scripts/parity/video.py, case dpm_cfg): PNG frames equal diffusers' frames
    /// quantised to 8 bits; an `.mp4` holds every frame at the asked fps.
    #[test]
    fn video_generate_writes_png_frames_and_mp4() {
        let dir = parity_case("pipeline_sana_video");
        let reference = load_named(&dir.join("dpm_cfg.safetensors"));
        let tmp = tempfile::tempdir().unwrap();
        let noise = tmp.path().join("noise.safetensors");
        Tensor::write_safetensors(&[("noise", &reference["noise"])], &noise).unwrap();
        let model = dir.join("pipeline").display().to_string();
        let noise = noise.display().to_string();
        let argv = |out: &Path| {
            let mut a: Vec<String> = vec![
                "sana".into(),
                "generate".into(),
                "--model".into(),
                model.clone(),
            ];
            for p in [
                "a red fox running in the snow",
                "Two cats playing chess, slow pan",
            ] {
                a.extend(["--prompt".into(), p.into()]);
            }
            for (f, v) in [
                ("--steps", "4"),
                ("--guidance-scale", "6"),
                ("--height", "64"),
                ("--width", "96"),
                ("--frames", "5"),
                ("--fps", "8"),
                ("--device", "cpu"),
                ("--dtype", "fp32"),
            ] {
                a.extend([f.into(), v.into()]);
            }
            a.extend([
                "--init-noise".into(),
                noise.clone(),
                "--no-resolution-binning".into(),
            ]);
            a.extend(["--out".into(), out.display().to_string()]);
            a
        };
        let run_cli = |out: &Path| {
            let Command::Generate(args) = Cli::try_parse_from(argv(out)).unwrap().command else {
                panic!("not a generate command")
            };
            run(args).unwrap();
        };
        let frames_dir = tmp.path().join("frames");
        run_cli(&frames_dir);
        let want = (&reference["videos"] * 255.0).round().to_kind(Kind::Uint8);
        for (b, t) in [(0, 0), (0, 4), (1, 2)] {
            let img = image::open(frames_dir.join(format!("{b}_{t}.png")))
                .unwrap()
                .to_rgb8();
            let got = Tensor::from_slice(img.as_raw())
                .view([64, 96, 3])
                .permute([2, 0, 1]);
            let w = want.get(b).select(1, t);
            let diff = (got.to_kind(Kind::Int) - w.to_kind(Kind::Int))
                .abs()
                .max()
                .int64_value(&[]);
            assert!(
                diff <= 1,
                "frame {b}_{t} differs from diffusers by {diff}/255"
            );
        }
        assert!(!frames_dir.join("0_5.png").exists());

        let mp4 = tmp.path().join("clip.mp4");
        run_cli(&mp4);
        for i in 0..2 {
            let c =
                crate::video_io::read_mp4(&tmp.path().join(format!("clip_{i}.mp4")), 0, None, 1)
                    .unwrap();
            assert_eq!(c.frames.size(), [5, 64, 96, 3]);
            assert_eq!(c.info.fps, 8.0);
        }

        // --frames on an image pipeline is refused.
        {
            let img = parity_case("pipeline_sana");
            let Command::Generate(args) = Cli::try_parse_from([
                "sana",
                "generate",
                "--model",
                &img.join("pipeline").display().to_string(),
                "--prompt",
                "x",
                "--frames",
                "5",
            ])
            .unwrap()
            .command
            else {
                panic!()
            };
            let e = run(args).unwrap_err().to_string();
            assert!(e.contains("image pipeline"), "{e}");
        }
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

    /// `--solver` picks a DiffusionNFT solver; refusals speak in flags.
    #[test]
    fn solver_flags() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["sana", "generate", "--model", "m", "--prompt", "p"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Command::Generate(a)) => sampler(&a).map_err(|e| e.to_string()),
                Ok(_) => panic!("not generate"),
                Err(e) => Err(e.to_string()),
            }
        };
        let cfg = |kind, deterministic, eta| {
            Ok(Sampler::Solver(SolverConfig {
                kind,
                deterministic,
                eta,
            }))
        };
        use crate::schedulers::solver::SolverKind;
        assert_eq!(
            parse(&["--solver", "dpm2"]),
            cfg(SolverKind::Dpm2, true, 1.0)
        );
        assert_eq!(
            parse(&["--solver", "flow", "--stochastic", "--noise-level", "0.7"]),
            cfg(SolverKind::Flow, false, 0.7)
        );
        assert_eq!(
            parse(&["--solver", "euler"]),
            cfg(SolverKind::Flow, true, 1.0)
        );
        let err = parse(&["--solver", "dpm2", "--stochastic"]).unwrap_err();
        assert!(err.contains("drop --stochastic"), "{err}");
        let err = parse(&["--solver", "euler", "--stochastic"]).unwrap_err();
        assert!(err.contains("--solver flow --stochastic"), "{err}");
        let err = parse(&["--solver", "heun"]).unwrap_err();
        assert!(err.contains("flow, dance, ddim, dpm1, dpm2"), "{err}");
        // --solver replaces --sampler; --noise-level needs --stochastic.
        assert!(parse(&["--solver", "flow", "--sampler", "euler"]).is_err());
        assert!(parse(&["--solver", "flow", "--noise-level", "0.5"]).is_err());
    }
}
