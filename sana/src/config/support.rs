//! What each key of the run config does in sana-rl: one decision per key of the
//! schema, so that no key is accepted and then silently ignored.
//!
//! A key either acts (the run reads it), acts in one kind of run only (NFT or
//! SFT), is not supported (parsed for compatibility, not used), or names
//! something sana-rl always does one way. [`not_supported`] lists the keys a
//! config writes that the run will not honour; the controller prints them as
//! one `parsed, not supported: …` line in the `--dry-run` plan and once at the
//! start of a run. A key counts as written when it appears in the file, and
//! it is reported:
//! - `NotSupported`, or `ActsIn` the other kind of run: when its value differs
//!   from the schema's default (Cosmos-RL's), so a preset that spells out a
//!   default stays quiet;
//! - `Fixed` (and `ActsInElse` in the other kind of run): when its value asks
//!   for something other than what sana-rl always does (e.g. `train.compile =
//!   true`; `compile = false` is what happens).
//!
//! Keys inside arrays of tables (the reward functions) have no default to
//! compare with: any written one that does not act is reported.

use serde_json::Value;

use super::schema::{LoraSection, RemoteReward, RunConfig, RunKind};

/// The decision for one key.
#[derive(Debug, Clone, Copy)]
pub enum Support {
    /// The run reads it.
    Acts,
    /// Read by this kind of run only.
    ActsIn(RunKind),
    /// Read by `kind` runs; the other kind always does `does` (values for
    /// which `ok` holds ask for just that).
    ActsInElse {
        kind: RunKind,
        does: &'static str,
        ok: fn(&Value) -> bool,
    },
    /// Parsed, not used; why.
    NotSupported(&'static str),
    /// sana-rl always does one thing here (`does`); values for which `ok`
    /// holds ask for just that.
    Fixed {
        does: &'static str,
        ok: fn(&Value) -> bool,
    },
}

impl Support {
    /// Why a key with this decision is reported (None: it acts in `kind`).
    pub fn reason(&self, kind: RunKind) -> Option<String> {
        match *self {
            Support::Acts => None,
            Support::ActsIn(k) if k == kind => None,
            Support::ActsIn(RunKind::Nft) => Some("read by DiffusionNFT runs only".into()),
            Support::ActsIn(RunKind::Sft) => Some("read by SFT runs only".into()),
            Support::ActsInElse { kind: k, .. } if k == kind => None,
            Support::ActsInElse { does, .. } => Some(does.into()),
            Support::NotSupported(why) => Some(why.into()),
            Support::Fixed { does, .. } => Some(does.into()),
        }
    }
}

fn is_true(v: &Value) -> bool {
    v == &Value::Bool(true)
}
fn is_false(v: &Value) -> bool {
    v == &Value::Bool(false)
}
fn is_float32(v: &Value) -> bool {
    v.as_str() == Some("float32")
}
fn is_colocated(v: &Value) -> bool {
    matches!(v.as_str(), Some("colocated" | "colocated_separated"))
}
fn is_nft_rollout(v: &Value) -> bool {
    v.as_str() == Some("diffusion_nft_rollout")
}
fn is_our_trainer(v: &Value) -> bool {
    matches!(v.as_str(), Some("diffusion_nft" | "sft"))
}
fn is_our_logger(v: &Value) -> bool {
    v.as_array().is_some_and(|a| {
        a.iter()
            .all(|l| matches!(l.as_str(), Some("console" | "jsonl" | "tensorboard")))
    })
}

use RunKind::{Nft, Sft};
use Support::{Acts, ActsIn, ActsInElse, Fixed, NotSupported};

const LLM: &str = "a language-model option of Cosmos-RL";
const VLLM: &str = "a vLLM rollout option; rollouts run sana-rl's diffusion sampler";
const NO_PP: &str = "no pipeline parallelism: a SANA transformer fits one device";
const NO_WANDB: &str = "sana-rl has no wandb client (metrics go to metrics.jsonl and TensorBoard)";
const WEIGHT_SYNC: &str =
    "a weight-transfer option of Cosmos-RL's NCCL path; sana-rl sends the adapter over gRPC";
const NO_UPLOAD: &str = "checkpoints are not uploaded anywhere";
const PROMPT_FILES: &str = "prompt sets are files, one per split";

/// Every key of the schema (dotted path; `[]` for an array of tables) and its decision.
pub const TABLE: &[(&str, Support)] = &[
    ("redis", NotSupported("Cosmos-RL's controller Redis: sana-rl's processes talk gRPC, and the embedded reward service picks a free port")),
    ("mode", Fixed { does: "rollout and policy always take turns on the same devices (colocated)", ok: is_colocated }),
    ("eth_ips", NotSupported("worker addresses come from the launcher (local, Slurm, --attach-*)")),
    ("custom", NotSupported("for user code in Cosmos-RL; sana-rl runs none")),
    ("profiler", NotSupported("no profiler; spans go to OpenTelemetry with --otlp-endpoint")),
    ("distillation", NotSupported("no distillation")),
    ("vla", NotSupported("no VLA training")),
    ("controller_execution_id", NotSupported("Cosmos-RL controller bookkeeping")),
    // [policy]
    ("policy.model_name_or_path", Acts),
    ("policy.model_revision", NotSupported("the model is a local directory or the Hugging Face cache's newest snapshot")),
    ("policy.model_safetensor_path", NotSupported("weights come from the diffusers pipeline directory")),
    ("policy.is_diffusers", Fixed { does: "sana-rl loads diffusers pipelines only", ok: is_true }),
    ("policy.model_gradient_checkpointing", NotSupported("activations are recomputed per block with FSDP only (always there); other runs keep them")),
    ("policy.model_max_length", NotSupported("prompts are cut at policy.diffusers.max_prompt_length")),
    ("policy.trainable_map", NotSupported("what trains is [policy.lora]'s adapter, or all weights")),
    ("policy.freeze_pattern", NotSupported("what trains is [policy.lora]'s adapter, or all weights")),
    ("policy.trainable_pattern", NotSupported("what trains is [policy.lora]'s adapter, or all weights")),
    ("policy.enable_liger_kernel", NotSupported(LLM)),
    ("policy.enable_liger_cross_entropy", NotSupported(LLM)),
    ("policy.enable_liger_fused_cross_entropy", NotSupported(LLM)),
    ("policy.aux_loss_coeff", NotSupported(LLM)),
    ("policy.lora.r", Acts),
    ("policy.lora.lora_alpha", Acts),
    ("policy.lora.lora_dropout", Acts),
    ("policy.lora.target_modules", Acts),
    ("policy.lora.init_lora_weights", Acts),
    ("policy.lora.use_rslora", Acts),
    ("policy.lora.lora_names", Acts),
    ("policy.lora.lora_path", Acts),
    ("policy.lora.primary_adapter", NotSupported("the trained adapter is always \"default\" (and \"old\" the rollout copy)")),
    ("policy.lora.modules_to_save", NotSupported("a LoRA run trains the adapter's weights only")),
    ("policy.lora.alpha_pattern", Acts),
    ("policy.lora.r_pattern", Acts),
    ("policy.diffusers.dtype", ActsIn(Nft)),
    ("policy.diffusers.is_video", Acts),
    ("policy.diffusers.max_prompt_length", Acts),
    ("policy.diffusers.weighting_scheme", ActsIn(Sft)),
    ("policy.diffusers.train_flow_shift", ActsIn(Sft)),
    ("policy.diffusers.offload", Fixed { does: "every part of the pipeline stays on its device (no offload)", ok: is_false }),
    ("policy.diffusers.logit_mean", ActsIn(Sft)),
    ("policy.diffusers.logit_std", ActsIn(Sft)),
    ("policy.diffusers.inference_size", Acts),
    ("policy.diffusers.inference_frames", NotSupported("rollouts and validation sample train_frames frames, as Cosmos-RL's NFT rollout (which does not read it either)")),
    ("policy.diffusers.train_frames", Acts),
    ("policy.diffusers.timesteps_fraction", ActsIn(Nft)),
    ("policy.diffusers.nft_beta", ActsIn(Nft)),
    ("policy.diffusers.weight_copy_decay_type", ActsIn(Nft)),
    ("policy.diffusers.lora", NotSupported("the LoRA is [policy.lora]")),
    ("policy.diffusers.tokenizer", NotSupported("a video-tokenizer option of other Cosmos models; SANA's VAE has none")),
    ("policy.diffusers.sample.num_steps", ActsIn(Nft)),
    ("policy.diffusers.sample.eval_num_steps", ActsIn(Nft)),
    ("policy.diffusers.sample.guidance_scale", ActsIn(Nft)),
    ("policy.diffusers.sample.global_std", NotSupported("advantages are normalised within each prompt's group (Cosmos-RL 0.4.7 does not read it either)")),
    ("policy.diffusers.sample.noise_level", ActsIn(Nft)),
    ("policy.diffusers.sample.deterministic_sampling", ActsIn(Nft)),
    ("policy.diffusers.sample.solver", ActsIn(Nft)),
    ("policy.parallelism.n_init_replicas", Acts),
    ("policy.parallelism.tp_size", NotSupported("no tensor parallelism: a SANA transformer fits one device")),
    ("policy.parallelism.cp_size", NotSupported("no context parallelism")),
    ("policy.parallelism.ep_size", NotSupported("no expert parallelism (SANA has no experts)")),
    ("policy.parallelism.dp_shard_size", Acts),
    ("policy.parallelism.pp_size", NotSupported(NO_PP)),
    ("policy.parallelism.dp_replicate_size", Acts),
    ("policy.parallelism.pp_dynamic_shape", NotSupported(NO_PP)),
    ("policy.parallelism.pp_micro_batch_size", NotSupported(NO_PP)),
    ("policy.parallelism.pp_schedule", NotSupported(NO_PP)),
    ("policy.parallelism.pp_layers_per_stage", NotSupported(NO_PP)),
    // [rollout]
    ("rollout.n_generation", ActsIn(Nft)),
    ("rollout.n_generation_mini_batch", ActsIn(Nft)),
    ("rollout.n_generation_to_batch", NotSupported(VLLM)),
    ("rollout.batch_size", NotSupported("a step's prompts are train_batch_per_replica / n_generation")),
    ("rollout.seed", NotSupported("sample noise is seeded by train.seed, the step, the prompt and the generation")),
    ("rollout.backend", Fixed { does: "rollouts always run sana-rl's diffusion sampler (diffusion_nft_rollout)", ok: is_nft_rollout }),
    ("rollout.mode", NotSupported("rollouts always run in step with training (sync)")),
    ("rollout.parallelism.n_init_replicas", ActsIn(Nft)),
    ("rollout.parallelism.tp_size", NotSupported("each rollout worker holds the whole pipeline on one device")),
    ("rollout.parallelism.cp_size", NotSupported("each rollout worker holds the whole pipeline on one device")),
    ("rollout.parallelism.ep_size", NotSupported("each rollout worker holds the whole pipeline on one device")),
    ("rollout.parallelism.dp_shard_size", NotSupported("each rollout worker is one replica on one device; rollout.parallelism.n_init_replicas sets how many")),
    ("rollout.parallelism.pp_size", NotSupported(NO_PP)),
    ("rollout.parallelism.dp_replicate_size", NotSupported("each rollout worker is one replica on one device; rollout.parallelism.n_init_replicas sets how many")),
    ("rollout.parallelism.pp_dynamic_shape", NotSupported(NO_PP)),
    ("rollout.parallelism.pp_micro_batch_size", NotSupported(NO_PP)),
    ("rollout.parallelism.pp_schedule", NotSupported(NO_PP)),
    ("rollout.parallelism.pp_layers_per_stage", NotSupported(NO_PP)),
    ("rollout.completion_admission", NotSupported(VLLM)),
    ("rollout.enforce_eager", NotSupported(VLLM)),
    ("rollout.include_stop_str_in_output", NotSupported(VLLM)),
    ("rollout.gpu_memory_utilization", NotSupported(VLLM)),
    ("rollout.enable_chunked_prefill", NotSupported(VLLM)),
    ("rollout.max_response_length", NotSupported(VLLM)),
    ("rollout.quantization", NotSupported(VLLM)),
    ("rollout.sampling_config", NotSupported(VLLM)),
    ("rollout.vllm_use_flashinfer", NotSupported(VLLM)),
    ("rollout.multi_turn_config", NotSupported(VLLM)),
    ("rollout.async_config", NotSupported("rollouts always run in step with training")),
    ("rollout.async_r2r_sync", NotSupported(WEIGHT_SYNC)),
    ("rollout.r2r_sync_pack_tensors", NotSupported(WEIGHT_SYNC)),
    ("rollout.r2r_sync_bucket_size_bytes", NotSupported(WEIGHT_SYNC)),
    ("rollout.prefetch_rollout", NotSupported("rollouts always run in step with training")),
    ("rollout.prefetch_queue_maxsize", NotSupported("rollouts always run in step with training")),
    ("rollout.broadcast_all_params", NotSupported(WEIGHT_SYNC)),
    // [train]
    ("train.optm_name", Acts),
    ("train.optm_lr", Acts),
    ("train.optm_impl", NotSupported("one AdamW (libtorch ops); foreach/fused change speed, not the update")),
    ("train.optm_weight_decay", Acts),
    ("train.optm_betas", Acts),
    ("train.optm_warmup_steps", Acts),
    ("train.optm_warmup_start_factor", Acts),
    ("train.optm_decay_ratio", Acts),
    ("train.optm_decay_type", Acts),
    ("train.optm_min_lr_factor", Acts),
    ("train.optm_grad_norm_clip", Acts),
    ("train.ema_enable", Acts),
    ("train.ema_decay", Acts),
    ("train.ema_update_step_interval", Acts),
    ("train.master_dtype", NotSupported("master weights are always float32")),
    ("train.param_dtype", ActsInElse { kind: Sft, does: "DiffusionNFT trains in float32", ok: is_float32 }),
    ("train.transfer_dtype", NotSupported("the adapter goes to the rollout workers in its own dtype")),
    ("train.logprob_dtype", NotSupported(LLM)),
    ("train.fsdp_reduce_dtype", Acts),
    ("train.fsdp_offload", NotSupported("FSDP shards stay on their device")),
    ("train.fsdp_reshard_after_forward", ActsIn(Sft)),
    ("train.train_batch_per_replica", Acts),
    ("train.resume", Acts),
    ("train.epoch", Acts),
    ("train.output_dir", Acts),
    ("train.timestamp", Acts),
    ("train.epsilon", Acts),
    ("train.async_tp_enabled", NotSupported("no tensor parallelism")),
    ("train.compile", Fixed { does: "no torch.compile: libtorch runs the model eagerly", ok: is_false }),
    ("train.sync_weight_interval", NotSupported("the rollout adapter is refreshed after every step")),
    ("train.deterministic", NotSupported("runs are always seeded (train.seed, else 42); torch's deterministic algorithms are not switched on")),
    ("train.seed", Acts),
    ("train.non_text", Fixed { does: "the data are always images or videos", ok: is_true }),
    ("train.max_num_steps", Acts),
    ("train.save_ckpt_at_exit", NotSupported("a final checkpoint is always written at the end and on Ctrl-C")),
    ("train.local_dataset", NotSupported(LLM)),
    ("train.force_use_hf", NotSupported(LLM)),
    ("train.sequence_packing", NotSupported(LLM)),
    ("train.signal_to_handle", NotSupported("Ctrl-C (SIGINT) is the signal that stops a run with a checkpoint")),
    ("train.activation_offload", NotSupported("activations stay on their device")),
    ("train.fa_version", NotSupported("attention is libtorch's scaled_dot_product_attention")),
    ("train.fp8", NotSupported("no FP8 training")),
    ("train.fp4", NotSupported("no FP4 training")),
    ("train.prefetch_payloads", NotSupported(WEIGHT_SYNC)),
    ("train.p2p_sync_pack_tensors", NotSupported(WEIGHT_SYNC)),
    ("train.p2r_sync_groups_per_round", NotSupported(WEIGHT_SYNC)),
    ("train.coalesce_weight_sync", NotSupported(WEIGHT_SYNC)),
    ("train.train_policy.type", Acts),
    ("train.train_policy.trainer_type", Fixed { does: "\"grpo\" always trains DiffusionNFT (diffusion_nft), \"sft\" SFT", ok: is_our_trainer }),
    ("train.train_policy.variant", NotSupported(LLM)),
    ("train.train_policy.dataset.name", ActsIn(Nft)),
    ("train.train_policy.dataset.subset", NotSupported(PROMPT_FILES)),
    ("train.train_policy.dataset.revision", NotSupported(PROMPT_FILES)),
    ("train.train_policy.dataset.split", ActsIn(Nft)),
    ("train.train_policy.dataset.test_size", NotSupported(PROMPT_FILES)),
    ("train.train_policy.dataset.local_dir", Acts),
    ("train.train_policy.dataloader_shuffle", ActsIn(Sft)),
    ("train.train_policy.dataloader_seed", Acts),
    ("train.train_policy.dataloader_batch_size", NotSupported("the controller hands out whole steps")),
    ("train.train_policy.dataloader_num_workers", NotSupported("the policy worker reads the data (clips on its own decode pool)")),
    ("train.train_policy.dataloader_prefetch_factor", NotSupported("the policy worker reads the data (clips on its own decode pool)")),
    ("train.train_policy.dataloader_drop_last", NotSupported("SFT takes whole batches only; prompt sets wrap into the next epoch")),
    ("train.train_policy.use_remote_reward", Fixed { does: "rewards always come from a reward service through the reward gateway", ok: is_true }),
    ("train.train_policy.remote_reward.scale", ActsIn(Nft)),
    ("train.train_policy.remote_reward.reward_fns[].name", ActsIn(Nft)),
    ("train.train_policy.remote_reward.reward_fns[].weight", ActsIn(Nft)),
    ("train.train_policy.remote_reward.reward_fns[].score_key", ActsIn(Nft)),
    ("train.train_policy.remote_reward.reward_fns[].clip_min", ActsIn(Nft)),
    ("train.train_policy.remote_reward.reward_fns[].clip_max", ActsIn(Nft)),
    ("train.train_policy.remote_reward.reward_clip_min", ActsIn(Nft)),
    ("train.train_policy.remote_reward.reward_clip_max", ActsIn(Nft)),
    ("train.train_policy.remote_reward.batch_size", NotSupported("the reward gateway batches requests by its own [gateway] max_batch_items")),
    ("train.train_policy.kl_beta", ActsIn(Nft)),
    ("train.train_policy.advantage_low", ActsIn(Nft)),
    ("train.train_policy.advantage_high", ActsIn(Nft)),
    ("train.train_policy.mu_iterations", ActsIn(Nft)),
    ("train.train_policy.mini_batch", Acts),
    ("train.train_policy.batch_size_per_optimize", ActsIn(Nft)),
    ("train.train_policy.uncentralized_training", NotSupported("rollouts always reach the policy through the controller")),
    ("train.train_policy.on_policy", Fixed { does: "every step samples with the newest weights (always on-policy)", ok: is_true }),
    ("train.train_policy.allowed_outdated_steps", NotSupported("always on-policy: no rollout is outdated")),
    ("train.train_policy.temperature", NotSupported("an LLM sampling option (it only counts toward inferring train_policy.type, as in Cosmos-RL)")),
    ("train.train_policy.epsilon_low", NotSupported("an LLM GRPO option (it only counts toward inferring train_policy.type, as in Cosmos-RL)")),
    ("train.train_policy.epsilon_high", NotSupported("an LLM GRPO option (it only counts toward inferring train_policy.type, as in Cosmos-RL)")),
    ("train.train_policy.reward_function", NotSupported("LLM reward functions; DiffusionNFT is rewarded by remote_reward")),
    ("train.train_policy.data_dispatch_as_rank_in_mesh", NotSupported("every policy rank gets the step's whole batch")),
    ("train.train_policy.enable_dataset_cache", NotSupported(LLM)),
    ("train.train_policy.prompt_column_name", NotSupported(LLM)),
    ("train.train_policy.response_column_name", NotSupported(LLM)),
    ("train.train_policy.conversation_column_name", NotSupported(LLM)),
    ("train.train_policy.system_prompt", NotSupported(LLM)),
    ("train.train_policy.balance_dp_token", NotSupported(LLM)),
    ("train.train_policy.loss_type", NotSupported(LLM)),
    ("train.train_policy.overlong_reward", NotSupported(LLM)),
    ("train.ckpt.enable_checkpoint", Acts),
    ("train.ckpt.save_freq", Acts),
    ("train.ckpt.save_freq_in_epoch", NotSupported("checkpoints follow save_freq (steps)")),
    ("train.ckpt.save_mode", Acts),
    ("train.ckpt.max_keep", Acts),
    ("train.ckpt.export_safetensors", Acts),
    ("train.ckpt.upload_hf", NotSupported(NO_UPLOAD)),
    ("train.ckpt.hf_repo_name", NotSupported(NO_UPLOAD)),
    ("train.ckpt.upload_s3", NotSupported(NO_UPLOAD)),
    ("train.ckpt.s3_bucket", NotSupported(NO_UPLOAD)),
    ("train.ckpt.s3_prefix", NotSupported(NO_UPLOAD)),
    // [validation]: sampled and scored in NFT runs; SFT runs do not validate yet.
    ("validation.enable", ActsIn(Nft)),
    ("validation.val_before_train", ActsIn(Nft)),
    ("validation.freq", ActsIn(Nft)),
    ("validation.batch_size", ActsIn(Nft)),
    ("validation.dataset.name", ActsIn(Nft)),
    ("validation.dataset.subset", NotSupported(PROMPT_FILES)),
    ("validation.dataset.revision", NotSupported(PROMPT_FILES)),
    ("validation.dataset.split", ActsIn(Nft)),
    ("validation.dataset.test_size", NotSupported(PROMPT_FILES)),
    ("validation.dataset.local_dir", ActsIn(Nft)),
    ("validation.n_generation", ActsIn(Nft)),
    ("validation.use_remote_reward", Fixed { does: "validation rewards always come from a reward service through the reward gateway", ok: is_true }),
    ("validation.remote_reward.scale", ActsIn(Nft)),
    ("validation.remote_reward.reward_fns[].name", ActsIn(Nft)),
    ("validation.remote_reward.reward_fns[].weight", ActsIn(Nft)),
    ("validation.remote_reward.reward_fns[].score_key", ActsIn(Nft)),
    ("validation.remote_reward.reward_fns[].clip_min", ActsIn(Nft)),
    ("validation.remote_reward.reward_fns[].clip_max", ActsIn(Nft)),
    ("validation.remote_reward.reward_clip_min", ActsIn(Nft)),
    ("validation.remote_reward.reward_clip_max", ActsIn(Nft)),
    ("validation.remote_reward.batch_size", NotSupported("the reward gateway batches requests by its own [gateway] max_batch_items")),
    ("validation.temperature", NotSupported(LLM)),
    ("validation.top_p", NotSupported(LLM)),
    ("validation.top_k", NotSupported(LLM)),
    ("validation.repetition_penalty", NotSupported(LLM)),
    ("validation.max_response_length", NotSupported(LLM)),
    ("validation.reward_function", NotSupported("LLM reward functions; validation is rewarded by remote_reward")),
    // [logging]
    ("logging.logger", Fixed { does: "sana-rl always logs to the console, metrics.jsonl and TensorBoard, and has no wandb client", ok: is_our_logger }),
    ("logging.level", NotSupported("log levels come from RUST_LOG")),
    ("logging.log_interval", NotSupported("metrics are logged every step")),
    ("logging.multi_modal_log_interval", ActsIn(Nft)),
    ("logging.project_name", NotSupported(NO_WANDB)),
    ("logging.group_name", NotSupported(NO_WANDB)),
    // Names the objects of `controller --render k8s`.
    ("logging.experiment_name", Acts),
    ("logging.report_mfu", NotSupported("no MFU report")),
    ("logging.wandb_run_id", NotSupported(NO_WANDB)),
    ("logging.wandb_run_name", NotSupported(NO_WANDB)),
    ("logging.wandb_resume", NotSupported(NO_WANDB)),
];

/// Keys whose mere presence decides `train.train_policy.type` when the config
/// does not give it (`RunConfig::policy_type`): there they act.
const TYPE_INFERENCE: &[&str] = &[
    "train.train_policy.temperature",
    "train.train_policy.epsilon_low",
    "train.train_policy.epsilon_high",
    "train.train_policy.kl_beta",
    "train.train_policy.use_remote_reward",
];

/// The decision for a dotted key path (`[]` for array elements).
pub fn support_of(key: &str) -> Option<Support> {
    TABLE.iter().find(|(k, _)| *k == key).map(|(_, s)| *s)
}

/// Why a key that [`not_supported`] listed does nothing in a `kind` run.
pub fn why_not(key: &str, kind: RunKind) -> String {
    if key == "policy.diffusers.sample.noise_level" {
        return "the eta of stochastic sampling; a deterministic solver runs with 0".into();
    }
    support_of(key)
        .and_then(|s| s.reason(kind))
        .unwrap_or_else(|| "not read by this run".into())
}

/// A config with every optional section present, so that serialising it
/// shows every key the schema accepts.
pub(crate) fn populated_json() -> Value {
    let mut full = RunConfig::default();
    full.policy.lora = Some(LoraSection::default());
    full.validation.remote_reward = Some(RemoteReward::default());
    serde_json::to_value(&full).expect("config serialises")
}

/// One step into a serialised config.
#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

fn lookup<'a>(v: &'a Value, segs: &[Seg]) -> Option<&'a Value> {
    segs.iter().try_fold(v, |v, s| match s {
        Seg::Key(k) => v.get(k.as_str()),
        Seg::Index(i) => v.get(*i),
    })
}

/// A path that has keys of the table below it (a table of the schema, not a key).
fn is_section(path: &str) -> bool {
    let prefix = format!("{path}.");
    TABLE.iter().any(|(k, _)| k.starts_with(&prefix))
}

/// The table's keys the file writes, each with where its value is.
fn written(t: &toml::Table, prefix: &str, segs: &[Seg], out: &mut Vec<(usize, Vec<Seg>)>) {
    for (k, v) in t {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let mut here = segs.to_vec();
        here.push(Seg::Key(k.clone()));
        if let Some(i) = TABLE.iter().position(|(key, _)| *key == path) {
            out.push((i, here));
            continue;
        }
        // Keys the schema does not have are reported as unknown elsewhere.
        match v {
            toml::Value::Table(sub) if is_section(&path) => written(sub, &path, &here, out),
            toml::Value::Array(items) if is_section(&format!("{path}[]")) => {
                for (n, item) in items.iter().enumerate() {
                    if let toml::Value::Table(sub) = item {
                        let mut at = here.clone();
                        at.push(Seg::Index(n));
                        written(sub, &format!("{path}[]"), &at, out);
                    }
                }
            }
            _ => {}
        }
    }
}

/// The keys `raw` (the file as written) sets that the run loaded as `config`
/// will not honour, in the table's order; see the module's doc for the rule.
pub fn not_supported(config: &RunConfig, raw: &toml::Table) -> Vec<String> {
    let kind = config.run_kind();
    let typed = serde_json::to_value(config).expect("config serialises");
    let defaults = serde_json::to_value(RunConfig::default()).expect("config serialises");
    let type_given = raw
        .get("train")
        .and_then(|t| t.get("train_policy"))
        .and_then(|t| t.get("type"))
        .is_some();
    let mut keys = Vec::new();
    written(raw, "", &[], &mut keys);
    let mut hit: Vec<usize> = keys
        .into_iter()
        .filter(|(i, segs)| {
            let (key, support) = TABLE[*i];
            if !type_given && TYPE_INFERENCE.contains(&key) {
                return false;
            }
            let value = lookup(&typed, segs).unwrap_or(&Value::Null);
            // Inside an array of tables there is no default to compare with.
            let default = if segs.iter().any(|s| matches!(s, Seg::Index(_))) {
                None
            } else {
                lookup(&defaults, segs)
            };
            let differs = default.is_none_or(|d| d != value);
            match support {
                Acts => false,
                ActsIn(k) => k != kind && differs,
                ActsInElse { kind: k, ok, .. } => k != kind && !ok(value),
                NotSupported(_) => differs,
                Fixed { ok, .. } => !ok(value),
            }
        })
        .map(|(i, _)| i)
        .collect();
    hit.sort_unstable();
    hit.dedup();
    let mut out: Vec<String> = hit.into_iter().map(|i| TABLE[i].0.to_string()).collect();
    // noise_level is the eta of stochastic sampling: a deterministic solver runs with 0.
    let sample = &config.policy.diffusers.sample;
    let noise_level_written = raw
        .get("policy")
        .and_then(|t| t.get("diffusers"))
        .and_then(|t| t.get("sample"))
        .and_then(|t| t.get("noise_level"))
        .is_some();
    let deterministic = sample.deterministic_sampling || sample.solver == "euler";
    if kind == RunKind::Nft
        && noise_level_written
        && deterministic
        && sample.noise_level != super::schema::SampleSection::default().noise_level
    {
        out.push("policy.diffusers.sample.noise_level".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Every key path of a serialised config (sections are walked, not listed;
    /// an array of tables as `key[]`). A field added to the schema later shows
    /// up here; one that is an `Option` of a new section shows up as a key
    /// until `populated_json` fills it in.
    fn schema_keys(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
        let Value::Object(m) = v else { return };
        for (k, x) in m {
            let p = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match x {
                Value::Object(sub) if !sub.is_empty() => schema_keys(x, &p, out),
                Value::Array(a) if a.first().is_some_and(Value::is_object) => {
                    schema_keys(&a[0], &format!("{p}[]"), out)
                }
                _ => {
                    out.insert(p);
                }
            }
        }
    }

    #[test]
    fn every_schema_key_has_a_decision() {
        let mut keys = BTreeSet::new();
        schema_keys(&populated_json(), "", &mut keys);
        let table: BTreeSet<String> = TABLE.iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(table.len(), TABLE.len(), "a key is in the table twice");
        let missing: Vec<_> = keys.difference(&table).collect();
        assert!(
            missing.is_empty(),
            "keys of the schema with no decision in config/support.rs (acts, or why not): {missing:?}"
        );
        let stale: Vec<_> = table.difference(&keys).collect();
        assert!(
            stale.is_empty(),
            "keys in config/support.rs the schema no longer has: {stale:?}"
        );
        for (k, s) in TABLE {
            if let NotSupported(why) | Fixed { does: why, .. } | ActsInElse { does: why, .. } = s {
                assert!(!why.is_empty(), "{k}: say why");
            }
        }
    }

    fn report(text: &str) -> Vec<String> {
        let raw: toml::Table = toml::from_str(text).unwrap();
        let config: RunConfig = toml::from_str(text).unwrap();
        not_supported(&config, &raw)
    }

    #[test]
    fn written_keys_that_do_not_act_are_reported() {
        let nft = "[train.train_policy]\ntype = \"grpo\"\n";
        // Defaults spelt out, and what sana-rl does anyway, stay quiet.
        assert!(report(&format!(
            "mode = \"colocated\"\n[train]\ncompile = false\nsync_weight_interval = 1\n\
             [rollout.parallelism]\ntp_size = 1\n[logging]\nlogger = [\"console\"]\n{nft}"
        ))
        .is_empty());
        // A value it will not honour, an Inert key, a key of the other kind of run.
        assert_eq!(
            report(&format!(
                "redis = \"12800\"\nmode = \"disaggregated\"\n[train]\ncompile = true\noptm_impl = \"fused\"\n\
                 [policy.diffusers]\nweighting_scheme = \"mode\"\nnft_beta = 0.5\n\
                 [[train.train_policy.remote_reward.reward_fns]]\nname = \"pickscore\"\n{nft}"
            )),
            [
                "redis",
                "mode",
                "policy.diffusers.weighting_scheme",
                "train.optm_impl",
                "train.compile"
            ]
        );
        // In an SFT run the NFT keys are the ones that do nothing.
        assert_eq!(
            report(
                "[policy.diffusers]\nweighting_scheme = \"mode\"\nnft_beta = 0.5\n\
                 [train.train_policy]\ntype = \"sft\"\n\
                 [[train.train_policy.remote_reward.reward_fns]]\nname = \"pickscore\"\n\
                 [[train.train_policy.remote_reward.reward_fns]]\nname = \"ocr\"\n"
            ),
            [
                "policy.diffusers.nft_beta",
                "train.train_policy.remote_reward.reward_fns[].name"
            ]
        );
        // noise_level is eta: read by stochastic sampling only.
        let sample = |det: bool, eta: f64| {
            report(&format!(
                "[policy.diffusers.sample]\nsolver = \"flow\"\ndeterministic_sampling = {det}\n\
                 noise_level = {eta:?}\n{nft}"
            ))
        };
        assert_eq!(sample(true, 0.7), ["policy.diffusers.sample.noise_level"]);
        assert!(sample(true, 1.0).is_empty(), "the default stays quiet");
        assert!(sample(false, 0.7).is_empty());
        assert!(support_of("redis")
            .and_then(|s| s.reason(RunKind::Nft))
            .is_some_and(|r| r.contains("Redis")));
        assert!(support_of("train.param_dtype")
            .and_then(|s| s.reason(RunKind::Sft))
            .is_none());
        // Without `type`, an LLM key's presence is what makes the run NFT: it acts.
        assert!(report("[train.train_policy]\ntemperature = 0.9\n").is_empty());
        assert_eq!(
            report(&format!(
                "{nft}temperature = 0.9\nuse_remote_reward = false\n"
            )),
            [
                "train.train_policy.use_remote_reward",
                "train.train_policy.temperature"
            ]
        );
    }

    #[test]
    fn cosmos_rl_presets_report_what_they_set_in_vain() {
        let nft = include_str!("../../../configs/sana/sana-image-nft.toml");
        assert_eq!(
            report(nft),
            [
                "redis",
                "rollout.parallelism.dp_shard_size",
                "train.optm_impl",
                "train.param_dtype",
                "train.train_policy.uncentralized_training",
                "logging.logger"
            ]
        );
        let sft = include_str!("../../../configs/sana/sana-video-sft.toml");
        let keys = report(sft);
        for k in [
            "validation.enable",
            "validation.freq",
            "policy.diffusers.sample.num_steps",
        ] {
            assert!(keys.contains(&k.to_string()), "{k}: {keys:?}");
        }
        // offload = true asks for what sana-rl does not do.
        assert!(keys.contains(&"policy.diffusers.offload".to_string()));
    }
}
