//! The public prompt sets, fetched once into sana-rl's cache when a run needs
//! one that is not on disk (Cosmos-RL does the same with `wget` into its own
//! cache). `SANA_RL_DATASET_BASE_URL` replaces `https://raw.githubusercontent.com`
//! for mirrors and air-gapped copies.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Public URL of a set's split file (Cosmos-RL's `tools/dataset/diffusion_nft.py` table).
pub fn public_url(name: &str, split: &str) -> Option<String> {
    let split = if split == "train" { "train" } else { "test" };
    let path = match name {
        "pickscore" | "ocr" => {
            format!("NVlabs/DiffusionNFT/refs/heads/main/dataset/{name}/{split}.txt")
        }
        "geneval" => {
            format!("NVlabs/DiffusionNFT/refs/heads/main/dataset/geneval/{split}_metadata.jsonl")
        }
        "dance_grpo_t2v" => "XueZeyue/DanceGRPO/refs/heads/main/assets/video_prompts.txt".into(),
        _ => return None,
    };
    let base = std::env::var("SANA_RL_DATASET_BASE_URL")
        .unwrap_or_else(|_| "https://raw.githubusercontent.com".into());
    Some(format!("{}/{path}", base.trim_end_matches('/')))
}

/// The file a set's split lives in, inside its cache directory.
pub fn file_name(name: &str, split: &str) -> String {
    match name {
        "geneval" => format!("{split}_metadata.jsonl"),
        "dance_grpo_t2v" => "video_prompts.txt".into(),
        _ => format!("{split}.txt"),
    }
}

/// Downloads `url` to `dest` (through a temporary file, so an interrupted
/// download never looks complete).
pub async fn fetch(url: &str, dest: &Path) -> anyhow::Result<PathBuf> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    eprintln!("downloading {url} → {}", dest.display());
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .timeout(std::time::Duration::from_secs(600))
        .build()?;
    let resp = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("downloading {url}"))?;
    if !resp.status().is_success() {
        bail!("downloading {url}: HTTP {}", resp.status());
    }
    let body = resp
        .bytes()
        .await
        .with_context(|| format!("downloading {url}"))?;
    if body.is_empty() {
        bail!("downloading {url}: empty file");
    }
    let tmp = dest.with_extension("part");
    std::fs::write(&tmp, &body).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dest).with_context(|| format!("writing {}", dest.display()))?;
    Ok(dest.to_path_buf())
}
