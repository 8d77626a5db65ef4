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
use super::lr_schedule::LrSchedule;
use super::optim::AdamWConfig;
use super::parallel::DataParallel;
use super::sft::{sft_inputs, sft_loss, SftTimesteps, WeightingScheme};
use super::trainable::{TrainTarget, TrainedParams};
use crate::models::modeling_utils::SaveOptions;
use crate::models::transformers::sana_transformer::{SanaTransformer2DModel, TransformerInputs};
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
}

impl SftTrainer {
    pub fn new(
        model: &mut SanaTransformer2DModel,
        config: SftTrainerConfig,
        timesteps: SftTimesteps,
    ) -> Result<Self> {
        if let TrainTarget::Lora(name) = &config.target {
            if !model.lora.has_adapter(name) {
                return Err(SanaError::Lora(format!(
                    "LoRA SFT trains adapter \"{name}\", which the model does not have"
                )));
            }
            model.lora.set_active(name.as_str())?;
        }
        let named = config.target.parameters(model)?;
        Ok(Self {
            params: TrainedParams::new(named, config.optimizer, config.ema),
            timesteps,
            step: 0,
            dp: DataParallel::single(),
            config,
        })
    }

    pub fn learning_rate(&self) -> f64 {
        self.config.optimizer.lr * self.config.schedule.factor(self.step)
    }

    pub fn train_step(
        &mut self,
        model: &SanaTransformer2DModel,
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
        model.lora.set_training(true);
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
                continue;
            }
            let at = start + from;
            let x0 = batch.latents.narrow(0, at, len);
            let timestep = timestep.narrow(0, from, len).to_device(x0.device());
            let sigmas = sigmas.narrow(0, from, len);
            let (xt, target) = sft_inputs(&x0, &sigmas, &noise.narrow(0, from, len));
            let v = model.forward(&TransformerInputs {
                hidden_states: &xt.to_kind(model.kind()),
                encoder_hidden_states: &batch.prompt_embeds.narrow(0, at, len),
                timestep: &timestep,
                guidance: None,
                encoder_attention_mask: Some(&batch.prompt_attention_mask.narrow(0, at, len)),
            })?;
            let per_sample = sft_loss(&v.to_kind(Kind::Float), &target.to_kind(Kind::Float));
            // The mini batch's mean, summed over the ranks' slices.
            (per_sample.sum(None) / n as f64).backward();
            loss_sum[0] += per_sample.sum(None).double_value(&[]);
        }
        self.dp
            .all_reduce_values(&mut loss_sum, c10d::ReduceOp::Sum)?;
        self.dp.all_reduce_grads(self.params.params())?;
        let count = b;
        let loss_sum = loss_sum[0];
        let grad_norm = self.params.step(lr, self.config.grad_norm_clip, self.step);
        self.step = current;
        Ok(SftStepMetrics {
            step: current,
            loss: loss_sum / count as f64,
            grad_norm,
            learning_rate: lr,
        })
    }

    /// The trained weights, moments, EMA, step and seed, plus `data`.
    pub fn state(&self, data: serde_json::Value) -> TrainingState {
        let mut tensors = Vec::new();
        self.params.push_state(&mut tensors);
        TrainingState {
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
        }
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
        self.params
            .restore_state(&mut tensors, optimizer_step, source)?;
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
        model: &SanaTransformer2DModel,
        dir: &Path,
        full: &SaveOptions,
    ) -> Result<()> {
        self.params.with_ema_weights(|| match &self.config.target {
            TrainTarget::Lora(name) => model.lora.export(name, dir),
            TrainTarget::Full => model.save_pretrained_with(dir, full),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn check_case(case_name: &str) {
        let Some(dir) = parity_case(case_name) else {
            return;
        };
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
            let mut state = trainer.state(Value::Null).tensors;
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
