//! Transformer forward and forward+backward, sana-rl against diffusers, side by
//! side on the same weights, inputs, torch build and thread count.
//!
//! `cargo bench -p sana --bench transformer` (the README says how to get the
//! environment). Env: BENCH_THREADS (default: all cores), BENCH_ITERS (5),
//! BENCH_WARMUP (2), BENCH_PYTHON (default: `python` of $VIRTUAL_ENV, else python3).

mod common;

use common::{env_usize, run_python_json, threads, time_per_iter};
use sana::models::transformers::sana_transformer::TransformerInputs;
use sana::models::{SanaTransformer2DModel, SanaTransformerConfig};
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let threads = threads();
    let (warmup, iters) = (env_usize("BENCH_WARMUP", 2), env_usize("BENCH_ITERS", 5));
    tch::manual_seed(0);

    // Mid-size: 4 blocks, width 512, 32×32 latents, batch 4, 300 caption tokens.
    let config = SanaTransformerConfig {
        in_channels: 32,
        out_channels: Some(32),
        num_attention_heads: 16,
        attention_head_dim: 32,
        num_layers: 4,
        num_cross_attention_heads: Some(16),
        cross_attention_head_dim: Some(32),
        cross_attention_dim: Some(512),
        caption_channels: 512,
        sample_size: 32,
        qk_norm: Some("rms_norm_across_heads".into()),
        ..Default::default()
    };
    let model = SanaTransformer2DModel::new(config.clone(), Device::Cpu)?;
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    model.save_pretrained(&model_dir)?;
    let f = (Kind::Float, Device::Cpu);
    let (b, l) = (4, 300);
    let hidden = Tensor::randn([b, 32, 32, 32], f);
    let enc = Tensor::randn([b, l, 512], f);
    let mask = Tensor::ones([b, l], (Kind::Int64, Device::Cpu));
    let _ = mask.narrow(1, 200, 100).narrow(0, 1, 3).fill_(0);
    let timestep = Tensor::from_slice(&[999.0f32, 700.0, 400.0, 10.0]);
    let inputs_path = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(
        &[
            ("hidden_states", &hidden),
            ("encoder_hidden_states", &enc),
            ("encoder_attention_mask", &mask),
            ("timestep", &timestep),
        ],
        &inputs_path,
    )?;
    let inputs = TransformerInputs {
        hidden_states: &hidden,
        encoder_hidden_states: &enc,
        timestep: &timestep,
        guidance: None,
        encoder_attention_mask: Some(&mask),
    };

    let ours_fwd = time_per_iter(warmup, iters, || {
        let _ = tch::no_grad(|| model.forward(&inputs).unwrap());
    });
    let vars: Vec<Tensor> = model.vs.trainable_variables();
    let ours_bwd = time_per_iter(warmup, iters, || {
        for v in &vars {
            let mut g = v.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let out = model.forward(&inputs).unwrap();
        out.square().mean(None).backward();
    });

    let peer = run_python_json(
        "scripts/bench/transformer_diffusers.py",
        &[
            model_dir.display().to_string(),
            inputs_path.display().to_string(),
            threads.to_string(),
            warmup.to_string(),
            iters.to_string(),
        ],
    )?;
    let theirs_fwd = peer["forward"].as_f64().unwrap_or(f64::NAN);
    let theirs_bwd = peer["forward_backward"].as_f64().unwrap_or(f64::NAN);

    println!(
        "SANA transformer, 4 blocks, width 512, 32x32 latents, batch 4, 300 caption tokens, fp32, CPU, {threads} threads, {iters} iters"
    );
    println!(
        "{:<18} {:>12} {:>12} {:>22}",
        "", "sana-rl (s)", "diffusers (s)", "speed-up (diffusers/ours)"
    );
    for (name, ours, theirs) in [
        ("forward", ours_fwd, theirs_fwd),
        ("forward+backward", ours_bwd, theirs_bwd),
    ] {
        println!(
            "{name:<18} {ours:>12.4} {theirs:>12.4} {:>22.3}",
            theirs / ours
        );
    }
    Ok(())
}
