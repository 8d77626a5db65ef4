//! One DiffusionNFT training step (per timestep: 3 forwards + 1 backward), sana-rl's
//! `NftTrainer` against the Python reference of Cosmos-RL's step on diffusers + PEFT
//! (scripts/bench/nft_step_python.py), side by side: same model config, LoRA,
//! batch, step config, torch build and thread count.
//!
//! `cargo bench -p sana --bench nft_step`. Env: BENCH_THREADS (default: all
//! cores), BENCH_ITERS (3), BENCH_WARMUP (1), BENCH_PYTHON.

mod common;

use common::{env_usize, run_python_json, threads, time_per_iter};
use sana::lora::{InitLoraWeights, LoraConfig, TargetModules};
use sana::models::{SanaTransformer2DModel, SanaTransformerConfig};
use sana::training::lr_schedule::{DecayType, LrSchedule};
use sana::training::nft::NftLossConfig;
use sana::training::nft_trainer::{NftBatch, NftTrainer, NftTrainerConfig};
use sana::training::optim::AdamWConfig;
use tch::{Device, Kind, Tensor};

const TARGETS: [&str; 8] = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
];

fn main() -> anyhow::Result<()> {
    let threads = threads();
    let (warmup, iters) = (env_usize("BENCH_WARMUP", 1), env_usize("BENCH_ITERS", 3));
    tch::manual_seed(0);

    // Tiny-to-mid: 4 blocks, width 256, 16×16 latents (a 512 px image at SANA's
    // 32× DC-AE is 16×16), 8 samples, 120 caption tokens.
    let config = SanaTransformerConfig {
        in_channels: 32,
        out_channels: Some(32),
        num_attention_heads: 8,
        attention_head_dim: 32,
        num_layers: 4,
        num_cross_attention_heads: Some(8),
        cross_attention_head_dim: Some(32),
        cross_attention_dim: Some(256),
        caption_channels: 256,
        sample_size: 16,
        qk_norm: Some("rms_norm_across_heads".into()),
        ..Default::default()
    };
    let mut model = SanaTransformer2DModel::new(config, Device::Cpu)?;
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    model.save_pretrained(&model_dir)?;
    // The preset's LoRA (sana-image-nft.toml): r 4, alpha 4, gaussian, attention targets.
    let mut lora = LoraConfig::new(
        4,
        4.0,
        TargetModules::Names(TARGETS.iter().map(|s| s.to_string()).collect()),
    );
    lora.init_lora_weights = InitLoraWeights::Gaussian;
    model.lora.add_adapter("default", &lora)?;
    model.lora.add_adapter("old", &lora)?;

    let (b, l, steps) = (8i64, 120i64, 4i64);
    let f = (Kind::Float, Device::Cpu);
    let mask = Tensor::ones([b, l], (Kind::Int64, Device::Cpu));
    let _ = mask.narrow(1, 80, 40).narrow(0, 4, 4).fill_(0);
    let batch = NftBatch {
        latents_clean: Tensor::randn([b, 32, 16, 16], f),
        timesteps: Tensor::from_slice(&[999.0f32, 750.0, 500.0, 250.0]).repeat([b, 1]),
        prompt_embeds: Tensor::randn([b, l, 256], f),
        prompt_attention_mask: mask,
        advantages: Tensor::randn([b], f),
    };
    let batch_path = dir.path().join("batch.safetensors");
    Tensor::write_safetensors(
        &[
            ("latents_clean", &batch.latents_clean),
            ("timesteps", &batch.timesteps),
            ("prompt_embeds", &batch.prompt_embeds),
            ("prompt_attention_mask", &batch.prompt_attention_mask),
            ("advantages", &batch.advantages),
        ],
        &batch_path,
    )?;
    // mini_batch 4 → 2 minis × 2 timesteps × (3 forwards + 1 backward) per step.
    let (mini, train_timesteps) = (4usize, 2usize);
    let cfg = NftTrainerConfig {
        loss: NftLossConfig {
            beta: 1.0,
            kl_beta: 1e-4,
            adv_low: -5.0,
            adv_high: 5.0,
        },
        mu_iterations: 1,
        batch_size_per_optimize: None,
        mini_batch: Some(mini),
        num_train_timesteps: train_timesteps,
        grad_norm_clip: 1.0,
        weight_copy_decay_type: 1,
        ema: Some((0.9, 1)),
        optimizer: AdamWConfig {
            lr: 3e-4,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-4,
        },
        schedule: LrSchedule::new(1000, 0.0, false, None, DecayType::None, 0.0, 0.0),
        seed: 42,
    };
    let py_cfg = serde_json::json!({
        "mu_iterations": 1, "batch_size_per_optimize": null, "mini_batch": mini, "num_steps": steps,
        "num_train_timesteps": train_timesteps, "nft_beta": 1.0, "kl_beta": 1e-4, "adv_low": -5.0,
        "adv_high": 5.0, "lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 1e-4,
        "clip": 1.0, "decay_type": 1, "ema": [0.9, 1], "seed": 42,
        "lora": {"r": 4, "lora_alpha": 4, "init_lora_weights": "gaussian", "target_modules": TARGETS},
    });
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, py_cfg.to_string())?;

    let mut trainer = NftTrainer::new(&mut model, cfg)?;
    let ours = time_per_iter(warmup, iters, || {
        trainer.train_step(&model, &batch).unwrap();
    });
    let peer = run_python_json(
        "scripts/bench/nft_step_python.py",
        &[
            model_dir.display().to_string(),
            batch_path.display().to_string(),
            cfg_path.display().to_string(),
            threads.to_string(),
            warmup.to_string(),
            iters.to_string(),
        ],
    )?;
    let theirs = peer["step"].as_f64().unwrap_or(f64::NAN);
    println!(
        "DiffusionNFT step: SANA 4 blocks width 256, 16x16 latents, 8 samples, mini_batch {mini}, \
         {train_timesteps} timesteps (3 forwards + 1 backward each), LoRA r4 on attention, fp32, CPU, \
         {threads} threads, {iters} steps"
    );
    println!(
        "{:<10} {:>12} {:>22} {:>26}",
        "", "sana-rl (s)", "Python/PEFT (s)", "speed-up (Python/ours)"
    );
    println!(
        "{:<10} {ours:>12.4} {theirs:>22.4} {:>26.3}",
        "step",
        theirs / ours
    );
    Ok(())
}
