//! From a run config to the objects the workers build: the model directory,
//! the LoRA config, the trainers' configs, dtypes.

use std::path::{Path, PathBuf};

use tch::Kind;

use super::schema::{BoolOrString, IntOrFloat, LoraSection, RunConfig, StringOrList};
use crate::lora::LoraConfig;
use crate::training::lr_schedule::{DecayType, LrSchedule};
use crate::training::nft::NftLossConfig;
use crate::training::nft_trainer::NftTrainerConfig;
use crate::training::optim::AdamWConfig;
use crate::training::sft::WeightingScheme;
use crate::training::sft_trainer::SftTrainerConfig;
use crate::training::trainable::TrainTarget;
use crate::{Result, SanaError};

/// Where `policy.model_name_or_path` is on this machine: the directory itself, or
/// a Hugging Face cache snapshot (`$HF_HOME/hub/models--Org--Name/snapshots/*`).
/// Nothing is downloaded; the error says how to get the model.
pub fn resolve_model_dir(name_or_path: &str, base: &Path) -> Result<PathBuf> {
    let direct = base.join(name_or_path);
    if direct.join("model_index.json").exists() || direct.join("transformer").is_dir() {
        return Ok(direct);
    }
    let hub = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
        });
    if let Some(hub) = hub {
        let snaps = hub
            .join(format!("models--{}", name_or_path.replace('/', "--")))
            .join("snapshots");
        if let Ok(rd) = std::fs::read_dir(&snaps) {
            let mut dirs: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            dirs.sort();
            if let Some(d) = dirs
                .into_iter()
                .rev()
                .find(|d| d.join("model_index.json").exists())
            {
                return Ok(d);
            }
        }
    }
    Err(SanaError::input(
        "policy.model_name_or_path",
        format!(
            "{name_or_path:?} is neither a local pipeline directory (with model_index.json) nor in the \
             Hugging Face cache: download it first (`huggingface-cli download {name_or_path}`) or give a path"
        ),
    ))
}

/// `cpu`, `cuda`, `cuda:N` → a libtorch device.
pub fn parse_device(s: &str) -> Result<tch::Device> {
    match s {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => Ok(tch::Device::Cuda(0)),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Ok(tch::Device::Cuda(n)),
            None => Err(SanaError::input(
                "device",
                format!("{s:?}: expected cpu, cuda or cuda:N"),
            )),
        },
    }
}

/// "float32" / "bfloat16" / "float16" → a libtorch kind.
pub fn kind_of(dtype: &str) -> Result<Kind> {
    match dtype {
        "float32" | "fp32" => Ok(Kind::Float),
        "bfloat16" | "bf16" => Ok(Kind::BFloat16),
        "float16" | "fp16" => Ok(Kind::Half),
        other => Err(SanaError::input(
            "dtype",
            format!("{other:?}: expected float32, bfloat16 or float16"),
        )),
    }
}

/// PEFT's LoRA config from `[policy.lora]`.
pub fn lora_config(l: &LoraSection) -> Result<LoraConfig> {
    let mut m = serde_json::Map::new();
    m.insert("r".into(), l.r.into());
    m.insert("lora_alpha".into(), l.lora_alpha.into());
    m.insert("lora_dropout".into(), l.lora_dropout.into());
    m.insert("use_rslora".into(), l.use_rslora.into());
    m.insert(
        "init_lora_weights".into(),
        match &l.init_lora_weights {
            BoolOrString::Bool(b) => (*b).into(),
            BoolOrString::Str(s) => s.clone().into(),
        },
    );
    match &l.target_modules {
        Some(StringOrList::One(s)) => {
            m.insert("target_modules".into(), s.clone().into());
        }
        Some(StringOrList::Many(v)) => {
            m.insert("target_modules".into(), v.clone().into());
        }
        None => {
            return Err(SanaError::input(
                "policy.lora.target_modules",
                "missing: list the modules to adapt (the presets use attn1/attn2 to_q, to_k, to_v, to_out.0) or \"all-linear\"",
            ))
        }
    }
    if let Some(p) = &l.r_pattern {
        m.insert(
            "rank_pattern".into(),
            serde_json::to_value(p).expect("json"),
        );
    }
    if let Some(p) = &l.alpha_pattern {
        m.insert(
            "alpha_pattern".into(),
            serde_json::to_value(p).expect("json"),
        );
    }
    LoraConfig::from_json_map(&m, Path::new("[policy.lora]"))
}

/// Warm-up / decay schedule over `total_steps` optimizer-schedule steps.
pub fn lr_schedule(c: &RunConfig, total_steps: u64) -> Result<LrSchedule> {
    let t = &c.train;
    let (warmup, is_fraction) = match t.optm_warmup_steps {
        IntOrFloat::Int(n) => (n as f64, false),
        IntOrFloat::Float(f) => (f, true),
    };
    Ok(LrSchedule::new(
        total_steps.max(1),
        warmup,
        is_fraction,
        t.optm_decay_ratio,
        DecayType::parse(t.optm_decay_type.as_deref())?,
        t.optm_min_lr_factor,
        t.optm_warmup_start_factor,
    ))
}

pub fn adamw(c: &RunConfig) -> AdamWConfig {
    let t = &c.train;
    AdamWConfig {
        lr: t.optm_lr,
        betas: (t.optm_betas[0], t.optm_betas[1]),
        eps: t.epsilon,
        // Plain Adam is AdamW without decay.
        weight_decay: if t.optm_name == "Adam" {
            0.0
        } else {
            t.optm_weight_decay
        },
    }
}

fn ema(c: &RunConfig) -> Option<(f64, u64)> {
    c.train
        .ema_enable
        .then_some((c.train.ema_decay, c.train.ema_update_step_interval))
}

pub fn nft_trainer_config(c: &RunConfig, total_steps: u64) -> Result<NftTrainerConfig> {
    let tp = &c.train.train_policy;
    Ok(NftTrainerConfig {
        loss: NftLossConfig {
            beta: c.policy.diffusers.nft_beta,
            kl_beta: tp.kl_beta,
            adv_low: tp.advantage_low,
            adv_high: tp.advantage_high,
        },
        mu_iterations: tp.mu_iterations,
        batch_size_per_optimize: tp.batch_size_per_optimize,
        mini_batch: Some(tp.mini_batch),
        num_train_timesteps: c.num_train_timesteps(),
        grad_norm_clip: c.train.optm_grad_norm_clip,
        weight_copy_decay_type: c.policy.diffusers.weight_copy_decay_type as u8,
        ema: ema(c),
        optimizer: adamw(c),
        schedule: lr_schedule(c, total_steps)?,
        seed: c.seed(),
    })
}

pub fn sft_trainer_config(c: &RunConfig, total_steps: u64) -> Result<SftTrainerConfig> {
    let d = &c.policy.diffusers;
    Ok(SftTrainerConfig {
        target: if c.policy.lora.is_some() {
            TrainTarget::Lora("default".into())
        } else {
            TrainTarget::Full
        },
        mini_batch: Some(c.train.train_policy.mini_batch),
        weighting: WeightingScheme::parse(&d.weighting_scheme, d.logit_mean, d.logit_std, 1.29)?,
        grad_norm_clip: c.train.optm_grad_norm_clip,
        ema: ema(c),
        optimizer: adamw(c),
        schedule: lr_schedule(c, total_steps)?,
        seed: c.seed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_section_becomes_peft_config() {
        let l = LoraSection {
            r: 4,
            lora_alpha: 4.0,
            target_modules: Some(StringOrList::Many(vec!["attn1.to_q".into()])),
            init_lora_weights: BoolOrString::Str("gaussian".into()),
            ..Default::default()
        };
        let cfg = lora_config(&l).unwrap();
        assert_eq!((cfg.r, cfg.lora_alpha), (4, 4.0));
        let missing = LoraSection::default();
        assert!(lora_config(&missing)
            .unwrap_err()
            .to_string()
            .contains("target_modules"));
    }

    #[test]
    fn model_dir_errors_say_how_to_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve_model_dir("Org/Nope", dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("huggingface-cli download Org/Nope"), "{err}");
        std::fs::create_dir_all(dir.path().join("p/transformer")).unwrap();
        assert_eq!(
            resolve_model_dir("p", dir.path()).unwrap(),
            dir.path().join("p")
        );
    }
}
