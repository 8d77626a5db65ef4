//! The parameters a trainer updates (a LoRA adapter or the full transformer),
//! by name, with their AdamW state and EMA: one optimizer step, the checkpoint
//! tensors, and the EMA swap for exports. Shared by the NFT and SFT trainers.

use std::collections::HashMap;
use std::path::Path;

use tch::Tensor;

use super::checkpoint::take_tensor;
use super::ema::Ema;
use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::models::DiffusionTransformer;
use crate::Result;

/// What a run trains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrainTarget {
    /// Every transformer weight (`policy.lora` absent).
    Full,
    /// One LoRA adapter; the base weights stay frozen.
    Lora(String),
}

impl TrainTarget {
    /// Sets `requires_grad` for the target (and freezes the rest) and returns its
    /// parameters by name in a fixed order (sorted names for full weights, model
    /// order for an adapter).
    pub fn parameters(
        &self,
        model: &mut dyn DiffusionTransformer,
    ) -> Result<Vec<(String, Tensor)>> {
        match self {
            TrainTarget::Full => {
                model.var_store_mut().unfreeze();
                for name in model.lora().adapter_names() {
                    model.lora().set_trainable(&name, false)?;
                }
                let mut named: Vec<(String, Tensor)> =
                    model.var_store().variables().into_iter().collect();
                named.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(named)
            }
            TrainTarget::Lora(adapter) => {
                model.var_store_mut().freeze();
                for name in model.lora().adapter_names() {
                    model.lora().set_trainable(&name, &name == adapter)?;
                }
                model.lora().adapter_parameters(adapter)
            }
        }
    }
}

/// Trained tensors by name with their optimizer and EMA.
#[derive(Debug)]
pub struct TrainedParams {
    pub names: Vec<String>,
    pub optimizer: AdamW,
    pub ema: Option<Ema>,
}

impl TrainedParams {
    pub fn new(
        named: Vec<(String, Tensor)>,
        optimizer: AdamWConfig,
        ema: Option<(f64, u64)>,
    ) -> Self {
        let (names, params): (Vec<String>, Vec<Tensor>) = named.into_iter().unzip();
        let ema = ema.map(|(decay, every)| Ema::new(&params, decay, every));
        Self {
            names,
            optimizer: AdamW::new(params, optimizer),
            ema,
        }
    }

    pub fn params(&self) -> &[Tensor] {
        &self.optimizer.params
    }

    /// Clip, AdamW step at `lr`, zero grads, EMA step (with Cosmos-RL's step
    /// argument `ema_step`). Returns the grad norm before clipping.
    pub fn step(&mut self, lr: f64, grad_norm_clip: f64, ema_step: u64) -> f64 {
        let norm = clip_grad_norm(&self.optimizer.params, grad_norm_clip);
        self.optimizer.step(lr);
        self.optimizer.zero_grad();
        if let Some(ema) = &mut self.ema {
            ema.step(&self.optimizer.params, ema_step);
        }
        norm
    }

    /// As [`TrainedParams::step`] for tensors sharded over `dp`'s ranks (FSDP):
    /// the grad norm is the one of the whole, from every rank's squared norm.
    pub fn step_sharded(
        &mut self,
        lr: f64,
        grad_norm_clip: f64,
        ema_step: u64,
        dp: &super::parallel::DataParallel,
    ) -> Result<f64> {
        let grads: Vec<Tensor> = self
            .optimizer
            .params
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .collect();
        let mut sq = [tch::no_grad(|| {
            grads
                .iter()
                .map(|g| {
                    g.to_kind(tch::Kind::Double)
                        .square()
                        .sum(None)
                        .double_value(&[])
                })
                .sum::<f64>()
        })];
        dp.all_reduce_values(&mut sq, c10d::ReduceOp::Sum)?;
        let norm = sq[0].sqrt();
        if grad_norm_clip > 0.0 {
            let coef = (grad_norm_clip / (norm + 1e-6)).min(1.0);
            tch::no_grad(|| {
                for g in &grads {
                    let _ = g.shallow_clone().g_mul_scalar_(coef);
                }
            });
        }
        self.optimizer.step(lr);
        self.optimizer.zero_grad();
        if let Some(ema) = &mut self.ema {
            ema.step(&self.optimizer.params, ema_step);
        }
        Ok(norm)
    }

    /// `trained/…`, `exp_avg/…`, `exp_avg_sq/…` and `ema/…` tensors (shared storage).
    pub fn push_state(&self, tensors: &mut Vec<(String, Tensor)>) {
        for (i, name) in self.names.iter().enumerate() {
            tensors.push((
                format!("trained/{name}"),
                self.optimizer.params[i].shallow_clone(),
            ));
            tensors.push((
                format!("exp_avg/{name}"),
                self.optimizer.exp_avg[i].shallow_clone(),
            ));
            tensors.push((
                format!("exp_avg_sq/{name}"),
                self.optimizer.exp_avg_sq[i].shallow_clone(),
            ));
            if let Some(ema) = &self.ema {
                tensors.push((format!("ema/{name}"), ema.shadow[i].shallow_clone()));
            }
        }
    }

    /// Takes this object's tensors out of a loaded state and copies them in; an
    /// EMA missing from the checkpoint restarts from the weights (with a warning).
    pub fn restore_state(
        &mut self,
        tensors: &mut HashMap<String, Tensor>,
        optimizer_step: u64,
        source: &Path,
    ) -> Result<()> {
        let has_ema = tensors.keys().any(|k| k.starts_with("ema/"));
        tch::no_grad(|| -> Result<()> {
            for (i, name) in self.names.iter().enumerate() {
                let p = &self.optimizer.params[i];
                copy_in(tensors, &format!("trained/{name}"), p, source)?;
                copy_in(
                    tensors,
                    &format!("exp_avg/{name}"),
                    &self.optimizer.exp_avg[i],
                    source,
                )?;
                copy_in(
                    tensors,
                    &format!("exp_avg_sq/{name}"),
                    &self.optimizer.exp_avg_sq[i],
                    source,
                )?;
                match (&self.ema, has_ema) {
                    (Some(ema), true) => {
                        copy_in(tensors, &format!("ema/{name}"), &ema.shadow[i], source)?
                    }
                    (Some(ema), false) => ema.shadow[i].shallow_clone().copy_(p),
                    (None, _) => {
                        tensors.remove(&format!("ema/{name}"));
                    }
                }
            }
            Ok(())
        })?;
        if self.ema.is_some() && !has_ema {
            tracing::warn!(
                "the checkpoint has no EMA (ema_enable was off): EMA restarts from the weights"
            );
        }
        self.optimizer.step = optimizer_step;
        Ok(())
    }

    /// Runs `f` with the EMA weights in place of the trained ones (exports and
    /// validation use them, as Cosmos-RL's `copy_ema_to`), then puts them back.
    pub fn with_ema_weights<T>(&self, f: impl FnOnce() -> T) -> T {
        let Some(ema) = &self.ema else {
            return f();
        };
        let live: Vec<Tensor> = self.params().iter().map(|p| p.detach().copy()).collect();
        let swap = |from: &[Tensor]| {
            tch::no_grad(|| {
                for (p, v) in self.params().iter().zip(from) {
                    p.shallow_clone().copy_(v);
                }
            })
        };
        swap(&ema.shadow);
        let out = f();
        swap(&live);
        out
    }
}

/// Copies the state tensor `key` into `dst` (shape checked, moved to its device).
pub fn copy_in(
    tensors: &mut HashMap<String, Tensor>,
    key: &str,
    dst: &Tensor,
    source: &Path,
) -> Result<()> {
    let t = take_tensor(tensors, key, dst, source)?;
    tch::no_grad(|| dst.shallow_clone().copy_(&t.to_device(dst.device())));
    Ok(())
}
