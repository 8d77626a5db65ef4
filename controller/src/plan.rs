//! The resolved plan of a run: what runs where, the batch arithmetic, the data
//! and the reward setup. `controller --dry-run` prints it; the run follows it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use sana::config::{runtime::resolve_model_dir, RunConfig, RunKind};
use sana::data::prompts::PromptDataset;

/// Rewards the embedded reward-service scores without any model.
pub const EMBEDDED_REWARDS: &[&str] = &["jpeg_compressibility", "jpeg_incompressibility"];
/// Rewards Cosmos-RL's reward service registers (`reward_name` of its
/// `cosmos_rl_reward/model/*.py` handlers; an external service is needed).
pub const COSMOS_SERVICE_REWARDS: &[&str] = &[
    "cosmos_reason1",
    "dance_grpo",
    "gen_eval",
    "hpsv2",
    "hpsv3",
    "image_reward",
    "ocr",
    "pickscore",
    "unified_reward",
];

#[derive(Debug, Clone)]
pub enum RewardSetup {
    /// Our reward-service, started by the controller (jpeg rewards).
    Embedded,
    /// A service at REMOTE_REWARD_ENQUEUE_URL / _FETCH_URL.
    External { enqueue: String, fetch: String },
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub kind: RunKind,
    pub config_path: PathBuf,
    /// Where the model was found (None: not on this machine; a run stops there).
    pub model_dir: Result<PathBuf, String>,
    pub devices: Vec<String>,
    pub policy_workers: usize,
    pub rollout_workers: usize,
    pub colocated: bool,
    /// Prompts per step over all rollout workers.
    pub prompts_per_step: usize,
    pub n_generation: usize,
    /// Completions per step (= train batch over all policy replicas).
    pub samples_per_step: usize,
    pub total_steps: u64,
    pub dataset: Option<(String, PathBuf, usize)>,
    pub rewards: RewardSetup,
    pub warnings: Vec<String>,
    /// Keys the config sets that the run does not honour
    /// (`sana::config::Loaded::not_supported`; the caller fills it in).
    pub not_supported: Vec<String>,
}

/// Devices of this machine: `cuda:0..N` when CUDA is there, else one `cpu`.
pub fn detect_devices() -> Vec<String> {
    let n = tch::Cuda::device_count();
    if n > 0 {
        (0..n).map(|i| format!("cuda:{i}")).collect()
    } else {
        vec!["cpu".into()]
    }
}

/// Where a prompt set is: `dataset.local_dir`, else `$SANA_RL_DATA/<name>`, else
/// sana-rl's cache `~/.cache/sana-rl/datasets/<name>` (Cosmos-RL downloads into its
/// own cache from the sets' public URLs; this machine cannot, so the message says
/// which file to put where).
pub fn prompt_set_path(c: &RunConfig, base: &Path, validation: bool) -> PathBuf {
    let ds = if validation {
        &c.validation.dataset
    } else {
        &c.train.train_policy.dataset
    };
    if !ds.local_dir.is_empty() {
        return base.join(&ds.local_dir);
    }
    if let Some(root) = std::env::var_os("SANA_RL_DATA") {
        return PathBuf::from(root).join(&ds.name);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache/sana-rl/datasets").join(&ds.name)
}

fn split_of(c: &RunConfig, validation: bool) -> String {
    let ds = if validation {
        &c.validation.dataset
    } else {
        &c.train.train_policy.dataset
    };
    match ds.split_name() {
        s if s.is_empty() => (if validation { "test" } else { "train" }).to_string(),
        s => s,
    }
}

/// Where a missing prompt set would be downloaded from (None: it is on disk, or
/// `local_dir` names it, or the name has no public copy).
pub fn pending_download(c: &RunConfig, base: &Path, validation: bool) -> Option<(String, PathBuf)> {
    let ds = if validation {
        &c.validation.dataset
    } else {
        &c.train.train_policy.dataset
    };
    if !ds.local_dir.is_empty() {
        return None;
    }
    let split = split_of(c, validation);
    let dest =
        prompt_set_path(c, base, validation).join(crate::download::file_name(&ds.name, &split));
    if dest.exists() {
        return None;
    }
    crate::download::public_url(&ds.name, &split).map(|u| (u, dest))
}

/// Fetches a missing public prompt set into the cache (once).
pub async fn ensure_prompts(c: &RunConfig, base: &Path, validation: bool) -> anyhow::Result<()> {
    if let Some((url, dest)) = pending_download(c, base, validation) {
        crate::download::fetch(&url, &dest).await.with_context(|| {
            format!(
                "the prompt set is not on this machine and could not be downloaded: put the file at {} \
                 (or set dataset.local_dir)",
                dest.display()
            )
        })?;
    }
    Ok(())
}

pub fn load_prompts(c: &RunConfig, base: &Path, validation: bool) -> anyhow::Result<PromptDataset> {
    let ds = if validation {
        &c.validation.dataset
    } else {
        &c.train.train_policy.dataset
    };
    let split = match ds.split_name() {
        s if s.is_empty() => (if validation { "test" } else { "train" }).to_string(),
        s => s,
    };
    let path = prompt_set_path(c, base, validation);
    let key = if validation {
        "validation.dataset"
    } else {
        "train.train_policy.dataset"
    };
    PromptDataset::load(&ds.name, &split, &path).with_context(|| {
        format!(
            "{key}: prompt set {:?} (split {split:?}) not readable at {}: put the file there, \
             set {key}.local_dir, or SANA_RL_DATA",
            ds.name,
            path.display()
        )
    })
}

impl Plan {
    pub fn new(
        c: &RunConfig,
        config_path: &Path,
        base: &Path,
        devices: Vec<String>,
    ) -> anyhow::Result<Self> {
        let kind = c.run_kind();
        let mut warnings = Vec::new();
        let model_dir =
            resolve_model_dir(&c.policy.model_name_or_path, base).map_err(|e| e.to_string());
        let colocated = c.mode.is_colocated();
        let n_dev = devices.len();
        let on_cpu = devices.iter().all(|d| d == "cpu");
        let dp = c.policy.parallelism.dp_world(n_dev as i64).max(1) as usize;
        // One rank per GPU; on CPU the ranks share the cores (Gloo), as tests do.
        let policy_workers = if on_cpu { dp } else { dp.min(n_dev) };
        if !on_cpu && dp > n_dev {
            warnings.push(format!(
                "policy.parallelism asks for {dp} data-parallel ranks; this machine has {n_dev} devices: using {n_dev}"
            ));
        }
        // `[rollout.parallelism] n_init_replicas` rollout workers, spread over the devices.
        let rollout_workers = if kind == RunKind::Nft {
            c.rollout.parallelism.n_init_replicas.max(1) as usize
        } else {
            0
        };
        let g = c.rollout.n_generation.max(1);
        let replicas = c.policy.parallelism.n_init_replicas.max(1) as usize;
        let samples_per_step = c.train.train_batch_per_replica * replicas;
        let tp = &c.train.train_policy;
        let mut dataset = None;
        let mut total_steps = c.train.max_num_steps.unwrap_or(u64::MAX);
        let mut prompts_per_step = 0;
        if kind == RunKind::Nft {
            if !samples_per_step.is_multiple_of(g) {
                bail!(
                    "train.train_batch_per_replica = {} is not a multiple of rollout.n_generation = {g}: \
                     each prompt's {g} samples must train in the same step",
                    c.train.train_batch_per_replica
                );
            }
            let per_rank = samples_per_step
                / (dp * c.policy.parallelism.dp_replicate_size.max(1) as usize).max(1);
            if !per_rank.is_multiple_of(tp.mini_batch) {
                warnings.push(format!(
                    "per-rank batch {per_rank} is not a multiple of mini_batch {} (Cosmos-RL refuses this; the last mini batch is smaller here)",
                    tp.mini_batch
                ));
            }
            prompts_per_step = samples_per_step / g;
            match load_prompts(c, base, false) {
                Ok(ds) => {
                    let steps =
                        (ds.len() as u64 * g as u64 * c.train.epoch) / samples_per_step as u64;
                    total_steps = total_steps.min(steps.max(1));
                    dataset = Some((ds.name.clone(), ds.source.clone(), ds.len()));
                }
                Err(e) => match pending_download(c, base, false) {
                    Some((url, dest)) => warnings.push(format!(
                        "prompt set {:?} is not cached yet: the run downloads {url} to {} first",
                        tp.dataset.name,
                        dest.display()
                    )),
                    None => warnings.push(e.to_string()),
                },
            }
        }
        if kind == RunKind::Sft {
            let dir = base.join(&tp.dataset.local_dir);
            // (samples, unpaired): clips for a video run, images otherwise.
            let listed = if c.policy.diffusers.is_video {
                sana::data::video_folder::VideoFolder::open(&dir).map(|f| (f.len(), f.unpaired))
            } else {
                sana::data::image_folder::ImageFolder::open(&dir).map(|f| (f.len(), f.unpaired))
            };
            match listed {
                Ok((len, unpaired)) => {
                    let per_step = c.train.train_batch_per_replica.max(1);
                    // drop_last, as Cosmos-RL's loader: whole batches only.
                    let per_epoch = (len / per_step) as u64;
                    if per_epoch == 0 {
                        bail!(
                            "train.train_batch_per_replica = {per_step} is larger than the {} samples in {}",
                            len,
                            dir.display()
                        );
                    }
                    total_steps = total_steps.min(per_epoch * c.train.epoch);
                    if unpaired > 0 {
                        warnings.push(format!(
                            "{} SFT samples without their media or a prompt are skipped",
                            unpaired
                        ));
                    }
                    dataset = Some(("sft folder".into(), dir, len));
                }
                Err(e) => warnings.push(e.to_string()),
            }
            // validation.* in an SFT run: named (once) on the "parsed, not supported" line.
        }
        if total_steps == u64::MAX {
            total_steps = 0;
        }
        let rewards = match (
            std::env::var("REMOTE_REWARD_ENQUEUE_URL"),
            std::env::var("REMOTE_REWARD_FETCH_URL"),
        ) {
            (Ok(enqueue), Ok(fetch)) => RewardSetup::External { enqueue, fetch },
            _ => RewardSetup::Embedded,
        };
        if kind == RunKind::Nft {
            for f in &tp.remote_reward.reward_fns {
                let embedded = EMBEDDED_REWARDS.contains(&f.name.as_str());
                let cosmos = COSMOS_SERVICE_REWARDS.contains(&f.name.as_str());
                match (&rewards, embedded, cosmos) {
                    (RewardSetup::Embedded, true, _) | (RewardSetup::External { .. }, _, _) => {}
                    (RewardSetup::Embedded, false, true) => warnings.push(format!(
                        "reward {:?} is scored by Cosmos-RL's reward service, not the embedded one: \
                         set REMOTE_REWARD_ENQUEUE_URL / REMOTE_REWARD_FETCH_URL (and REMOTE_REWARD_TOKEN) to run",
                        f.name
                    )),
                    (RewardSetup::Embedded, false, false) => bail!(
                        "train.train_policy.remote_reward.reward_fns: unknown reward {:?}: the embedded \
                         reward-service has {}; Cosmos-RL's service has {} (point REMOTE_REWARD_* at it)",
                        f.name,
                        EMBEDDED_REWARDS.join(", "),
                        COSMOS_SERVICE_REWARDS.join(", ")
                    ),
                }
            }
        }
        if let Err(e) = &model_dir {
            warnings.push(e.clone());
        }
        // logging.logger = ["wandb"]: named (once) on the "parsed, not supported" line.
        Ok(Self {
            kind,
            config_path: config_path.to_path_buf(),
            model_dir,
            devices,
            policy_workers,
            rollout_workers,
            colocated,
            prompts_per_step,
            n_generation: g,
            samples_per_step,
            total_steps,
            dataset,
            rewards,
            warnings,
            not_supported: Vec::new(),
        })
    }

    /// The one line that names the keys set in vain (None: there are none).
    pub fn not_supported_line(&self) -> Option<String> {
        (!self.not_supported.is_empty())
            .then(|| format!("parsed, not supported: {}", self.not_supported.join(", ")))
    }

    /// What `--dry-run` prints.
    pub fn render(&self, c: &RunConfig) -> String {
        let mut s = String::new();
        let d = &c.policy.diffusers;
        let tp = &c.train.train_policy;
        let _ = writeln!(
            s,
            "run        {} ({})",
            self.config_path.display(),
            match self.kind {
                RunKind::Nft => "DiffusionNFT",
                RunKind::Sft => "SFT",
            }
        );
        let _ = writeln!(
            s,
            "model      {} → {}",
            c.policy.model_name_or_path,
            match &self.model_dir {
                Ok(p) => p.display().to_string(),
                Err(_) => "not on this machine".into(),
            }
        );
        let lora = match &c.policy.lora {
            Some(l) => format!(
                "LoRA r={} alpha={} adapters [{}] on {}",
                l.r,
                l.lora_alpha,
                l.lora_names.join(", "),
                match &l.target_modules {
                    Some(sana::config::StringOrList::Many(v)) => v.join(", "),
                    Some(sana::config::StringOrList::One(s)) => s.clone(),
                    None => "(no target_modules)".into(),
                }
            ),
            None => "full weights".into(),
        };
        let _ = writeln!(s, "trains     {lora}");
        let _ = writeln!(
            s,
            "workers    {} policy + {} rollout on {} ({})",
            self.policy_workers,
            self.rollout_workers,
            self.devices.join(", "),
            if self.colocated {
                "colocated: phases share the devices"
            } else {
                "disaggregated"
            }
        );
        if self.kind == RunKind::Nft {
            let _ = writeln!(
                s,
                "batch      {} prompts × {} generations = {} samples/step; mini_batch {}; {} of {} timesteps; mu_iterations {}; optimize batch {}",
                self.prompts_per_step,
                self.n_generation,
                self.samples_per_step,
                tp.mini_batch,
                c.num_train_timesteps(),
                d.sample.num_steps,
                tp.mu_iterations,
                tp.batch_size_per_optimize.map_or("all".into(), |n| n.to_string())
            );
            let _ = writeln!(
                s,
                "sampling   {} steps, solver {}, guidance {}, {}×{}{}, nft_beta {}, kl_beta {}, old-copy decay type {}",
                d.sample.num_steps,
                d.sample.solver,
                d.sample.guidance_scale,
                d.inference_size[0],
                d.inference_size[1],
                frames_note(d),
                d.nft_beta,
                tp.kl_beta,
                d.weight_copy_decay_type
            );
            match &self.dataset {
                Some((name, path, n)) => {
                    let _ = writeln!(s, "data       {name}: {n} prompts from {}", path.display());
                }
                None => {
                    let _ = writeln!(s, "data       {} (not readable here)", tp.dataset.name);
                }
            }
            let fns: Vec<String> = tp
                .remote_reward
                .reward_fns
                .iter()
                .map(|f| format!("{}×{}", f.name, f.weight))
                .collect();
            let _ = writeln!(
                s,
                "rewards    {} (scale {}); {}",
                fns.join(" + "),
                tp.remote_reward.scale,
                match &self.rewards {
                    RewardSetup::Embedded => "embedded reward-service + reward-gateway".to_string(),
                    RewardSetup::External { enqueue, .. } =>
                        format!("external service {enqueue} via reward-gateway"),
                }
            );
        } else {
            let _ = writeln!(
                s,
                "batch      {} samples/step per rank{}; mini_batch {}; timesteps {} (mean {}, std {}), train_flow_shift {}",
                c.train.train_batch_per_replica,
                frames_note(d),
                tp.mini_batch,
                d.weighting_scheme,
                d.logit_mean,
                d.logit_std,
                d.train_flow_shift
            );
            let _ = match &self.dataset {
                Some((_, path, n)) => writeln!(
                    s,
                    "data       {n} {}/prompt pairs in {}",
                    if d.is_video { "mp4" } else { "image" },
                    path.display()
                ),
                None => writeln!(s, "data       {} (not readable here)", tp.dataset.local_dir),
            };
        }
        let _ =
            writeln!(
            s,
            "optimizer  {} lr {} betas {:?} eps {} wd {} clip {}; warm-up {:?}, decay {:?}; EMA {}",
            c.train.optm_name,
            c.train.optm_lr,
            c.train.optm_betas,
            c.train.epsilon,
            c.train.optm_weight_decay,
            c.train.optm_grad_norm_clip,
            c.train.optm_warmup_steps,
            c.train.optm_decay_type,
            if c.train.ema_enable { format!("decay {}", c.train.ema_decay) } else { "off".into() }
        );
        let _ = writeln!(
            s,
            "steps      {}; checkpoints {}; validation {}",
            if self.total_steps == 0 {
                "unknown (the data is not readable here)".to_string()
            } else {
                self.total_steps.to_string()
            },
            if c.train.ckpt.enable_checkpoint {
                format!(
                    "every {} steps ({}), keep {}",
                    c.train.ckpt.save_freq, c.train.ckpt.save_mode, c.train.ckpt.max_keep
                )
            } else {
                "off (only the final export)".into()
            },
            if c.validation.enable {
                format!(
                    "every {} steps{}",
                    c.validation.freq,
                    if c.validation.val_before_train {
                        ", and before step 1"
                    } else {
                        ""
                    }
                )
            } else {
                "off".into()
            }
        );
        let _ = writeln!(s, "output     {}", c.train.output_dir);
        if let Some(line) = self.not_supported_line() {
            let _ = writeln!(s, "warning    {line}");
            for key in &self.not_supported {
                let why = sana::config::support::why_not(key, c.run_kind());
                let _ = writeln!(s, "             {key}: {why}");
            }
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning    {w}");
        }
        s
    }
}

/// A video run's frame count, for the plan (Cosmos-RL trains and samples
/// `train_frames`).
fn frames_note(d: &sana::config::DiffusersSection) -> String {
    if d.is_video {
        format!(", video {} frames", d.train_frames)
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key the run does not honour is named once, in one plan line.
    #[test]
    fn keys_set_in_vain_are_one_plan_line() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let demo = include_str!("../../configs/demo/tiny-image-nft.toml");
        let text = format!("redis = \"12800\"\n{demo}")
            .replace("compile = false", "compile = true\noptm_impl = \"fused\"");
        let path = repo.join("configs/demo/tiny-image-nft.toml");
        let loaded = sana::config::load_str(&text, &path, false).unwrap();
        assert_eq!(
            loaded.not_supported,
            ["redis", "train.optm_impl", "train.compile"]
        );
        let mut plan = Plan::new(&loaded.config, &path, &repo, vec!["cpu".into()]).unwrap();
        plan.not_supported = loaded.not_supported.clone();
        let shown = plan.render(&loaded.config);
        let lines: Vec<&str> = shown
            .lines()
            .filter(|l| l.contains("parsed, not supported"))
            .collect();
        assert_eq!(
            lines,
            ["warning    parsed, not supported: redis, train.optm_impl, train.compile"],
            "{shown}"
        );
        // Each with why, below it.
        assert!(
            shown.contains("             train.compile: ") && shown.contains("redis: "),
            "{shown}"
        );

        // The demo as shipped sets nothing in vain: no such line.
        let loaded = sana::config::load_str(demo, &path, false).unwrap();
        assert!(
            loaded.not_supported.is_empty(),
            "{:?}",
            loaded.not_supported
        );
    }

    #[test]
    fn rewards_are_named_as_cosmos_rl_registers_them() {
        assert!(COSMOS_SERVICE_REWARDS.contains(&"gen_eval"));
        assert!(!COSMOS_SERVICE_REWARDS.contains(&"geneval"));
        assert_eq!(COSMOS_SERVICE_REWARDS.len(), 9);
    }
}
