//! Full text-to-image pipeline, images/second, sana-rl against diffusers'
//! SanaPipeline on the same saved mid-size random pipeline, prompts, size, steps
//! and CFG, same torch and threads.
//!
//! `cargo bench -p sana --bench pipeline`. Env: BENCH_THREADS, BENCH_ITERS (3),
//! BENCH_WARMUP (1), BENCH_STEPS (10), BENCH_SIZE (256), BENCH_BATCH (2),
//! BENCH_DEVICE (cpu|cuda), BENCH_DTYPE (fp32|bf16), BENCH_PIPELINE_DIR (time an
//! existing pipeline instead of the mid-size random one).

mod common;

use common::{env_usize, run_python_json, threads, time_per_iter};
use sana::pipelines::pipeline_sana::{GenerateRequest, SanaPipeline};
use tch::{Device, Kind};

fn env_str(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn main() -> anyhow::Result<()> {
    let threads = threads();
    let (warmup, iters) = (env_usize("BENCH_WARMUP", 1), env_usize("BENCH_ITERS", 3));
    let (steps, size, batch) = (
        env_usize("BENCH_STEPS", 10),
        env_usize("BENCH_SIZE", 256),
        env_usize("BENCH_BATCH", 2),
    );
    let (device_name, dtype) = (
        env_str("BENCH_DEVICE", "cpu"),
        env_str("BENCH_DTYPE", "fp32"),
    );
    let device = if device_name == "cuda" {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let kind = if dtype == "bf16" {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let dir = tempfile::tempdir()?;
    let pipe_dir = match std::env::var_os("BENCH_PIPELINE_DIR") {
        Some(d) => d.into(),
        None => {
            // The mid-size random pipeline, written by diffusers/transformers themselves.
            run_python_json(
                "scripts/make_random_pipeline.py",
                &[dir.path().display().to_string(), "mid".into()],
            )?;
            dir.path().join("pipeline")
        }
    };
    let pipe = SanaPipeline::from_pretrained(&pipe_dir, device, kind)?;
    let req = GenerateRequest {
        prompts: vec!["a photo of a lighthouse at dawn".into(); batch],
        num_inference_steps: steps,
        guidance_scale: 4.5,
        height: size as i64,
        width: size as i64,
        use_resolution_binning: false,
        ..Default::default()
    };
    let ours = time_per_iter(warmup, iters, || {
        let out = pipe.generate(&req, |_, _| {}).expect("generate");
        // Wait for the GPU: the images are read back to the host, as a PNG writer would.
        let _ = out.images.to_device(Device::Cpu);
    });
    drop(pipe);
    let peer = run_python_json(
        "scripts/bench/pipeline_diffusers.py",
        &[
            pipe_dir.display().to_string(),
            threads.to_string(),
            size.to_string(),
            size.to_string(),
            steps.to_string(),
            "4.5".into(),
            batch.to_string(),
            warmup.to_string(),
            iters.to_string(),
            device_name.clone(),
            dtype.clone(),
        ],
    )?;
    let theirs = peer["seconds_per_call"].as_f64().unwrap_or(f64::NAN);
    println!(
        "SanaPipeline {}, {batch} images {size}x{size}, {steps} DPM steps, CFG 4.5, {dtype}, {device_name} ({}), {threads} threads, {iters} iters",
        if std::env::var_os("BENCH_PIPELINE_DIR").is_some() { "(BENCH_PIPELINE_DIR)" } else { "(mid-size random: Gemma-2 4×256, transformer 4×512, DC-AE f8c32)" },
        peer["device"].as_str().unwrap_or("?"),
    );
    println!(
        "{:<12} {:>14} {:>14} {:>26}",
        "", "sana-rl", "diffusers", "speed-up (diffusers/ours)"
    );
    println!(
        "{:<12} {:>14.3} {:>14.3} {:>26.3}",
        "images/s",
        batch as f64 / ours,
        batch as f64 / theirs,
        theirs / ours
    );
    Ok(())
}
