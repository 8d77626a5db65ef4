//! One DiffusionNFT training step over a batch of rollouts, as Cosmos-RL's
//! `NFTTrainer.step_training` runs it (nft-algorithm.md, steps 3 and 4):
//! shuffle samples and each sample's timesteps, optimize batches of mini
//! batches, three forwards per timestep ("old", "default" with grad, adapters
//! disabled), clip + AdamW + EMA per optimize batch, then the decayed copy of
//! "default" into "old".
//!
//! Data parallel (`parallel::DataParallel`): every rank runs the same shuffles
//! and noise on the whole batch and computes its slice of each mini batch; the
//! gradients are summed before each optimizer step and the metrics combined at
//! the end, so N ranks give one process's step on the same global batch.
//!
//! Randomness: every step re-seeds libtorch's CPU generator with
//! `seed + step` (1-based step), so a step's shuffles and noise depend only on
//! the seed and the step number. That is what makes a resumed run equal an
//! uninterrupted one without saving generator state.

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::checkpoint::TrainingState;
use super::ema::weight_copy_decay;
use super::lr_schedule::LrSchedule;
use super::nft::{nft_loss, noised, NftLossConfig, NftPredictions, NftSample, NftTerms};
use super::optim::AdamWConfig;
use super::parallel::DataParallel;
use super::trainable::{copy_in, TrainTarget, TrainedParams};
use crate::lora::ActiveAdapter;
use crate::models::transformers::{DiffusionTransformer, TransformerInputs};
use crate::pipelines::denoise::model_timestep;
use crate::{Result, SanaError};

/// The adapter trained by NFT, and the decayed copy that samples rollouts.
pub const TRAINED_ADAPTER: &str = "default";
pub const OLD_ADAPTER: &str = "old";

/// Everything of the config that shapes one NFT step.
#[derive(Debug, Clone, PartialEq)]
pub struct NftTrainerConfig {
    pub loss: NftLossConfig,
    /// `train_policy.mu_iterations`: passes over the batch per step.
    pub mu_iterations: usize,
    /// `train_policy.batch_size_per_optimize`: samples per optimizer step and
    /// rank (None: all).
    pub batch_size_per_optimize: Option<usize>,
    /// `train_policy.mini_batch`: samples per forward and rank (None: the optimize batch).
    pub mini_batch: Option<usize>,
    /// `int(sample.num_steps * timesteps_fraction)`.
    pub num_train_timesteps: usize,
    /// `train.optm_grad_norm_clip` (≤ 0: measure only).
    pub grad_norm_clip: f64,
    /// `policy.diffusers.weight_copy_decay_type` (0, 1 or 2).
    pub weight_copy_decay_type: u8,
    /// `train.ema_enable` → (`ema_decay`, `ema_update_step_interval`).
    pub ema: Option<(f64, u64)>,
    pub optimizer: AdamWConfig,
    pub schedule: LrSchedule,
    /// Base of the per-step seeds (`train.train_policy.seed` or the run's seed).
    pub seed: u64,
}

/// The rollouts of one step, packed along the batch dimension.
#[derive(Debug)]
pub struct NftBatch {
    /// `[B, C, H, W]` final clean latents of the rollouts.
    pub latents_clean: Tensor,
    /// `[B, T]` the sampler's timesteps (0..1000 scale), in sampling order.
    pub timesteps: Tensor,
    /// `[B, L, D]` prompt embeddings and their `[B, L]` caption mask.
    pub prompt_embeds: Tensor,
    pub prompt_attention_mask: Tensor,
    /// `[B]` group advantages.
    pub advantages: Tensor,
}

impl NftBatch {
    pub fn len(&self) -> i64 {
        self.latents_clean.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check(&self) -> Result<()> {
        let b = self.len();
        let named = [
            ("timesteps", &self.timesteps, 2usize),
            ("prompt_embeds", &self.prompt_embeds, 3),
            ("prompt_attention_mask", &self.prompt_attention_mask, 2),
            ("advantages", &self.advantages, 1),
        ];
        for (name, t, dims) in named {
            let s = t.size();
            if s.len() != dims || s[0] != b {
                return Err(SanaError::input(
                    name,
                    format!("shape {s:?}: expected {dims} dims with batch {b} first"),
                ));
            }
        }
        if b == 0 {
            return Err(SanaError::input("latents_clean", "empty batch"));
        }
        Ok(())
    }

    fn select(&self, index: &Tensor) -> Self {
        Self {
            latents_clean: self.latents_clean.index_select(0, index),
            timesteps: self.timesteps.index_select(0, index),
            prompt_embeds: self.prompt_embeds.index_select(0, index),
            prompt_attention_mask: self.prompt_attention_mask.index_select(0, index),
            advantages: self.advantages.index_select(0, index),
        }
    }

    fn narrow(&self, start: i64, len: i64) -> Self {
        Self {
            latents_clean: self.latents_clean.narrow(0, start, len),
            timesteps: self.timesteps.narrow(0, start, len),
            prompt_embeds: self.prompt_embeds.narrow(0, start, len),
            prompt_attention_mask: self.prompt_attention_mask.narrow(0, start, len),
            advantages: self.advantages.narrow(0, start, len),
        }
    }

    pub fn to_device(&self, device: Device) -> Self {
        Self {
            latents_clean: self.latents_clean.to_device(device),
            timesteps: self.timesteps.to_device(device),
            prompt_embeds: self.prompt_embeds.to_device(device),
            prompt_attention_mask: self.prompt_attention_mask.to_device(device),
            advantages: self.advantages.to_device(device),
        }
    }
}

/// Step metrics, averaged as Cosmos-RL reports them (`train/*_avg`): the loss terms
/// over every (mini batch, timestep), grad norm over optimizer steps.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NftStepMetrics {
    pub step: u64,
    pub loss: f64,
    pub policy_loss: f64,
    pub unweighted_policy_loss: f64,
    pub kl_loss: f64,
    pub old_kl: f64,
    pub old_deviation: f64,
    pub old_deviation_max: f64,
    pub x0_norm: f64,
    pub x0_norm_max: f64,
    pub grad_norm: f64,
    pub learning_rate: f64,
    /// The decay the "old" adapter was blended with after this step.
    pub old_decay: f64,
    pub optimizer_steps: u64,
}

/// Which metrics are batch maxima (combined across ranks by max, not by mean).
const MAX_METRICS: [usize; 2] = [6, 8];

/// The metrics of every (mini batch, timestep) of a step, with the number of
/// samples each came from on this rank.
#[derive(Default)]
struct Accumulated {
    entries: Vec<(f64, [f64; 9])>,
}

impl Accumulated {
    fn add(&mut self, t: &NftTerms, samples: i64) {
        let v = [
            t.loss.double_value(&[]),
            t.policy_loss,
            t.unweighted_policy_loss,
            t.kl_loss,
            t.old_kl,
            t.old_deviation,
            t.old_deviation_max,
            t.x0_norm,
            t.x0_norm_max,
        ];
        self.entries.push((samples as f64, v));
    }

    /// A rank with no samples in an entry still takes part in the reduction.
    fn skip(&mut self) {
        self.entries.push((0.0, [0.0; 9]));
    }

    /// Each entry's value over the whole global mini batch (sample-weighted
    /// means, maxima by max across ranks), then averaged over entries as
    /// Cosmos-RL's `train/*_avg`.
    fn means(&self, dp: &DataParallel) -> Result<[f64; 9]> {
        let mut entries: Vec<[f64; 9]> = self.entries.iter().map(|e| e.1).collect();
        if dp.world_size() > 1 {
            let mut sums: Vec<f64> = Vec::new();
            let mut maxes: Vec<f64> = Vec::new();
            for (n, v) in &self.entries {
                sums.push(*n);
                for (i, x) in v.iter().enumerate() {
                    if MAX_METRICS.contains(&i) {
                        maxes.push(if *n > 0.0 { *x } else { f64::NEG_INFINITY });
                    } else {
                        sums.push(x * n);
                    }
                }
            }
            dp.all_reduce_values(&mut sums, c10d::ReduceOp::Sum)?;
            dp.all_reduce_values(&mut maxes, c10d::ReduceOp::Max)?;
            let (mut s, mut m) = (sums.into_iter(), maxes.into_iter());
            for e in entries.iter_mut() {
                let n = s.next().unwrap_or(0.0).max(1.0);
                for (i, x) in e.iter_mut().enumerate() {
                    *x = if MAX_METRICS.contains(&i) {
                        m.next().unwrap_or(0.0)
                    } else {
                        s.next().unwrap_or(0.0) / n
                    };
                }
            }
        }
        let mut out = [0.0; 9];
        for e in &entries {
            for (o, x) in out.iter_mut().zip(e) {
                *o += x;
            }
        }
        let n = entries.len().max(1) as f64;
        Ok(out.map(|x| x / n))
    }
}

/// Optimizer, schedule, EMA and step counter of an NFT run on a LoRA model with
/// adapters "default" (trained) and "old" (the rollout policy).
#[derive(Debug)]
pub struct NftTrainer {
    pub config: NftTrainerConfig,
    /// The "default" adapter's tensors, AdamW and EMA.
    pub params: TrainedParams,
    /// Completed steps; the next step is `step + 1` (Cosmos-RL's 1-based `current_step`).
    pub step: u64,
    /// The other ranks training the same adapter (alone by default).
    pub dp: DataParallel,
}

impl NftTrainer {
    /// Freezes the base model and "old", makes "default" trainable and, as
    /// Cosmos-RL does at start, copies "default" into "old".
    pub fn new(model: &mut dyn DiffusionTransformer, config: NftTrainerConfig) -> Result<Self> {
        for name in [TRAINED_ADAPTER, OLD_ADAPTER] {
            if !model.lora().has_adapter(name) {
                return Err(SanaError::Lora(format!(
                    "NFT needs LoRA adapters \"{TRAINED_ADAPTER}\" and \"{OLD_ADAPTER}\" \
                     (policy.lora with lora_names); adapter \"{name}\" is missing"
                )));
            }
        }
        if config.num_train_timesteps == 0 {
            return Err(SanaError::input(
                "timesteps_fraction",
                "num_steps × timesteps_fraction rounds down to 0 timesteps to train on",
            ));
        }
        if config.mu_iterations == 0 {
            return Err(SanaError::input("mu_iterations", "must be at least 1"));
        }
        model.lora().copy_adapter(TRAINED_ADAPTER, OLD_ADAPTER)?;
        let named = TrainTarget::Lora(TRAINED_ADAPTER.into()).parameters(model)?;
        Ok(Self {
            params: TrainedParams::new(named, config.optimizer, config.ema),
            step: 0,
            config,
            dp: DataParallel::single(),
        })
    }

    /// The LR of the next step.
    pub fn learning_rate(&self) -> f64 {
        self.config.optimizer.lr * self.config.schedule.factor(self.step)
    }

    /// One RL step on `batch` (on the model's device).
    pub fn train_step(
        &mut self,
        model: &dyn DiffusionTransformer,
        batch: &NftBatch,
    ) -> Result<NftStepMetrics> {
        batch.check()?;
        let cfg = self.config.clone();
        let current = self.step + 1;
        let span = tracing::info_span!("nft_step", step = current);
        let _enter = span.enter();
        tch::manual_seed((cfg.seed.wrapping_add(current)) as i64);
        let lr = self.learning_rate();
        let device = model.device();
        let cpu = (Kind::Int64, Device::Cpu);
        let b = batch.len();
        let steps = batch.timesteps.size()[1];
        if cfg.num_train_timesteps as i64 > steps {
            return Err(SanaError::input(
                "timesteps",
                format!(
                    "{steps} timesteps per sample, fewer than the {} to train on",
                    cfg.num_train_timesteps
                ),
            ));
        }
        // Per-rank sizes in the config; the global batches are world times that.
        let world = self.dp.world_size() as i64;
        let per_optimize = match cfg.batch_size_per_optimize {
            Some(n) if n > 0 => (n as i64 * world).min(b),
            _ => b,
        };
        model.lora().set_training(true);
        let mut acc = Accumulated::default();
        let (mut grad_norm_sum, mut optimizer_steps) = (0.0, 0u64);
        let timestep_scaling = 1.0 / cfg.num_train_timesteps.max(1) as f64;

        for _ in 0..cfg.mu_iterations {
            let perm = Tensor::randperm(b, cpu).to_device(device);
            let mut shuffled = batch.select(&perm);
            let perms_time = Tensor::stack(
                &(0..b)
                    .map(|_| Tensor::randperm(steps, cpu))
                    .collect::<Vec<_>>(),
                0,
            )
            .to_device(device);
            shuffled.timesteps = shuffled.timesteps.gather(1, &perms_time, false);

            for opt_start in (0..b).step_by(per_optimize as usize) {
                let opt_size = per_optimize.min(b - opt_start);
                let opt_batch = shuffled.narrow(opt_start, opt_size);
                let mini = match cfg.mini_batch {
                    Some(n) if n > 0 => (n as i64 * world).min(opt_size),
                    _ => opt_size,
                };
                for mini_start in (0..opt_size).step_by(mini as usize) {
                    let mini_size = mini.min(opt_size - mini_start);
                    let mb = opt_batch.narrow(mini_start, mini_size);
                    let part = self.dp.slice(mini_size);
                    // Summed over ranks, the slices' weights add up to the mini batch's.
                    let scale = (part.1 as f64 / opt_size as f64) * timestep_scaling;
                    for j in 0..cfg.num_train_timesteps as i64 {
                        match self.timestep_loss(model, &mb, j, part)? {
                            Some(terms) => {
                                (&terms.loss * scale).backward();
                                acc.add(&terms, part.1);
                            }
                            None => acc.skip(),
                        }
                    }
                }
                // Cosmos-RL's `all_reduce_states`, then clip, AdamW and the EMA step.
                self.dp.all_reduce_grads(self.params.params())?;
                grad_norm_sum += self.params.step(lr, cfg.grad_norm_clip, current);
                optimizer_steps += 1;
            }
        }

        let old_decay = weight_copy_decay(current, cfg.weight_copy_decay_type)?;
        model
            .lora()
            .blend_adapter(OLD_ADAPTER, TRAINED_ADAPTER, old_decay)?;
        self.step = current;
        let m = acc.means(&self.dp)?;
        let metrics = NftStepMetrics {
            step: current,
            loss: m[0],
            policy_loss: m[1],
            unweighted_policy_loss: m[2],
            kl_loss: m[3],
            old_kl: m[4],
            old_deviation: m[5],
            old_deviation_max: m[6],
            x0_norm: m[7],
            x0_norm_max: m[8],
            grad_norm: grad_norm_sum / optimizer_steps.max(1) as f64,
            learning_rate: lr,
            old_decay,
            optimizer_steps,
        };
        tracing::debug!(?metrics, "nft step done");
        Ok(metrics)
    }

    /// The three forwards and the loss at the mini batch's `j`-th (shuffled)
    /// timestep, on this rank's `(start, len)` part of it (None when empty).
    /// The noise is drawn for the whole mini batch so that every rank's
    /// generator stays in step with one process's.
    fn timestep_loss(
        &self,
        model: &dyn DiffusionTransformer,
        whole: &NftBatch,
        j: i64,
        (start, len): (i64, i64),
    ) -> Result<Option<NftTerms>> {
        let noise = whole.latents_clean.to_kind(Kind::Float).randn_like();
        if len == 0 {
            return Ok(None);
        }
        let (mb, noise) = (whole.narrow(start, len), noise.narrow(0, start, len));
        let x0 = &mb.latents_clean;
        let timestep = mb.timesteps.select(1, j);
        let t = &timestep / 1000.0;
        let xt = noised(x0, &t, &noise).to_kind(model.kind());
        // The caption mask goes to the cross-attention in training as in sampling
        // (nft-algorithm.md, note on the caption mask).
        // The model sees the timestep scaled as in sampling (SANA-Sprint's timestep_scale).
        let model_t = model_timestep(model, &timestep);
        let inputs = TransformerInputs {
            hidden_states: &xt,
            encoder_hidden_states: &mb.prompt_embeds,
            timestep: &model_t,
            guidance: None,
            encoder_attention_mask: Some(&mb.prompt_attention_mask),
        };
        let forward =
            |adapter: ActiveAdapter| model.lora().with_active(adapter, || model.forward(&inputs));
        let v_old = tch::no_grad(|| forward(OLD_ADAPTER.into()))??.detach();
        let v = forward(TRAINED_ADAPTER.into())??;
        let v_ref = tch::no_grad(|| forward(ActiveAdapter::Disabled))??.detach();
        let sample = NftSample {
            x0,
            xt: &xt,
            t: &t,
            adv: &mb.advantages,
        };
        let preds = NftPredictions {
            v: &v,
            v_old: &v_old,
            v_ref: &v_ref,
        };
        Ok(Some(nft_loss(&self.config.loss, &sample, &preds)))
    }
}

impl NftTrainer {
    /// Writes the trained adapter for users (PEFT folder + diffusers file, see
    /// `LoraAdapters::export`): the EMA weights when EMA is on, as Cosmos-RL exports.
    pub fn export_adapter(&self, model: &dyn DiffusionTransformer, dir: &Path) -> Result<()> {
        self.params
            .with_ema_weights(|| model.lora().export(TRAINED_ADAPTER, dir))
    }

    /// Everything to continue this run: the trained and "old" adapters, AdamW's
    /// moments and step, the EMA, the step and seed, and `data` (the caller's
    /// position in its prompts). The base model is not saved: it is the pretrained one.
    pub fn state(
        &self,
        model: &dyn DiffusionTransformer,
        data: serde_json::Value,
    ) -> Result<TrainingState> {
        let mut tensors = Vec::new();
        self.params.push_state(&mut tensors);
        for (name, t) in model.lora().adapter_parameters(OLD_ADAPTER)? {
            tensors.push((format!("old/{name}"), t));
        }
        Ok(TrainingState {
            step: self.step,
            meta: serde_json::json!({
                "trainer": "diffusion_nft",
                "optimizer_step": self.params.optimizer.step,
                "seed": self.config.seed,
                "data": data,
            }),
            tensors,
        })
    }

    /// Puts a saved state back (weights into the model's adapters, moments, EMA,
    /// step); returns the saved data position. `source` names the checkpoint in errors.
    pub fn restore(
        &mut self,
        model: &dyn DiffusionTransformer,
        state: TrainingState,
        source: &Path,
    ) -> Result<serde_json::Value> {
        let bad = |msg: String| SanaError::Checkpoint {
            path: source.to_path_buf(),
            msg,
        };
        if state.meta["trainer"] != "diffusion_nft" {
            return Err(bad(format!(
                "saved by trainer {}, not diffusion_nft",
                state.meta["trainer"]
            )));
        }
        let optimizer_step = state.meta["optimizer_step"]
            .as_u64()
            .ok_or_else(|| bad("trainer.json has no optimizer_step".into()))?;
        let mut tensors: HashMap<String, Tensor> = state.tensors.into_iter().collect();
        self.params
            .restore_state(&mut tensors, optimizer_step, source)?;
        for (name, p) in model.lora().adapter_parameters(OLD_ADAPTER)? {
            copy_in(&mut tensors, &format!("old/{name}"), &p, source)?;
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(bad(format!(
                "tensor `{extra}` fits no parameter of this model's adapters (a different LoRA config?)"
            )));
        }
        let saved_seed = state.meta["seed"].as_u64();
        if saved_seed != Some(self.config.seed) {
            tracing::warn!(
                ?saved_seed,
                seed = self.config.seed,
                "resuming with another seed: the run will not repeat an uninterrupted one"
            );
        }
        self.step = state.step;
        Ok(state.meta["data"].clone())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::lora::io::read_adapter_config;
    use crate::models::SanaTransformer2DModel;
    use crate::testing::{load_named, parity_case};
    use crate::training::lr_schedule::DecayType;
    use serde_json::Value;
    use std::path::Path;

    /// The tiny model and batch of a `scripts/parity/nft_step.py` case, with its
    /// trainer config.
    fn setup(dir: &Path) -> (SanaTransformer2DModel, NftBatch, NftTrainerConfig, Value) {
        let case: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let c = &case["config"];
        let mut model =
            SanaTransformer2DModel::from_pretrained(&dir.join("model"), Device::Cpu, Kind::Float)
                .unwrap();
        let (_, lora) = read_adapter_config(&dir.join("adapter")).unwrap();
        model
            .lora
            .load_adapter(TRAINED_ADAPTER, &dir.join("adapter"))
            .unwrap();
        model.lora.add_adapter(OLD_ADAPTER, &lora).unwrap();
        let b = load_named(&dir.join("batch.safetensors"));
        let batch = NftBatch {
            latents_clean: b["latents_clean"].shallow_clone(),
            timesteps: b["timesteps"].shallow_clone(),
            prompt_embeds: b["prompt_embeds"].shallow_clone(),
            prompt_attention_mask: b["prompt_attention_mask"].shallow_clone(),
            advantages: b["advantages"].shallow_clone(),
        };
        let f = |k: &str| c[k].as_f64().unwrap();
        let opt_usize = |k: &str| c[k].as_u64().map(|v| v as usize);
        let cfg = NftTrainerConfig {
            loss: NftLossConfig {
                beta: f("nft_beta"),
                kl_beta: f("kl_beta"),
                adv_low: f("adv_low"),
                adv_high: f("adv_high"),
            },
            mu_iterations: opt_usize("mu_iterations").unwrap(),
            batch_size_per_optimize: opt_usize("batch_size_per_optimize"),
            mini_batch: opt_usize("mini_batch"),
            num_train_timesteps: opt_usize("num_train_timesteps").unwrap(),
            grad_norm_clip: f("clip"),
            weight_copy_decay_type: c["decay_type"].as_u64().unwrap() as u8,
            ema: c["ema"]
                .as_array()
                .map(|e| (e[0].as_f64().unwrap(), e[1].as_u64().unwrap())),
            optimizer: AdamWConfig {
                lr: f("lr"),
                betas: (
                    c["betas"][0].as_f64().unwrap(),
                    c["betas"][1].as_f64().unwrap(),
                ),
                eps: f("eps"),
                weight_decay: f("weight_decay"),
            },
            schedule: LrSchedule::new(1000, 0.0, false, None, DecayType::None, 0.0, 0.0),
            seed: c["seed"].as_u64().unwrap(),
        };
        (model, batch, cfg, case)
    }

    fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
        let d = (got - want).abs().max().double_value(&[]);
        d / want.abs().max().double_value(&[]).max(1e-30)
    }

    fn check_metrics(got: &NftStepMetrics, want: &Value) {
        let g = serde_json::to_value(got).unwrap();
        for key in [
            "loss",
            "policy_loss",
            "unweighted_policy_loss",
            "kl_loss",
            "old_kl",
            "old_deviation",
            "old_deviation_max",
            "x0_norm",
            "x0_norm_max",
            "grad_norm",
            "old_decay",
        ] {
            let (a, b) = (g[key].as_f64().unwrap(), want[key].as_f64().unwrap());
            // fp32 means of O(1) velocity terms: 1e-6 absolute (a few ulps of the
            // operands) for the metrics that are zero at the first step, where
            // "old" equals "default" (old_deviation, old_kl).
            crate::testing::assert_close(&format!("step {} {key}", got.step), a, b, 1e-4, 1e-6);
        }
    }

    /// One optimizer step: the metrics, and the LoRA gradients (read from AdamW's
    /// first moment, `exp_avg = (1 - β1) · clip_coef · grad`) equal the reference's.
    #[test]
    fn parity_nft_step_gradients() {
        let dir = parity_case("nft_step_grad");
        let (mut model, batch, cfg, case) = setup(&dir);
        let mut trainer = NftTrainer::new(&mut model, cfg.clone()).unwrap();
        let m = trainer.train_step(&model, &batch).unwrap();
        check_metrics(&m, &case["metrics"][0]);
        assert_eq!(m.optimizer_steps, 1);
        let grads = load_named(&dir.join("grads.safetensors"));
        let coef = (cfg.grad_norm_clip / (m.grad_norm + 1e-6)).min(1.0);
        let names = model.lora.adapter_parameters(TRAINED_ADAPTER).unwrap();
        assert_eq!(names.len(), grads.len());
        let mut worst = 0.0f64;
        for ((name, _), m1) in names.iter().zip(&trainer.params.optimizer.exp_avg) {
            let g = m1 / ((1.0 - cfg.optimizer.betas.0) * coef);
            worst = worst.max(rel_err(&g, &grads[name]));
        }
        eprintln!(
            "LoRA gradients: worst relative error {worst:.2e} over {} tensors",
            names.len()
        );
        assert!(worst <= 1e-4);
    }

    /// Three steps with two passes and two optimize batches each: metrics, the trained
    /// and "old" adapters, AdamW's moments and the EMA after every step.
    #[test]
    fn parity_nft_steps_weights_optimizer_ema() {
        let dir = parity_case("nft_step_steps");
        let (mut model, batch, cfg, case) = setup(&dir);
        let mut trainer = NftTrainer::new(&mut model, cfg).unwrap();
        let steps = case["metrics"].as_array().unwrap().len();
        for k in 1..=steps {
            let m = trainer.train_step(&model, &batch).unwrap();
            check_metrics(&m, &case["metrics"][k - 1]);
            assert_eq!(m.optimizer_steps, 4);
            let want = load_named(&dir.join(format!("step{k}.safetensors")));
            let mut worst = [0.0f64; 5];
            let default = model.lora.adapter_parameters(TRAINED_ADAPTER).unwrap();
            let old = model.lora.adapter_parameters(OLD_ADAPTER).unwrap();
            let ema = &trainer.params.ema.as_ref().unwrap().shadow;
            for (i, (name, p)) in default.iter().enumerate() {
                let old_name = name.replace(".default.", ".old.");
                assert_eq!(old[i].0, old_name);
                let pairs = [
                    (p, format!("default.{name}")),
                    (&old[i].1, format!("old.{old_name}")),
                    (
                        &trainer.params.optimizer.exp_avg[i],
                        format!("exp_avg.{name}"),
                    ),
                    (
                        &trainer.params.optimizer.exp_avg_sq[i],
                        format!("exp_avg_sq.{name}"),
                    ),
                    (&ema[i], format!("ema.{name}")),
                ];
                for (w, (t, key)) in worst.iter_mut().zip(pairs) {
                    *w = w.max(rel_err(t, &want[&key]));
                }
            }
            eprintln!("step {k}: worst rel err default/old/exp_avg/exp_avg_sq/ema {worst:?}");
            assert!(worst.iter().all(|&e| e <= 1e-4), "step {k}: {worst:?}");
        }
    }

    /// A small config for tests without references.
    pub(crate) fn test_config() -> NftTrainerConfig {
        NftTrainerConfig {
            loss: NftLossConfig {
                beta: 1.0,
                kl_beta: 1e-4,
                adv_low: -5.0,
                adv_high: 5.0,
            },
            mu_iterations: 1,
            batch_size_per_optimize: Some(4),
            mini_batch: Some(2),
            num_train_timesteps: 2,
            grad_norm_clip: 1.0,
            weight_copy_decay_type: 1,
            ema: Some((0.9, 1)),
            optimizer: AdamWConfig {
                lr: 1e-3,
                ..Default::default()
            },
            schedule: LrSchedule::new(100, 2.0, false, None, DecayType::Cosine, 0.1, 0.5),
            seed: 3,
        }
    }

    #[test]
    fn refuses_missing_adapters_and_bad_batches() {
        let (mut model, batch) = crate::testing::tiny_nft_model_and_batch(1);
        model.lora.delete_adapter(OLD_ADAPTER).unwrap();
        let err = NftTrainer::new(&mut model, test_config())
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"old\" is missing"), "{err}");

        let (mut model, mut batch2) = crate::testing::tiny_nft_model_and_batch(1);
        let mut trainer = NftTrainer::new(&mut model, test_config()).unwrap();
        batch2.advantages = Tensor::zeros([5], (Kind::Float, Device::Cpu));
        let err = trainer.train_step(&model, &batch2).unwrap_err().to_string();
        assert!(
            err.contains("advantages") && err.contains("batch 6"),
            "{err}"
        );
        let _ = batch;
        assert_eq!(trainer.step, 0, "a refused batch is not a step");
    }

    /// The training forwards see the batch's timesteps times the model's
    /// `timestep_scale`, as the sampling loop feeds them (SANA-Sprint's 1000
    /// would otherwise train on timesteps it never samples with).
    #[test]
    fn training_forwards_see_the_scaled_timestep() {
        let (model, batch) = crate::testing::tiny_nft_model_and_batch(4);
        let mut spy = crate::testing::TimestepSpy::new(model, 0.25);
        let mut trainer = NftTrainer::new(&mut spy, test_config()).unwrap();
        trainer.train_step(&spy, &batch).unwrap();
        let seen = spy.seen_values();
        assert!(!seen.is_empty());
        let sampled: Vec<f64> =
            Vec::try_from(batch.timesteps.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        for t in seen {
            assert!(
                sampled.iter().any(|s| (s * 0.25 - t).abs() < 1e-4),
                "the model saw timestep {t}, not one of {sampled:?} × 0.25"
            );
        }
    }

    /// Training moves only "default" (and "old" through the decay), never the base.
    #[test]
    fn a_step_trains_default_only() {
        let (mut model, batch) = crate::testing::tiny_nft_model_and_batch(2);
        let sorted = |m: &SanaTransformer2DModel| -> Vec<(String, Tensor)> {
            let vars: std::collections::BTreeMap<_, _> = m.vs.variables().into_iter().collect();
            vars.into_iter().collect()
        };
        let base: Vec<Tensor> = sorted(&model).iter().map(|(_, t)| t.copy()).collect();
        let mut trainer = NftTrainer::new(&mut model, test_config()).unwrap();
        let before = model.lora.state_dict(TRAINED_ADAPTER).unwrap();
        let before: Vec<Tensor> = before.iter().map(|(_, t)| t.copy()).collect();
        let m = trainer.train_step(&model, &batch).unwrap();
        assert_eq!((m.step, m.optimizer_steps), (1, 2));
        assert!(m.loss.is_finite() && m.grad_norm > 0.0);
        assert_eq!(
            m.learning_rate,
            1e-3 * 0.5,
            "warm-up starts at its start factor"
        );
        let after = model.lora.state_dict(TRAINED_ADAPTER).unwrap();
        assert!(before.iter().zip(&after).any(|(b, (_, a))| b != a));
        for (b, (name, a)) in base.iter().zip(sorted(&model)) {
            assert_eq!(b, &a, "the base model must not move: {name}");
        }
        // old = 0.001·old + 0.999·default after step 1 (old started as a copy).
        let old = model.lora.state_dict(OLD_ADAPTER).unwrap();
        let (_, a0) = &after[0];
        let want = &before[0] * 0.001 + a0 * 0.999;
        assert!(crate::testing::max_abs_diff(&old[0].1, &want) < 1e-7);
    }

    /// Every tensor a step changes, in a fixed order.
    fn snapshot(model: &SanaTransformer2DModel, t: &NftTrainer) -> Vec<(String, Tensor)> {
        let state = t.state(model, serde_json::Value::Null).unwrap();
        state
            .tensors
            .into_iter()
            .map(|(n, x)| (n, x.copy()))
            .collect()
    }

    /// The determinism check: 6 steps equal 3 steps, a checkpoint (async
    /// save), a fresh process-like restart from it, and 3 more, bit for bit.
    #[test]
    fn six_steps_equal_three_then_resume_then_three_bit_for_bit() {
        use crate::training::checkpoint::{CheckpointManager, SaveMode};
        let (mut model, batch) = crate::testing::tiny_nft_model_and_batch(5);
        let mut trainer = NftTrainer::new(&mut model, test_config()).unwrap();
        let mut want_metrics = Vec::new();
        for _ in 0..6 {
            want_metrics.push(trainer.train_step(&model, &batch).unwrap());
        }
        let want = snapshot(&model, &trainer);

        let dir = tempfile::tempdir().unwrap();
        {
            let (mut model, batch) = crate::testing::tiny_nft_model_and_batch(5);
            let mut trainer = NftTrainer::new(&mut model, test_config()).unwrap();
            for _ in 0..3 {
                trainer.train_step(&model, &batch).unwrap();
            }
            let mut ckpt = CheckpointManager::new(dir.path(), SaveMode::Async, 2);
            let data = serde_json::json!({"epoch": 0, "index": 3});
            ckpt.save(&trainer.state(&model, data).unwrap()).unwrap();
            // Training goes on while the writer runs; this step must not leak into the file.
            trainer.train_step(&model, &batch).unwrap();
            ckpt.wait().unwrap();
        }
        let (mut model, batch) = crate::testing::tiny_nft_model_and_batch(5);
        let mut trainer = NftTrainer::new(&mut model, test_config()).unwrap();
        let resumed = CheckpointManager::new(dir.path(), SaveMode::Sync, 2)
            .load_latest()
            .unwrap()
            .unwrap();
        assert!(resumed.path.ends_with("step_3"));
        let data = trainer
            .restore(&model, resumed.state, &resumed.path)
            .unwrap();
        assert_eq!(data["index"], 3);
        assert_eq!(trainer.step, 3);
        for want_m in &want_metrics[3..] {
            let m = trainer.train_step(&model, &batch).unwrap();
            assert_eq!(&m, want_m, "metrics of step {}", m.step);
        }
        let got = snapshot(&model, &trainer);
        assert_eq!(got.len(), want.len());
        for ((gn, g), (wn, w)) in got.iter().zip(&want) {
            assert_eq!(gn, wn);
            assert!(g.equal(w), "{gn} differs after resume");
        }
    }

    #[test]
    fn restore_refuses_a_checkpoint_of_another_lora_config() {
        let (mut model, batch) = crate::testing::tiny_nft_model_and_batch(5);
        let mut trainer = NftTrainer::new(&mut model, test_config()).unwrap();
        trainer.train_step(&model, &batch).unwrap();
        let mut state = trainer.state(&model, serde_json::Value::Null).unwrap();
        let (name, t) = state.tensors.remove(0);
        state.tensors.push((name.clone(), t.narrow(0, 0, 2)));
        let err = trainer
            .restore(&model, state, Path::new("ckpt/step_1"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ckpt/step_1") && err.contains(&name) && err.contains("shape"),
            "{err}"
        );
    }

    #[test]
    fn the_export_holds_the_ema_weights_and_training_is_untouched() {
        let (mut model, batch) = crate::testing::tiny_nft_model_and_batch(8);
        let mut trainer = NftTrainer::new(&mut model, test_config()).unwrap();
        for _ in 0..2 {
            trainer.train_step(&model, &batch).unwrap();
        }
        let before = snapshot(&model, &trainer);
        let dir = tempfile::tempdir().unwrap();
        trainer.export_adapter(&model, dir.path()).unwrap();
        for ((n, a), (_, b)) in snapshot(&model, &trainer).iter().zip(&before) {
            assert!(a.equal(b), "{n} changed by the export");
        }
        let mut again = crate::testing::tiny_nft_model_and_batch(8).0;
        again.lora.load_adapter("exported", dir.path()).unwrap();
        let exported = again.lora.adapter_parameters("exported").unwrap();
        let ema = &trainer.params.ema.as_ref().unwrap().shadow;
        assert_eq!(exported.len(), ema.len());
        for ((n, e), s) in exported.iter().zip(ema) {
            assert!(e.equal(s), "{n}: the export is not the EMA");
        }
        assert!(
            !ema[1].equal(&trainer.params.params()[1]),
            "EMA must differ from the live weights here"
        );
    }
}
