//! Helpers shared by the unit tests: locating the parity references that
//! `scripts/parity/make_reference.py` writes, and comparing tensors.

use std::path::PathBuf;

use tch::{Kind, Tensor};

/// The directory of one reference case (`$SANA_PARITY_DIR/<case>`, default
/// `target/parity/<case>`). `None` (after a note) when it is absent and
/// `SANA_PARITY_REQUIRED` is unset; a panic when it is required.
pub fn parity_case(case: &str) -> Option<PathBuf> {
    let root = std::env::var_os("SANA_PARITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/parity")));
    let dir = root.join(case);
    if dir.is_dir() {
        return Some(dir);
    }
    let msg = format!(
        "parity reference {} is missing: run `scripts/parity/make_reference.py {}` (the README's test command does)",
        dir.display(),
        root.display()
    );
    if std::env::var("SANA_PARITY_REQUIRED").is_ok_and(|v| v == "1") {
        panic!("{msg}");
    }
    eprintln!("skipping: {msg}");
    None
}

/// Tensors of a safetensors file by name.
pub fn load_named(path: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    let cpu = |t: &Tensor| t.to_device(tch::Device::Cpu).to_kind(Kind::Double);
    (cpu(a) - cpu(b)).abs().max().double_value(&[])
}

/// A tiny random SANA 1.5-style transformer (4 latent channels, 2 blocks of
/// width 8, captions of width 6), seeded.
pub fn tiny_transformer(
    seed: i64,
) -> crate::models::transformers::sana_transformer::SanaTransformer2DModel {
    use crate::models::transformers::sana_transformer::{
        SanaTransformer2DModel, SanaTransformerConfig,
    };
    tch::manual_seed(seed);
    let cfg = SanaTransformerConfig {
        in_channels: 4,
        out_channels: Some(4),
        num_attention_heads: 2,
        attention_head_dim: 4,
        num_layers: 2,
        num_cross_attention_heads: Some(2),
        cross_attention_head_dim: Some(4),
        cross_attention_dim: Some(8),
        caption_channels: 6,
        qk_norm: Some("rms_norm_across_heads".into()),
        ..Default::default()
    };
    SanaTransformer2DModel::new(cfg, tch::Device::Cpu).unwrap()
}

/// A tiny random SanaVideoTransformer3DModel (fixed seed): patch (1, 2, 2),
/// qk-norm, 6 caption channels like [`tiny_transformer`], rotary split 4/4/4.
pub fn tiny_video_transformer(seed: i64) -> crate::models::SanaVideoTransformer3DModel {
    use crate::models::{SanaVideoTransformer3DModel, SanaVideoTransformerConfig};
    tch::manual_seed(seed);
    let cfg = SanaVideoTransformerConfig {
        in_channels: 4,
        out_channels: Some(4),
        num_attention_heads: 2,
        attention_head_dim: 12,
        num_layers: 2,
        num_cross_attention_heads: Some(2),
        cross_attention_head_dim: Some(12),
        cross_attention_dim: Some(24),
        caption_channels: 6,
        rope_max_seq_len: 32,
        ..Default::default()
    };
    SanaVideoTransformer3DModel::new(cfg, tch::Device::Cpu).unwrap()
}

/// A tiny random SANA 1.5-style transformer (fixed seed) with Cosmos-RL's LoRA
/// targets as adapters "default" (B randomised, so it moves the output) and "old",
/// and a 6-sample NFT batch for it: for tests that need no reference files.
pub fn tiny_nft_model_and_batch(
    seed: i64,
) -> (
    crate::models::transformers::sana_transformer::SanaTransformer2DModel,
    crate::training::nft_trainer::NftBatch,
) {
    use crate::lora::{InitLoraWeights, LoraConfig, TargetModules};
    use tch::Device;
    let mut model = tiny_transformer(seed);
    let targets = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"]
        .into_iter()
        .chain(["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"])
        .map(String::from)
        .collect();
    let mut lora = LoraConfig::new(4, 4.0, TargetModules::Names(targets));
    lora.init_lora_weights = InitLoraWeights::Gaussian;
    model.lora.add_adapter("default", &lora).unwrap();
    model.lora.add_adapter("old", &lora).unwrap();
    tch::no_grad(|| {
        for (_, p) in model.lora.adapter_parameters("default").unwrap() {
            let r = p.randn_like() * 0.1;
            p.shallow_clone().copy_(&r);
        }
    });
    let f = (Kind::Float, Device::Cpu);
    let timesteps = Tensor::from_slice(&[990.0f32, 750.0, 500.0, 250.0]).repeat([6, 1]);
    let mask = Tensor::ones([6, 5], (Kind::Int64, Device::Cpu));
    let _ = mask.narrow(0, 3, 3).narrow(1, 3, 2).fill_(0);
    let batch = crate::training::nft_trainer::NftBatch {
        latents_clean: Tensor::randn([6, 4, 4, 4], f),
        timesteps,
        prompt_embeds: Tensor::randn([3, 5, 6], f).repeat_interleave_self_int(2, 0, None),
        prompt_attention_mask: mask,
        advantages: Tensor::from_slice(&[1.0f32, -1.0, 0.5, -0.5, 2.0, -2.0]),
    };
    (model, batch)
}

/// The venv's python (for checks that load our outputs with diffusers/PEFT);
/// `None` (after a note) without `VIRTUAL_ENV`, a panic when parity is required.
pub fn python() -> Option<std::path::PathBuf> {
    let py = std::env::var_os("VIRTUAL_ENV")
        .map(|v| std::path::PathBuf::from(v).join("bin").join("python"));
    match py.filter(|p| p.exists()) {
        Some(p) => Some(p),
        None if std::env::var("SANA_PARITY_REQUIRED").is_ok_and(|v| v == "1") => {
            panic!("VIRTUAL_ENV is not set: source scripts/env.sh to run the PEFT/diffusers export check")
        }
        None => {
            eprintln!("skipping: VIRTUAL_ENV is not set (source scripts/env.sh)");
            None
        }
    }
}

/// Runs `scripts/parity/<script>` with the venv's python and `args`, echoing its
/// stdout; panics with `what`, stdout and stderr when it fails. `false` when the
/// check is skipped (no venv and parity not required).
pub fn run_parity_check(script: &str, args: &[&std::ffi::OsStr], what: &str) -> bool {
    let Some(py) = python() else {
        return false;
    };
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/parity")
        .join(script);
    let res = std::process::Command::new(py)
        .arg(&path)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    eprintln!("{script}:\n{stdout}");
    assert!(
        res.status.success(),
        "{what}:\n{stdout}\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    true
}

/// Starts `world` copies of this test binary running the ignored test `test`
/// as ranks of one Gloo group (see [`rank_env`]) and waits for them; returns
/// each rank's output path stem (`<dir>/w<world>_rank<r>`).
pub fn spawn_ranks(
    test: &str,
    world: usize,
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> Vec<std::path::PathBuf> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let outs: Vec<_> = (0..world)
        .map(|r| dir.join(format!("w{world}_rank{r}")))
        .collect();
    let children: Vec<_> = outs
        .iter()
        .enumerate()
        .map(|(rank, out)| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    test,
                    "--ignored",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env("SANA_TEST_RANK", rank.to_string())
                .env("SANA_TEST_WORLD", world.to_string())
                .env("SANA_TEST_PORT", port.to_string())
                .env("SANA_TEST_OUT", out)
                .envs(env.iter().copied())
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, mut c) in children.into_iter().enumerate() {
        let status = c.wait().unwrap();
        assert!(status.success(), "rank {rank} of {world}: {status}");
    }
    outs
}

/// In a rank process started by [`spawn_ranks`]: its data-parallel group and
/// output path stem; None when run directly (the test then does nothing).
pub fn rank_env() -> Option<(crate::training::parallel::DataParallel, std::path::PathBuf)> {
    let var = |k: &str| std::env::var(k).ok();
    let (rank, world, port, out) = (
        var("SANA_TEST_RANK")?.parse().unwrap(),
        var("SANA_TEST_WORLD")?.parse().unwrap(),
        var("SANA_TEST_PORT")?.parse().unwrap(),
        var("SANA_TEST_OUT")?,
    );
    let rdv = c10d::Rendezvous {
        local_addr: Some("127.0.0.1".into()),
        timeout: std::time::Duration::from_secs(120),
        ..c10d::Rendezvous::new("127.0.0.1", port, rank, world)
    };
    let group = c10d::ProcessGroup::new(c10d::Backend::Gloo, &rdv).unwrap();
    Some((
        crate::training::parallel::DataParallel::new(group, tch::Kind::Float, tch::Device::Cpu),
        out.into(),
    ))
}
