//! Full text-to-image pipeline, images/second, sana-rl against diffusers'
//! SanaPipeline on the same saved mid-size random pipeline, prompts, size, steps
//! and CFG, same torch and threads.
//!
//! `cargo bench -p sana --bench pipeline`. Env: BENCH_THREADS, BENCH_ITERS (3),
//! BENCH_WARMUP (1), BENCH_STEPS (10), BENCH_SIZE (256), BENCH_BATCH (2).

mod common;

use common::{env_usize, run_python_json, threads, time_per_iter};
use sana::pipelines::pipeline_sana::{GenerateRequest, SanaPipeline};
use tch::{Device, Kind};

fn main() -> anyhow::Result<()> {
    let threads = threads();
    let (warmup, iters) = (env_usize("BENCH_WARMUP", 1), env_usize("BENCH_ITERS", 3));
    let (steps, size, batch) = (
        env_usize("BENCH_STEPS", 10),
        env_usize("BENCH_SIZE", 256),
        env_usize("BENCH_BATCH", 2),
    );
    let dir = tempfile::tempdir()?;
    // The mid-size random pipeline, written by diffusers/transformers themselves.
    run_python_json(
        "scripts/make_random_pipeline.py",
        &[dir.path().display().to_string(), "mid".into()],
    )?;
    let pipe_dir = dir.path().join("pipeline");
    let pipe = SanaPipeline::from_pretrained(&pipe_dir, Device::Cpu, Kind::Float)?;
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
        pipe.generate(&req, |_, _| {}).expect("generate");
    });
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
        ],
    )?;
    let theirs = peer["seconds_per_call"].as_f64().unwrap_or(f64::NAN);
    println!(
        "SanaPipeline (mid-size random: Gemma-2 4×256, transformer 4×512, DC-AE f8c32), {batch} images {size}x{size}, {steps} DPM steps, CFG 4.5, fp32, CPU, {threads} threads, {iters} iters"
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
