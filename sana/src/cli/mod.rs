//! The `sana` command line: argument definitions and the commands, kept in the
//! library so they are testable; `src/bin/sana.rs` only dispatches.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use tch::{Device, Kind};

pub mod bench;
pub mod demo_clips;
pub mod forward;
pub mod generate;
pub mod sample;

#[derive(Parser, Debug)]
#[command(
    name = "sana",
    version,
    about = "SANA diffusion models on libtorch: generate images and videos, sample, run and check transformers.",
    long_about = "SANA diffusion models on libtorch.\n\n\
        Models are diffusers directories (config.json + diffusion_pytorch_model.safetensors, \
        or sharded with an index). Set RUST_LOG=debug for per-step logs."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Text to image (or video: a SanaVideoPipeline directory) with a SANA diffusers pipeline.
    Generate(generate::GenerateArgs),
    /// Sample latents with a SANA transformer (default: a tiny random-weight model).
    Sample(sample::SampleArgs),
    /// Run one transformer forward on tensors from a safetensors file.
    Forward(forward::ForwardArgs),
    /// Write a randomly initialised transformer as a diffusers model directory.
    InitModel(sample::InitModelArgs),
    /// Time a transformer forward (and backward) with random weights.
    BenchForward(bench::BenchArgs),
    /// Write a small video SFT folder (name.json + name.mp4 pairs of sliding colour stripes).
    WriteDemoClips(demo_clips::DemoClipsArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    /// CUDA if available, else CPU.
    Auto,
    Cpu,
    Cuda,
}

impl DeviceArg {
    pub fn resolve(self) -> anyhow::Result<Device> {
        match self {
            DeviceArg::Auto => Ok(Device::cuda_if_available()),
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            DeviceArg::Cuda => anyhow::bail!(
                "--device cuda: libtorch reports no CUDA device (is this a GPU machine with the CUDA build of torch?)"
            ),
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtypeArg {
    Fp32,
    Bf16,
    Fp16,
}

impl DtypeArg {
    /// The asked dtype, else bf16 on GPU and fp32 on CPU.
    pub fn or_default_for(arg: Option<DtypeArg>, device: Device) -> Kind {
        arg.map(DtypeArg::kind).unwrap_or(if device.is_cuda() {
            Kind::BFloat16
        } else {
            Kind::Float
        })
    }

    pub fn kind(self) -> Kind {
        match self {
            DtypeArg::Fp32 => Kind::Float,
            DtypeArg::Bf16 => Kind::BFloat16,
            DtypeArg::Fp16 => Kind::Half,
        }
    }
}

/// The progress bar of the sampling commands: one tick per denoising step.
pub fn steps_bar(steps: usize, message: &'static str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(steps as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} steps {elapsed_precise}",
        )
        .expect("valid template"),
    );
    bar.set_message(message);
    bar
}

/// Where relative default outputs go.
pub fn default_out_dir() -> PathBuf {
    PathBuf::from("out")
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Sample(a) => sample::run(a),
        Command::Forward(a) => forward::run(a),
        Command::InitModel(a) => sample::init_model(a),
        Command::BenchForward(a) => bench::run(a),
        Command::WriteDemoClips(a) => demo_clips::run(a),
    }
}
