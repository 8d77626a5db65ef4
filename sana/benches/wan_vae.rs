//! Wan 2.1 VAE decode (SANA-Video's 480p VAE, default config, random weights):
//! sana-rl's `AutoencoderKLWan` against diffusers' on the same weights and
//! latents, per latent frame count: time and the peak extra resident memory of
//! the decode (CPU). Both decode one latent frame at a time with a feature
//! cache, so memory should stay flat as the clip grows; the output buffer
//! itself grows (3 × frames × H × W × 4 bytes).
//!
//! `cargo bench -p sana --bench wan_vae`. Env: BENCH_HEIGHT (240), BENCH_WIDTH
//! (416), BENCH_LATENT_FRAMES ("1,3,6": 1, 9 and 21 frames), BENCH_THREADS,
//! BENCH_PYTHON.

#[allow(dead_code)] // shared with the other benches; this one times its own way
mod common;

use std::time::Instant;

use common::{env_usize, run_python_json, threads};
use sana::models::autoencoders::autoencoder_kl_wan::AutoencoderKLWan;
use tch::{Device, Kind, Tensor};

fn status_mb(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let threads = threads();
    let (h, w) = (
        env_usize("BENCH_HEIGHT", 240),
        env_usize("BENCH_WIDTH", 416),
    );
    let ts = std::env::var("BENCH_LATENT_FRAMES").unwrap_or_else(|_| "1,3,6".into());
    let dir = tempfile::tempdir()?;
    let peer = run_python_json(
        "scripts/bench/wan_vae_python.py",
        &[
            dir.path().display().to_string(),
            h.to_string(),
            w.to_string(),
            ts.clone(),
            threads.to_string(),
        ],
    )?;
    let vae = AutoencoderKLWan::from_pretrained(&dir.path().join("vae"), Device::Cpu, Kind::Float)?;
    println!(
        "Wan 2.1 VAE decode (base_dim 96, z 16; random weights), {h}x{w}, fp32, CPU, {threads} threads"
    );
    println!(
        "{:>7} {:>7} {:>12} {:>12} {:>9} {:>14} {:>14}",
        "latent",
        "frames",
        "sana-rl (s)",
        "diffusers (s)",
        "speed-up",
        "sana-rl peak",
        "diffusers peak"
    );
    for t in ts.split(',').map(|x| x.trim().parse::<i64>()) {
        let t = t?;
        tch::manual_seed(t);
        let z = Tensor::randn(
            [1, vae.config.z_dim, t, h as i64 / 8, w as i64 / 8],
            (Kind::Float, Device::Cpu),
        );
        std::fs::write("/proc/self/clear_refs", "5")?; // reset the peak to now
        let base = status_mb("VmRSS");
        let t0 = Instant::now();
        let video = tch::no_grad(|| vae.decode(&z))?;
        let secs = t0.elapsed().as_secs_f64();
        let peak = status_mb("VmHWM") - base;
        let p = &peer[t.to_string()];
        let (ps, pm) = (
            p["seconds"].as_f64().unwrap_or(f64::NAN),
            p["peak_mb"].as_f64().unwrap_or(f64::NAN),
        );
        println!(
            "{t:>7} {:>7} {secs:>12.2} {ps:>12.2} {:>8.2}x {:>11.0} MB {:>11.0} MB",
            video.size()[2],
            ps / secs,
            peak,
            pm
        );
    }
    Ok(())
}
