//! The sections and keys of a Cosmos-RL run config that SANA runs use, with
//! Cosmos-RL 0.4.7's defaults. Keys Cosmos-RL defines for its LLM paths (vLLM,
//! tokenizers, …) are accepted as `Inert` so the presets load; they have no
//! effect here. Every field, typed or `Inert`, has its decision (acts, or why
//! not) in `support.rs`, whose test fails on a field added without one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A value accepted for compatibility and not used (named when set: `support.rs`).
pub type Inert = Option<toml::Value>;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunConfig {
    /// Cosmos-RL's Redis port (a string); sana-rl's embedded reward service picks its own.
    pub redis: String,
    /// `"colocated"` (rollout and policy share devices, by phases) or `"disaggregated"`.
    pub mode: Mode,
    pub eth_ips: String,
    pub policy: PolicySection,
    pub rollout: RolloutSection,
    pub train: TrainSection,
    pub validation: ValidationSection,
    pub logging: LoggingSection,
    pub custom: BTreeMap<String, toml::Value>,
    pub profiler: Inert,
    pub distillation: Inert,
    pub vla: Inert,
    pub controller_execution_id: Inert,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Disaggregated,
    Colocated,
    ColocatedSeparated,
}

impl Mode {
    pub fn is_colocated(self) -> bool {
        !matches!(self, Mode::Disaggregated)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicySection {
    pub model_name_or_path: String,
    pub model_revision: Option<String>,
    pub model_safetensor_path: Option<String>,
    pub is_diffusers: bool,
    pub model_gradient_checkpointing: bool,
    pub model_max_length: i64,
    /// Present: LoRA training (NFT needs `lora_names = ["default", "old"]`); absent: full weights.
    pub lora: Option<LoraSection>,
    pub diffusers: DiffusersSection,
    pub parallelism: Parallelism,
    pub trainable_map: Inert,
    pub freeze_pattern: Inert,
    pub trainable_pattern: Inert,
    pub enable_liger_kernel: Inert,
    pub enable_liger_cross_entropy: Inert,
    pub enable_liger_fused_cross_entropy: Inert,
    pub aux_loss_coeff: Inert,
}

impl Default for PolicySection {
    fn default() -> Self {
        Self {
            model_name_or_path: "Qwen/Qwen2.5-VL-7B-Instruct".into(),
            model_revision: None,
            model_safetensor_path: None,
            is_diffusers: false,
            model_gradient_checkpointing: true,
            model_max_length: 4096,
            lora: None,
            diffusers: DiffusersSection::default(),
            parallelism: Parallelism::default(),
            trainable_map: None,
            freeze_pattern: None,
            trainable_pattern: None,
            enable_liger_kernel: None,
            enable_liger_cross_entropy: None,
            enable_liger_fused_cross_entropy: None,
            aux_loss_coeff: None,
        }
    }
}

/// `target_modules`: a list, or the string `"all-linear"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

/// `init_lora_weights`: `true`/`false` or a method name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BoolOrString {
    Bool(bool),
    Str(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraSection {
    pub r: i64,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Option<StringOrList>,
    pub init_lora_weights: BoolOrString,
    pub use_rslora: bool,
    pub lora_names: Vec<String>,
    /// A LoRA to start from: PEFT folder or diffusers `pytorch_lora_weights.safetensors`.
    pub lora_path: Option<String>,
    pub primary_adapter: Option<String>,
    pub modules_to_save: Option<Vec<String>>,
    pub alpha_pattern: Option<BTreeMap<String, f64>>,
    pub r_pattern: Option<BTreeMap<String, i64>>,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: None,
            init_lora_weights: BoolOrString::Bool(true),
            use_rslora: false,
            lora_names: vec!["default".into()],
            lora_path: None,
            primary_adapter: None,
            modules_to_save: None,
            alpha_pattern: None,
            r_pattern: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DiffusersSection {
    /// Transformer and text-encoder dtype ("float32", "bfloat16", "float16"); the VAE stays fp32.
    pub dtype: String,
    pub is_video: bool,
    pub max_prompt_length: usize,
    /// SFT timestep density: "logit_normal", "mode", "cosmap", "none".
    pub weighting_scheme: String,
    pub train_flow_shift: f64,
    pub offload: bool,
    pub logit_mean: f64,
    pub logit_std: f64,
    /// `[height, width]`.
    pub inference_size: Vec<i64>,
    pub inference_frames: i64,
    pub train_frames: i64,
    /// Fraction of each rollout's timesteps NFT trains on.
    pub timesteps_fraction: f64,
    pub nft_beta: f64,
    pub weight_copy_decay_type: i64,
    pub sample: SampleSection,
    pub lora: Inert,
    pub tokenizer: Inert,
}

impl Default for DiffusersSection {
    fn default() -> Self {
        Self {
            dtype: "float32".into(),
            is_video: false,
            max_prompt_length: 300,
            weighting_scheme: "logit_normal".into(),
            train_flow_shift: 3.0,
            offload: true,
            logit_mean: 0.0,
            logit_std: 1.0,
            inference_size: vec![1024, 1024],
            inference_frames: 41,
            train_frames: 41,
            timesteps_fraction: 1.0,
            nft_beta: 1.0,
            weight_copy_decay_type: 0,
            sample: SampleSection::default(),
            lora: None,
            tokenizer: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SampleSection {
    pub num_steps: usize,
    pub eval_num_steps: usize,
    pub guidance_scale: f64,
    pub global_std: bool,
    pub noise_level: f64,
    pub deterministic_sampling: bool,
    /// DiffusionNFT's rollout solver: flow, dance, ddim, dpm1, dpm2, or euler
    /// (deterministic flow); see `schedulers::solver`.
    pub solver: String,
}

impl Default for SampleSection {
    fn default() -> Self {
        Self {
            num_steps: 40,
            eval_num_steps: 40,
            guidance_scale: 4.5,
            global_std: true,
            noise_level: 1.0,
            deterministic_sampling: false,
            solver: "dpm2".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Parallelism {
    pub n_init_replicas: i64,
    pub tp_size: i64,
    pub cp_size: i64,
    pub ep_size: i64,
    /// Data-parallel ranks (sharded); -1: as many as devices.
    pub dp_shard_size: i64,
    pub pp_size: i64,
    pub dp_replicate_size: i64,
    pub pp_dynamic_shape: Inert,
    pub pp_micro_batch_size: Inert,
    pub pp_schedule: Inert,
    pub pp_layers_per_stage: Inert,
}

impl Default for Parallelism {
    fn default() -> Self {
        // Cosmos-RL's launcher counts tp_size as 1 when absent (the model default of 2 is
        // for its LLM paths); SANA runs have no tensor parallelism.
        Self {
            n_init_replicas: 1,
            tp_size: 1,
            cp_size: 1,
            ep_size: 1,
            dp_shard_size: 1,
            pp_size: 1,
            dp_replicate_size: 1,
            pp_dynamic_shape: None,
            pp_micro_batch_size: None,
            pp_schedule: None,
            pp_layers_per_stage: None,
        }
    }
}

impl Parallelism {
    /// Data-parallel ranks (replicate × shard), `-1` shard counted as `devices`.
    pub fn dp_world(&self, devices: i64) -> i64 {
        let shard = if self.dp_shard_size == -1 {
            devices.max(1)
        } else {
            self.dp_shard_size
        };
        shard * self.dp_replicate_size
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RolloutSection {
    pub n_generation: usize,
    pub n_generation_mini_batch: Option<usize>,
    pub n_generation_to_batch: bool,
    pub batch_size: usize,
    pub seed: Option<i64>,
    pub backend: String,
    pub mode: String,
    pub parallelism: Parallelism,
    pub completion_admission: Inert,
    pub enforce_eager: Inert,
    pub include_stop_str_in_output: Inert,
    pub gpu_memory_utilization: Inert,
    pub enable_chunked_prefill: Inert,
    pub max_response_length: Inert,
    pub quantization: Inert,
    pub sampling_config: Inert,
    pub vllm_use_flashinfer: Inert,
    pub multi_turn_config: Inert,
    pub async_config: Inert,
    pub async_r2r_sync: Inert,
    pub r2r_sync_pack_tensors: Inert,
    pub r2r_sync_bucket_size_bytes: Inert,
    pub prefetch_rollout: Inert,
    pub prefetch_queue_maxsize: Inert,
    pub broadcast_all_params: Inert,
}

impl Default for RolloutSection {
    fn default() -> Self {
        Self {
            n_generation: 16,
            n_generation_mini_batch: None,
            n_generation_to_batch: false,
            batch_size: 1,
            seed: None,
            backend: "vllm".into(),
            mode: "sync".into(),
            parallelism: Parallelism::default(),
            completion_admission: None,
            enforce_eager: None,
            include_stop_str_in_output: None,
            gpu_memory_utilization: None,
            enable_chunked_prefill: None,
            max_response_length: None,
            quantization: None,
            sampling_config: None,
            vllm_use_flashinfer: None,
            multi_turn_config: None,
            async_config: None,
            async_r2r_sync: None,
            r2r_sync_pack_tensors: None,
            r2r_sync_bucket_size_bytes: None,
            prefetch_rollout: None,
            prefetch_queue_maxsize: None,
            broadcast_all_params: None,
        }
    }
}

/// `optm_warmup_steps`: an integer count, or a float ≤ 1 read as a fraction of the run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrFloat {
    Int(i64),
    Float(f64),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainSection {
    pub train_policy: TrainPolicy,
    pub optm_name: String,
    pub optm_lr: f64,
    pub optm_impl: Inert,
    pub optm_weight_decay: f64,
    pub optm_betas: Vec<f64>,
    pub optm_warmup_steps: IntOrFloat,
    pub optm_warmup_start_factor: f64,
    pub optm_decay_ratio: Option<f64>,
    pub optm_decay_type: Option<String>,
    pub optm_min_lr_factor: f64,
    pub optm_grad_norm_clip: f64,
    pub ema_enable: bool,
    pub ema_decay: f64,
    pub ema_update_step_interval: u64,
    pub master_dtype: String,
    pub param_dtype: String,
    pub transfer_dtype: Option<String>,
    pub logprob_dtype: Inert,
    pub fsdp_reduce_dtype: String,
    pub fsdp_offload: bool,
    pub fsdp_reshard_after_forward: String,
    /// RL: completions per step per policy replica; SFT: samples per step per rank.
    pub train_batch_per_replica: usize,
    pub ckpt: CkptSection,
    /// `false`, `true` (the newest checkpoint under output_dir) or a checkpoint path.
    pub resume: BoolOrString,
    pub epoch: u64,
    pub output_dir: String,
    pub timestamp: String,
    pub epsilon: f64,
    pub async_tp_enabled: bool,
    pub compile: bool,
    pub sync_weight_interval: u64,
    pub deterministic: bool,
    pub seed: Option<i64>,
    pub non_text: bool,
    pub max_num_steps: Option<u64>,
    pub save_ckpt_at_exit: bool,
    pub local_dataset: Inert,
    pub force_use_hf: Inert,
    pub sequence_packing: Inert,
    pub signal_to_handle: Inert,
    pub activation_offload: Inert,
    pub fa_version: Inert,
    pub fp8: Inert,
    pub fp4: Inert,
    pub prefetch_payloads: Inert,
    pub p2p_sync_pack_tensors: Inert,
    pub p2r_sync_groups_per_round: Inert,
    pub coalesce_weight_sync: Inert,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            train_policy: TrainPolicy::default(),
            optm_name: "AdamW".into(),
            optm_lr: 1e-6,
            optm_impl: None,
            optm_weight_decay: 0.01,
            optm_betas: vec![0.9, 0.999],
            optm_warmup_steps: IntOrFloat::Int(20),
            optm_warmup_start_factor: 0.0,
            optm_decay_ratio: None,
            optm_decay_type: None,
            optm_min_lr_factor: 0.0,
            optm_grad_norm_clip: 1.0,
            ema_enable: false,
            ema_decay: 0.9999,
            ema_update_step_interval: 0,
            master_dtype: "float32".into(),
            param_dtype: "bfloat16".into(),
            transfer_dtype: None,
            logprob_dtype: None,
            fsdp_reduce_dtype: "float32".into(),
            fsdp_offload: false,
            fsdp_reshard_after_forward: "default".into(),
            train_batch_per_replica: 8,
            ckpt: CkptSection::default(),
            resume: BoolOrString::Bool(false),
            epoch: 1,
            output_dir: "./outputs".into(),
            timestamp: String::new(),
            epsilon: 1e-6,
            async_tp_enabled: false,
            compile: true,
            sync_weight_interval: 1,
            deterministic: false,
            seed: None,
            non_text: false,
            max_num_steps: None,
            save_ckpt_at_exit: true,
            local_dataset: None,
            force_use_hf: None,
            sequence_packing: None,
            signal_to_handle: None,
            activation_offload: None,
            fa_version: None,
            fp8: None,
            fp4: None,
            prefetch_payloads: None,
            p2p_sync_pack_tensors: None,
            p2r_sync_groups_per_round: None,
            coalesce_weight_sync: None,
        }
    }
}

/// `[train.train_policy]`: GRPO (with `trainer_type = "diffusion_nft"`) or SFT.
/// One struct for both: the keys of the other type are accepted and unused, as in Cosmos-RL.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainPolicy {
    /// "grpo" or "sft"; absent: inferred as Cosmos-RL does (see `RunConfig::policy_type`).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub trainer_type: Option<String>,
    pub variant: Inert,
    pub dataset: DatasetSection,
    pub dataloader_shuffle: bool,
    pub dataloader_seed: u64,
    pub dataloader_batch_size: Option<usize>,
    pub dataloader_num_workers: usize,
    pub dataloader_prefetch_factor: Inert,
    pub dataloader_drop_last: bool,
    pub use_remote_reward: bool,
    pub remote_reward: RemoteReward,
    pub kl_beta: f64,
    pub advantage_low: f64,
    pub advantage_high: f64,
    pub mu_iterations: usize,
    pub mini_batch: usize,
    pub batch_size_per_optimize: Option<usize>,
    pub uncentralized_training: bool,
    pub on_policy: bool,
    pub allowed_outdated_steps: Inert,
    pub temperature: Inert,
    pub epsilon_low: Inert,
    pub epsilon_high: Inert,
    pub reward_function: Inert,
    pub data_dispatch_as_rank_in_mesh: Inert,
    pub enable_dataset_cache: Inert,
    pub prompt_column_name: Inert,
    pub response_column_name: Inert,
    pub conversation_column_name: Inert,
    pub system_prompt: Inert,
    pub balance_dp_token: Inert,
    pub loss_type: Inert,
    pub overlong_reward: Inert,
}

impl Default for TrainPolicy {
    fn default() -> Self {
        Self {
            kind: None,
            trainer_type: None,
            variant: None,
            dataset: DatasetSection::default(),
            dataloader_shuffle: true,
            dataloader_seed: 0,
            dataloader_batch_size: Some(1),
            dataloader_num_workers: 0,
            dataloader_prefetch_factor: None,
            dataloader_drop_last: true,
            use_remote_reward: false,
            remote_reward: RemoteReward::default(),
            kl_beta: 0.0,
            advantage_low: -5.0,
            advantage_high: 5.0,
            mu_iterations: 1,
            mini_batch: 2,
            batch_size_per_optimize: None,
            uncentralized_training: false,
            on_policy: false,
            allowed_outdated_steps: None,
            temperature: None,
            epsilon_low: None,
            epsilon_high: None,
            reward_function: None,
            data_dispatch_as_rank_in_mesh: None,
            enable_dataset_cache: None,
            prompt_column_name: None,
            response_column_name: None,
            conversation_column_name: None,
            system_prompt: None,
            balance_dp_token: None,
            loss_type: None,
            overlong_reward: None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DatasetSection {
    /// A prompt set (`pickscore`, `ocr`, `geneval`, `dance_grpo_t2v`).
    pub name: String,
    pub subset: Option<String>,
    pub revision: Option<String>,
    /// A split name or a list (the first is used).
    pub split: Option<StringOrList>,
    pub test_size: Inert,
    /// SFT: the folder of `name.json` + `name.jpg`/`.mp4`; RL: a local copy of the prompt set.
    pub local_dir: String,
}

impl DatasetSection {
    pub fn split_name(&self) -> String {
        match &self.split {
            Some(StringOrList::One(s)) => s.clone(),
            Some(StringOrList::Many(v)) => v.first().cloned().unwrap_or_default(),
            None => String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RemoteReward {
    pub scale: f64,
    pub reward_fns: Vec<RewardFn>,
    pub reward_clip_min: f64,
    pub reward_clip_max: f64,
    pub batch_size: usize,
}

impl Default for RemoteReward {
    fn default() -> Self {
        Self {
            scale: 1.0,
            reward_fns: vec![RewardFn {
                name: "dance_grpo".into(),
                weight: 1.0,
                score_key: Some("overall_reward".into()),
                clip_min: -5.0,
                clip_max: 5.0,
            }],
            reward_clip_min: -5.0,
            reward_clip_max: 5.0,
            batch_size: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewardFn {
    pub name: String,
    #[serde(default = "one")]
    pub weight: f64,
    #[serde(default)]
    pub score_key: Option<String>,
    #[serde(default = "minus_five")]
    pub clip_min: f64,
    #[serde(default = "five")]
    pub clip_max: f64,
}

fn one() -> f64 {
    1.0
}
fn five() -> f64 {
    5.0
}
fn minus_five() -> f64 {
    -5.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CkptSection {
    pub enable_checkpoint: bool,
    pub save_freq: u64,
    pub save_freq_in_epoch: u64,
    /// "async" or "sync".
    pub save_mode: String,
    /// Checkpoints kept; -1 keeps all.
    pub max_keep: i64,
    pub export_safetensors: bool,
    pub upload_hf: Inert,
    pub hf_repo_name: Inert,
    pub upload_s3: Inert,
    pub s3_bucket: Inert,
    pub s3_prefix: Inert,
}

impl Default for CkptSection {
    fn default() -> Self {
        Self {
            enable_checkpoint: false,
            save_freq: 20,
            save_freq_in_epoch: 0,
            save_mode: "async".into(),
            max_keep: 5,
            export_safetensors: true,
            upload_hf: None,
            hf_repo_name: None,
            upload_s3: None,
            s3_bucket: None,
            s3_prefix: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ValidationSection {
    pub enable: bool,
    pub val_before_train: bool,
    pub freq: u64,
    pub batch_size: Option<usize>,
    pub dataset: DatasetSection,
    pub n_generation: usize,
    pub use_remote_reward: Option<bool>,
    /// Absent: the training reward config.
    pub remote_reward: Option<RemoteReward>,
    pub temperature: Inert,
    pub top_p: Inert,
    pub top_k: Inert,
    pub repetition_penalty: Inert,
    pub max_response_length: Inert,
    pub reward_function: Inert,
}

impl Default for ValidationSection {
    fn default() -> Self {
        Self {
            enable: false,
            val_before_train: false,
            freq: 20,
            batch_size: None,
            dataset: DatasetSection::default(),
            n_generation: 1,
            use_remote_reward: None,
            remote_reward: None,
            temperature: None,
            top_p: None,
            top_k: None,
            repetition_penalty: None,
            max_response_length: None,
            reward_function: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LoggingSection {
    /// "console", "wandb", "jsonl", "tensorboard"; sana-rl always writes JSONL and
    /// TensorBoard files, and has no wandb client (a warning says so).
    pub logger: Vec<String>,
    pub level: Option<String>,
    pub log_interval: u64,
    /// Image grid of rollouts every N steps (and at step 1).
    pub multi_modal_log_interval: Option<u64>,
    pub project_name: String,
    pub group_name: Option<String>,
    pub experiment_name: Option<String>,
    pub report_mfu: bool,
    pub wandb_run_id: Inert,
    pub wandb_run_name: Inert,
    pub wandb_resume: Inert,
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self {
            logger: Vec::new(),
            level: None,
            log_interval: 100,
            multi_modal_log_interval: None,
            project_name: "cosmos_rl".into(),
            group_name: None,
            experiment_name: None,
            report_mfu: false,
            wandb_run_id: None,
            wandb_run_name: None,
            wandb_resume: None,
        }
    }
}

/// What a run trains with: DiffusionNFT (GRPO type with trainer `diffusion_nft`) or SFT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    Nft,
    Sft,
}

impl RunConfig {
    /// Cosmos-RL's inference of `train_policy.type` when absent: "grpo" when any RL key is
    /// set, else "sft".
    pub fn policy_type(&self) -> String {
        if let Some(k) = &self.train.train_policy.kind {
            return k.clone();
        }
        let tp = &self.train.train_policy;
        let rl = tp.temperature.is_some()
            || tp.epsilon_low.is_some()
            || tp.epsilon_high.is_some()
            || tp.kl_beta != 0.0
            || tp.use_remote_reward;
        if rl { "grpo" } else { "sft" }.into()
    }

    pub fn run_kind(&self) -> RunKind {
        if self.policy_type() == "sft" {
            RunKind::Sft
        } else {
            RunKind::Nft
        }
    }

    /// The seed of the run (`train.seed`; Cosmos-RL's 42 when absent and deterministic or negative).
    pub fn seed(&self) -> u64 {
        match self.train.seed {
            Some(s) if s >= 0 => s as u64,
            _ => 42,
        }
    }

    /// The validation reward config (the training one unless given).
    pub fn validation_reward(&self) -> &RemoteReward {
        self.validation
            .remote_reward
            .as_ref()
            .unwrap_or(&self.train.train_policy.remote_reward)
    }

    /// `int(num_steps × timesteps_fraction)`.
    pub fn num_train_timesteps(&self) -> usize {
        let d = &self.policy.diffusers;
        (d.sample.num_steps as f64 * d.timesteps_fraction) as usize
    }

    /// Checks the values a run cannot start with: `Err((key, message with the fix))`.
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        let d = &self.policy.diffusers;
        let t = &self.train;
        let tp = &t.train_policy;
        match self.policy_type().as_str() {
            "grpo" | "sft" => {}
            other => {
                return err(
                    "train.train_policy.type",
                    format!("{other:?}: expected \"grpo\" (DiffusionNFT with trainer_type = \"diffusion_nft\") or \"sft\""),
                )
            }
        }
        if d.inference_size.len() != 2 || d.inference_size.iter().any(|&x| x <= 0) {
            return err(
                "policy.diffusers.inference_size",
                format!(
                    "{:?}: expected [height, width], both positive",
                    d.inference_size
                ),
            );
        }
        if !["float32", "bfloat16", "float16"].contains(&d.dtype.as_str()) {
            return err(
                "policy.diffusers.dtype",
                format!(
                    "{:?}: expected \"float32\", \"bfloat16\" or \"float16\"",
                    d.dtype
                ),
            );
        }
        if !["float32", "bfloat16", "float16"].contains(&t.param_dtype.as_str()) {
            return err(
                "train.param_dtype",
                format!(
                    "{:?}: expected \"float32\", \"bfloat16\" or \"float16\"",
                    t.param_dtype
                ),
            );
        }
        if t.optm_betas.len() != 2 {
            return err(
                "train.optm_betas",
                format!(
                    "{:?}: expected two numbers, e.g. [0.9, 0.999]",
                    t.optm_betas
                ),
            );
        }
        if !matches!(t.optm_name.as_str(), "AdamW" | "Adam") {
            return err(
                "train.optm_name",
                format!(
                    "{:?}: sana-rl implements \"AdamW\" (and \"Adam\" as AdamW without decay)",
                    t.optm_name
                ),
            );
        }
        if !matches!(t.ckpt.save_mode.as_str(), "async" | "sync") {
            return err(
                "train.ckpt.save_mode",
                format!("{:?}: expected \"async\" or \"sync\"", t.ckpt.save_mode),
            );
        }
        if t.ckpt.save_freq == 0 && t.ckpt.save_freq_in_epoch == 0 {
            return err(
                "train.ckpt.save_freq",
                "must be > 0 (or set save_freq_in_epoch)".into(),
            );
        }
        if t.train_batch_per_replica == 0 {
            return err("train.train_batch_per_replica", "must be at least 1".into());
        }
        if tp.mini_batch == 0 {
            return err("train.train_policy.mini_batch", "must be at least 1".into());
        }
        if let Some(l) = &self.policy.lora {
            if let Some(StringOrList::One(s)) = &l.target_modules {
                if s != "all-linear" {
                    return err(
                        "policy.lora.target_modules",
                        format!("{s:?}: a string must be \"all-linear\"; give a list of module names otherwise"),
                    );
                }
            }
            if let BoolOrString::Str(s) = &l.init_lora_weights {
                if s != "gaussian" {
                    return err(
                        "policy.lora.init_lora_weights",
                        format!("{s:?}: sana-rl implements true, false and \"gaussian\""),
                    );
                }
            }
            if l.r <= 0 {
                return err("policy.lora.r", format!("{}: must be positive", l.r));
            }
        }
        if self.run_kind() == RunKind::Nft {
            if tp.kl_beta <= 0.0 {
                return err(
                    "train.train_policy.kl_beta",
                    format!(
                        "{}: DiffusionNFT needs kl_beta > 0 (the presets use 1e-4)",
                        tp.kl_beta
                    ),
                );
            }
            let Some(lora) = &self.policy.lora else {
                return err(
                    "policy.lora",
                    "DiffusionNFT trains a LoRA: add [policy.lora] with lora_names = [\"default\", \"old\"]".into(),
                );
            };
            for n in ["default", "old"] {
                if !lora.lora_names.iter().any(|x| x == n) {
                    return err(
                        "policy.lora.lora_names",
                        format!(
                            "{:?}: DiffusionNFT needs [\"default\", \"old\"]",
                            lora.lora_names
                        ),
                    );
                }
            }
            if !(0..=2).contains(&d.weight_copy_decay_type) {
                return err(
                    "policy.diffusers.weight_copy_decay_type",
                    format!("{}: expected 0, 1 or 2", d.weight_copy_decay_type),
                );
            }
            if d.nft_beta <= 0.0 {
                return err(
                    "policy.diffusers.nft_beta",
                    format!("{}: must be > 0", d.nft_beta),
                );
            }
            if tp.advantage_high <= 0.0 {
                return err(
                    "train.train_policy.advantage_high",
                    format!(
                        "{}: must be > 0 (the NFT loss divides by it)",
                        tp.advantage_high
                    ),
                );
            }
            if self.num_train_timesteps() == 0 {
                return err(
                    "policy.diffusers.timesteps_fraction",
                    format!(
                        "{} × num_steps {} rounds down to 0 timesteps",
                        d.timesteps_fraction, d.sample.num_steps
                    ),
                );
            }
            if self.rollout.n_generation == 0 {
                return err("rollout.n_generation", "must be at least 1".into());
            }
            if self.rollout.n_generation_mini_batch == Some(0) {
                return err(
                    "rollout.n_generation_mini_batch",
                    "must be at least 1 (samples per sampling call; absent = all at once)".into(),
                );
            }
            // The rollout solver, checked at load so that --dry-run refuses it too.
            let sample = &d.sample;
            let solver = crate::schedulers::solver::SolverConfig::parse(
                &sample.solver,
                sample.deterministic_sampling,
                sample.noise_level,
            );
            match solver {
                Ok(_) => {}
                Err(crate::SanaError::Input { name, msg }) => {
                    return err(&format!("policy.diffusers.sample.{name}"), msg)
                }
                Err(e) => return err("policy.diffusers.sample.solver", e.to_string()),
            }
            // DiffusionNFT trains the conditional velocity alone: rollouts sampled
            // with CFG would come from another policy than the one trained.
            if sample.guidance_scale != 1.0 {
                return err(
                    "policy.diffusers.sample.guidance_scale",
                    format!(
                        "{}: DiffusionNFT trains without classifier-free guidance (its loss uses \
                         the conditional velocity only), so rollouts sampled with CFG would come \
                         from another policy than the one trained; set guidance_scale = 1.0",
                        sample.guidance_scale
                    ),
                );
            }
            if tp.dataset.name.is_empty() {
                return err(
                    "train.train_policy.dataset.name",
                    format!(
                        "missing: name the prompt set ({}); dataset.local_dir may point at a local copy",
                        crate::data::prompts::known_names().join(", ")
                    ),
                );
            }
            if !crate::data::prompts::known_names().contains(&tp.dataset.name.as_str()) {
                return err(
                    "train.train_policy.dataset.name",
                    format!(
                        "{:?} is not a prompt set sana-rl knows: {}",
                        tp.dataset.name,
                        crate::data::prompts::known_names().join(", ")
                    ),
                );
            }
            if tp.remote_reward.reward_fns.is_empty() {
                return err(
                    "train.train_policy.remote_reward.reward_fns",
                    "empty: add at least one [[train.train_policy.remote_reward.reward_fns]]"
                        .into(),
                );
            }
            for (i, f) in tp.remote_reward.reward_fns.iter().enumerate() {
                if f.name.trim().is_empty() {
                    return err(
                        &format!("train.train_policy.remote_reward.reward_fns[{i}].name"),
                        "empty reward name".into(),
                    );
                }
            }
        } else if tp.dataset.local_dir.is_empty() {
            return err(
                "train.train_policy.dataset.local_dir",
                "missing: SFT reads a folder of name.json (with \"prompt\") + name.jpg / name.mp4"
                    .into(),
            );
        }
        Ok(())
    }
}
