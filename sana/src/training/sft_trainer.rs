//! One SFT (flow-matching) step as Cosmos-RL's `SFTTrainer.step_training` runs
//! it on SANA: for each mini batch, timesteps from the weighting scheme, noise,
//! one forward, `mean_flat((ε − x0 − v)²).mean().backward()` (mini-batch losses
//! summed, not averaged, as Cosmos-RL accumulates them); then clip, AdamW, and
//! the EMA step with the 0-based step. Full weights or one LoRA adapter.
//!
//! Randomness as in the NFT trainer: libtorch's CPU generator is re-seeded
//! with `seed + step` (1-based) at the start of each step.

use std::collections::HashMap;
use std::path::Path;

use tch::{Kind, Tensor};

use super::checkpoint::TrainingState;
use super::fsdp::{Fsdp, Work};
use super::lr_schedule::LrSchedule;
use super::optim::AdamWConfig;
use super::parallel::DataParallel;
use super::sft::{sft_inputs, sft_loss, SftTimesteps, WeightingScheme};
use super::trainable::{TrainTarget, TrainedParams};
use crate::models::modeling_utils::SaveOptions;
use crate::models::transformers::{DiffusionTransformer, TransformerInputs};
use crate::pipelines::denoise::model_timestep;
use crate::{Result, SanaError};

#[derive(Debug, Clone, PartialEq)]
pub struct SftTrainerConfig {
    pub target: TrainTarget,
    /// `train_policy.mini_batch` (None: the whole batch at once).
    pub mini_batch: Option<usize>,
    pub weighting: WeightingScheme,
    pub grad_norm_clip: f64,
    pub ema: Option<(f64, u64)>,
    pub optimizer: AdamWConfig,
    pub schedule: LrSchedule,
    pub seed: u64,
}

/// Encoded training samples: latents (VAE-encoded, scaled) and captions.
#[derive(Debug)]
pub struct SftBatch {
    pub latents: Tensor,
    pub prompt_embeds: Tensor,
    pub prompt_attention_mask: Tensor,
}

impl SftBatch {
    pub fn len(&self) -> i64 {
        self.latents.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SftStepMetrics {
    pub step: u64,
    /// Mean flow-matching loss over the step's samples.
    pub loss: f64,
    pub grad_norm: f64,
    pub learning_rate: f64,
}

#[derive(Debug)]
pub struct SftTrainer {
    pub config: SftTrainerConfig,
    pub timesteps: SftTimesteps,
    pub params: TrainedParams,
    /// Completed steps.
    pub step: u64,
    /// The other ranks training the same weights (alone by default): each takes
    /// its slice of every global mini batch (`mini_batch × world`), as NFT does.
    pub dp: DataParallel,
    /// Full weights sharded over the ranks (FSDP): `params` then holds this
    /// rank's master shard of each unit instead of the model's weights.
    pub fsdp: Option<Fsdp>,
}

impl SftTrainer {
    pub fn new(
        model: &mut dyn DiffusionTransformer,
        config: SftTrainerConfig,
        timesteps: SftTimesteps,
    ) -> Result<Self> {
        if let TrainTarget::Lora(name) = &config.target {
            if !model.lora().has_adapter(name) {
                return Err(SanaError::Lora(format!(
                    "LoRA SFT trains adapter \"{name}\", which the model does not have"
                )));
            }
            model.lora().set_active(name.as_str())?;
        }
        let named = config.target.parameters(model)?;
        Ok(Self {
            params: TrainedParams::new(named, config.optimizer, config.ema),
            timesteps,
            step: 0,
            dp: DataParallel::single(),
            fsdp: None,
            config,
        })
    }

    /// Full-weight SFT with the weights, gradients, AdamW moments and EMA
    /// sharded over `dp`'s ranks (`fsdp.rs`); the model's own weight tensors
    /// are emptied and filled only while a unit runs. `compute_kind` is
    /// `train.param_dtype`; the master shards keep the weights' dtype.
    pub fn new_fsdp(
        model: &mut dyn DiffusionTransformer,
        config: SftTrainerConfig,
        timesteps: SftTimesteps,
        dp: DataParallel,
        compute_kind: Kind,
        reshard_after_forward: bool,
    ) -> Result<Self> {
        if config.target != TrainTarget::Full {
            return Err(SanaError::input(
                "policy.parallelism",
                "FSDP shards full-weight training; a LoRA trains with plain data parallelism \
                 (dp_replicate_size)",
            ));
        }
        let named = config.target.parameters(model)?;
        let (fsdp, shards) = Fsdp::shard(model, named, &dp, compute_kind, reshard_after_forward)?;
        let (full, shard) = fsdp.numel();
        // Master weights + gradients + two AdamW moments (+ EMA), in the master dtype.
        let copies = 4 + i64::from(config.ema.is_some());
        let mb = |n: i64| (n * copies * fsdp.master_kind.elt_size_in_bytes() as i64) as f64 / 1e6;
        tracing::info!(
            rank = dp.rank(),
            world = dp.world_size(),
            "FSDP: this rank holds {:.1} MB of weights, gradients and optimizer state \
             ({shard} of {full} elements per copy; unsharded {:.1} MB)",
            mb(shard),
            mb(full)
        );
        Ok(Self {
            params: TrainedParams::new(shards, config.optimizer, config.ema),
            timesteps,
            step: 0,
            dp,
            fsdp: Some(fsdp),
            config,
        })
    }

    pub fn learning_rate(&self) -> f64 {
        self.config.optimizer.lr * self.config.schedule.factor(self.step)
    }

    pub fn train_step(
        &mut self,
        model: &dyn DiffusionTransformer,
        batch: &SftBatch,
    ) -> Result<SftStepMetrics> {
        let b = batch.len();
        if b == 0 {
            return Err(SanaError::input("latents", "empty batch"));
        }
        for (name, t) in [
            ("prompt_embeds", &batch.prompt_embeds),
            ("prompt_attention_mask", &batch.prompt_attention_mask),
        ] {
            if t.size()[0] != b {
                return Err(SanaError::input(
                    name,
                    format!("batch {} but latents have {b}", t.size()[0]),
                ));
            }
        }
        let current = self.step + 1;
        let span = tracing::info_span!("sft_step", step = current);
        let _enter = span.enter();
        tch::manual_seed(self.config.seed.wrapping_add(current) as i64);
        let lr = self.learning_rate();
        // `mini_batch` is per rank; the whole batch is on every rank.
        let mini = match self.config.mini_batch {
            Some(n) if n > 0 => (n as i64 * self.dp.world_size() as i64).min(b),
            _ => b,
        };
        model.lora().set_training(true);
        let mut loss_sum = [0.0];
        for start in (0..b).step_by(mini as usize) {
            let n = mini.min(b - start);
            // Timesteps and noise for the whole mini batch, so every rank's
            // generator stays in step with one process's.
            let u = self.config.weighting.sample(n);
            let (timestep, sigmas) = self.timesteps.sample(&u);
            let noise = batch.latents.narrow(0, start, n).randn_like();
            let (from, len) = self.dp.slice(n);
            if len == 0 {
                if let Some(fsdp) = &self.fsdp {
                    // No samples here, but every rank takes part in the collectives.
                    let reduce = self.dp.reduce_kind();
                    fsdp.forward_backward(model, self.params.params(), &self.dp, reduce, None)?;
                }
                continue;
            }
            let at = start + from;
            let x0 = batch.latents.narrow(0, at, len);
            let timestep = timestep.narrow(0, from, len).to_device(x0.device());
            let sigmas = sigmas.narrow(0, from, len);
            let (xt, target) = sft_inputs(&x0, &sigmas, &noise.narrow(0, from, len));
            let xt = xt.to_kind(model.kind());
            let mask = batch.prompt_attention_mask.narrow(0, at, len);
            let embeds = batch.prompt_embeds.narrow(0, at, len);
            // The model sees the timestep scaled as in sampling (SANA-Sprint's timestep_scale).
            let model_t = model_timestep(model, &timestep);
            let inputs = TransformerInputs {
                hidden_states: &xt,
                encoder_hidden_states: &embeds,
                timestep: &model_t,
                guidance: None,
                encoder_attention_mask: Some(&mask),
            };
            // The mini batch's mean, summed over the ranks' slices.
            let mut loss_of = |v: &Tensor| {
                let per_sample = sft_loss(&v.to_kind(Kind::Float), &target.to_kind(Kind::Float));
                loss_sum[0] += per_sample.sum(None).double_value(&[]);
                per_sample.sum(None) / n as f64
            };
            match &self.fsdp {
                Some(fsdp) => {
                    let reduce = self.dp.reduce_kind();
                    let work: Option<Work<'_, '_>> = Some((&inputs, &mut loss_of));
                    fsdp.forward_backward(model, self.params.params(), &self.dp, reduce, work)?;
                }
                None => loss_of(&model.forward(&inputs)?).backward(),
            }
        }
        self.dp
            .all_reduce_values(&mut loss_sum, c10d::ReduceOp::Sum)?;
        let count = b;
        let loss_sum = loss_sum[0];
        let grad_norm = if self.fsdp.is_some() {
            let clip = self.config.grad_norm_clip;
            self.params.step_sharded(lr, clip, self.step, &self.dp)?
        } else {
            self.dp.all_reduce_grads(self.params.params())?;
            self.params.step(lr, self.config.grad_norm_clip, self.step)
        };
        self.step = current;
        Ok(SftStepMetrics {
            step: current,
            loss: loss_sum / count as f64,
            grad_norm,
            learning_rate: lr,
        })
    }

    /// The trained weights, moments, EMA, step and seed, plus `data`.
    /// With FSDP every rank must call this (the shards are gathered); the
    /// tensors are the whole model's either way, so a checkpoint resumes on any
    /// number of ranks.
    pub fn state(&self, data: serde_json::Value) -> Result<TrainingState> {
        let mut tensors = Vec::new();
        match &self.fsdp {
            None => self.params.push_state(&mut tensors),
            Some(fsdp) => {
                let opt = &self.params.optimizer;
                let mut lists = vec![
                    ("trained", opt.params.as_slice()),
                    ("exp_avg", opt.exp_avg.as_slice()),
                    ("exp_avg_sq", opt.exp_avg_sq.as_slice()),
                ];
                if let Some(ema) = &self.params.ema {
                    lists.push(("ema", ema.shadow.as_slice()));
                }
                for (prefix, shards) in lists {
                    for (name, t) in fsdp.full_named(shards, &self.dp)? {
                        tensors.push((format!("{prefix}/{name}"), t));
                    }
                }
            }
        }
        Ok(TrainingState {
            step: self.step,
            meta: serde_json::json!({
                "trainer": "sft",
                "target": match &self.config.target {
                    TrainTarget::Full => "full".to_string(),
                    TrainTarget::Lora(n) => format!("lora:{n}"),
                },
                "optimizer_step": self.params.optimizer.step,
                "seed": self.config.seed,
                "data": data,
            }),
            tensors,
        })
    }

    pub fn restore(&mut self, state: TrainingState, source: &Path) -> Result<serde_json::Value> {
        let bad = |msg: String| SanaError::Checkpoint {
            path: source.to_path_buf(),
            msg,
        };
        if state.meta["trainer"] != "sft" {
            return Err(bad(format!(
                "saved by trainer {}, not sft",
                state.meta["trainer"]
            )));
        }
        let optimizer_step = state.meta["optimizer_step"]
            .as_u64()
            .ok_or_else(|| bad("trainer.json has no optimizer_step".into()))?;
        let mut tensors: HashMap<String, Tensor> = state.tensors.into_iter().collect();
        match &self.fsdp {
            None => self
                .params
                .restore_state(&mut tensors, optimizer_step, source)?,
            Some(fsdp) => {
                // This rank's shards of the whole-model tensors (any world size).
                let take = |tensors: &mut HashMap<String, Tensor>, prefix: &str| {
                    let named: HashMap<String, Tensor> = fsdp
                        .units
                        .iter()
                        .flat_map(|u| u.names.iter())
                        .filter_map(|n| {
                            tensors
                                .remove(&format!("{prefix}/{n}"))
                                .map(|t| (n.clone(), t))
                        })
                        .collect();
                    fsdp.shards_of(&named, source)
                };
                let trained = take(&mut tensors, "trained")?;
                let m = take(&mut tensors, "exp_avg")?;
                let v = take(&mut tensors, "exp_avg_sq")?;
                let has_ema = tensors.keys().any(|k| k.starts_with("ema/"));
                let ema = if has_ema {
                    Some(take(&mut tensors, "ema")?)
                } else {
                    None
                };
                let opt = &mut self.params.optimizer;
                tch::no_grad(|| {
                    for (i, t) in trained.iter().enumerate() {
                        opt.params[i].shallow_clone().copy_(t);
                        opt.exp_avg[i].shallow_clone().copy_(&m[i]);
                        opt.exp_avg_sq[i].shallow_clone().copy_(&v[i]);
                    }
                    if let Some(shadow) = self.params.ema.as_mut().map(|e| &mut e.shadow) {
                        for (i, s) in shadow.iter().enumerate() {
                            let from = ema.as_ref().map_or(&trained[i], |e| &e[i]);
                            s.shallow_clone().copy_(from);
                        }
                    }
                });
                opt.step = optimizer_step;
            }
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(bad(format!(
                "tensor `{extra}` fits no trained parameter (full vs LoRA, or another model?)"
            )));
        }
        self.step = state.step;
        Ok(state.meta["data"].clone())
    }

    /// The user-facing result (EMA weights when EMA is on): the adapter as PEFT +
    /// diffusers files, or the full transformer as a diffusers folder.
    pub fn export(
        &self,
        model: &dyn DiffusionTransformer,
        dir: &Path,
        full: &SaveOptions,
    ) -> Result<()> {
        if let Some(fsdp) = &self.fsdp {
            // Gathered on every rank (a collective), written by rank 0.
            let shards = match &self.params.ema {
                Some(ema) => &ema.shadow,
                None => &self.params.optimizer.params,
            };
            let rank0 = self.dp.rank() == 0;
            return fsdp.with_full_model(shards, &self.dp, || {
                if rank0 {
                    model.save_pretrained_with(dir, full)
                } else {
                    Ok(())
                }
            })?;
        }
        self.params.with_ema_weights(|| match &self.config.target {
            TrainTarget::Lora(name) => model.lora().export(name, dir),
            TrainTarget::Full => model.save_pretrained_with(dir, full),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::SanaTransformer2DModel;
    use crate::schedulers::DPMSolverMultistepConfig;
    use crate::testing::{load_named, parity_case};
    use crate::training::lr_schedule::DecayType;
    use serde_json::Value;
    use tch::Device;

    fn setup(dir: &Path) -> (SanaTransformer2DModel, SftBatch, SftTrainer, Value) {
        let case: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let c = &case["config"];
        let f = |k: &str| c[k].as_f64().unwrap();
        let mut model =
            SanaTransformer2DModel::from_pretrained(&dir.join("model"), Device::Cpu, Kind::Float)
                .unwrap();
        let lora = c["lora"].as_bool().unwrap();
        if lora {
            model
                .lora
                .load_adapter("default", &dir.join("adapter"))
                .unwrap();
        }
        let b = load_named(&dir.join("batch.safetensors"));
        let batch = SftBatch {
            latents: b["latents"].shallow_clone(),
            prompt_embeds: b["prompt_embeds"].shallow_clone(),
            prompt_attention_mask: b["prompt_attention_mask"].shallow_clone(),
        };
        let cfg = SftTrainerConfig {
            target: if lora {
                TrainTarget::Lora("default".into())
            } else {
                TrainTarget::Full
            },
            mini_batch: c["mini_batch"].as_u64().map(|v| v as usize),
            weighting: WeightingScheme::parse(
                c["weighting_scheme"].as_str().unwrap(),
                f("logit_mean"),
                f("logit_std"),
                1.29,
            )
            .unwrap(),
            grad_norm_clip: f("clip"),
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
        let timesteps =
            SftTimesteps::new(&DPMSolverMultistepConfig::sana(), f("train_flow_shift")).unwrap();
        let trainer = SftTrainer::new(&mut model, cfg, timesteps).unwrap();
        (model, batch, trainer, case)
    }

    /// The SFT forwards see the sampled timesteps (0..1000) times the model's
    /// `timestep_scale`, as the sampling loop feeds them: the same seeded step
    /// with scale 1e-3 shows the model 1e-3 × what it shows with scale 1.
    #[test]
    fn training_forwards_see_the_scaled_timestep() {
        let seen_with = |scale: f64| {
            let mut spy =
                crate::testing::TimestepSpy::new(crate::testing::tiny_transformer(3), scale);
            tch::manual_seed(1);
            let f = (Kind::Float, Device::Cpu);
            let batch = SftBatch {
                latents: Tensor::randn([4, 4, 4, 4], f),
                prompt_embeds: Tensor::randn([4, 5, 6], f),
                prompt_attention_mask: Tensor::ones([4, 5], (Kind::Int64, Device::Cpu)),
            };
            let cfg = SftTrainerConfig {
                target: TrainTarget::Full,
                mini_batch: Some(2),
                weighting: WeightingScheme::parse("logit_normal", 0.0, 1.0, 1.29).unwrap(),
                grad_norm_clip: 1.0,
                ema: None,
                optimizer: AdamWConfig::default(),
                schedule: LrSchedule::new(1000, 0.0, false, None, DecayType::None, 0.0, 0.0),
                seed: 9,
            };
            let timesteps = SftTimesteps::new(&DPMSolverMultistepConfig::sana(), 3.0).unwrap();
            let mut trainer = SftTrainer::new(&mut spy, cfg, timesteps).unwrap();
            trainer.train_step(&spy, &batch).unwrap();
            spy.seen_values()
        };
        let (plain, scaled) = (seen_with(1.0), seen_with(1e-3));
        assert_eq!(plain.len(), 4);
        assert!(plain.iter().any(|&t| t > 1.0), "{plain:?}");
        for (p, s) in plain.iter().zip(&scaled) {
            assert!((p * 1e-3 - s).abs() < 1e-6, "{p} × 1e-3 vs {s}");
        }
    }

    fn check_case(case_name: &str) {
        let dir = parity_case(case_name);
        let (model, batch, mut trainer, case) = setup(&dir);
        for (k, want) in case["metrics"].as_array().unwrap().iter().enumerate() {
            let m = trainer.train_step(&model, &batch).unwrap();
            for (name, got) in [("loss", m.loss), ("grad_norm", m.grad_norm)] {
                let w = want[name].as_f64().unwrap();
                let e = (got - w).abs() / w.abs();
                eprintln!(
                    "{case_name} step {} {name}: ours {got:.9e} reference {w:.9e} rel {e:.1e}",
                    k + 1
                );
                assert!(e <= 1e-4, "{name}");
            }
            let want_t = load_named(&dir.join(format!("step{}.safetensors", k + 1)));
            let mut state = trainer.state(Value::Null).unwrap().tensors;
            if matches!(trainer.config.target, TrainTarget::Lora(_)) {
                // PEFT names the adapter inside the key, as our adapter_parameters do.
                assert!(state.iter().all(|(n, _)| n.contains(".default.")));
            }
            let mut worst = 0.0f64;
            for (name, t) in state.drain(..) {
                let key = name.replacen('/', ".", 1);
                let w = want_t
                    .get(&key)
                    .unwrap_or_else(|| panic!("reference lacks {key}"));
                let d = (&t - w).abs().max().double_value(&[]);
                let e = d / w.abs().max().double_value(&[]).max(1e-30);
                worst = worst.max(e);
            }
            eprintln!(
                "{case_name} step {}: worst rel err over weights/moments/EMA {worst:.1e}",
                k + 1
            );
            assert!(worst <= 1e-4, "{worst:e}");
        }
    }

    #[test]
    fn parity_sft_steps_lora() {
        check_case("sft_step_lora");
    }

    #[test]
    fn parity_sft_steps_full_weights() {
        check_case("sft_step_full");
    }
}
