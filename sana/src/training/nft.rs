//! The DiffusionNFT loss of one mini-batch at one timestep, as Cosmos-RL's
//! `NFTTrainer.step_training` computes it (nft-algorithm.md, step 3), with
//! every metric it reports. The caller runs the three transformer forwards
//! ("old" adapter and reference without grad, "default" with grad).

use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NftLossConfig {
    /// `policy.diffusers.nft_beta`.
    pub beta: f64,
    /// `train_policy.kl_beta` (Cosmos-RL requires > 0 for NFT).
    pub kl_beta: f64,
    /// `train_policy.advantage_low` / `advantage_high`: the advantage clip range.
    pub adv_low: f64,
    pub adv_high: f64,
}

/// The loss (with grad) and the detached metrics of one mini-batch × timestep.
#[derive(Debug)]
pub struct NftTerms {
    pub loss: Tensor,
    pub policy_loss: f64,
    pub unweighted_policy_loss: f64,
    pub kl_loss: f64,
    pub old_kl: f64,
    pub old_deviation: f64,
    pub old_deviation_max: f64,
    pub x0_norm: f64,
    pub x0_norm_max: f64,
}

/// `x_t = (1 - t) x0 + t eps` for `t` in [0, 1] of shape `[B]`.
pub fn noised(x0: &Tensor, t: &Tensor, eps: &Tensor) -> Tensor {
    let t = expand_like(t, x0);
    (-&t + 1.0) * x0 + &t * eps
}

fn expand_like(t: &Tensor, x: &Tensor) -> Tensor {
    let mut shape = vec![-1i64];
    shape.extend(std::iter::repeat_n(1, x.dim() - 1));
    t.view(shape.as_slice())
}

fn mean_non_batch(x: &Tensor) -> Tensor {
    let dims: Vec<i64> = (1..x.dim() as i64).collect();
    x.mean_dim(dims.as_slice(), false, None)
}

/// `r = clamp((clamp(A, low, high) / high) / 2 + 0.5, 0, 1)`.
pub fn reward_weight(adv: &Tensor, cfg: &NftLossConfig) -> Tensor {
    ((adv.clamp(cfg.adv_low, cfg.adv_high) / cfg.adv_high) / 2.0 + 0.5).clamp(0.0, 1.0)
}

/// One mini-batch at one timestep: clean latents, the noised latents the forwards
/// saw, `t = timesteps / 1000` (`[B]`) and the advantages (`[B]`).
pub struct NftSample<'a> {
    pub x0: &'a Tensor,
    pub xt: &'a Tensor,
    pub t: &'a Tensor,
    pub adv: &'a Tensor,
}

/// The three velocity predictions: trained ("default", with grad), "old" and
/// reference (adapters disabled), the last two without grad.
pub struct NftPredictions<'a> {
    pub v: &'a Tensor,
    pub v_old: &'a Tensor,
    pub v_ref: &'a Tensor,
}

/// The NFT loss and metrics.
pub fn nft_loss(cfg: &NftLossConfig, s: &NftSample<'_>, p: &NftPredictions<'_>) -> NftTerms {
    let (x0, xt, t, adv) = (s.x0, s.xt, s.t, s.adv);
    let (v, v_ref) = (p.v, p.v_ref);
    let v_old = p.v_old;
    let beta = cfg.beta;
    let te = expand_like(t, x0);
    let v_old = v_old.detach();
    let r = reward_weight(adv, cfg);

    let positive = v * beta + &v_old * (1.0 - beta);
    let negative = &v_old * (1.0 + beta) - v * beta;
    // Adaptive weights: per-sample mean |x0_pred - x0| in fp64, floored at 1e-5, no grad.
    // The fp64 weight promotes the per-sample losses to fp64, as in Cosmos-RL.
    let weighted = |pred_v: &Tensor| {
        let x0_pred = xt - &te * pred_v;
        let w = tch::no_grad(|| {
            let dims: Vec<i64> = (1..x0.dim() as i64).collect();
            (x0_pred.to_kind(Kind::Double) - x0.to_kind(Kind::Double))
                .abs()
                .mean_dim(dims.as_slice(), true, None)
                .clamp_min(1e-5)
        });
        mean_non_batch(&((&x0_pred - x0).square() / w))
    };
    let positive_loss = weighted(&positive);
    let negative_loss = weighted(&negative);
    let ori_policy = &r * positive_loss / beta + (-&r + 1.0) * negative_loss / beta;
    let policy = (&ori_policy * cfg.adv_high).mean(None);
    let kl = mean_non_batch(&(v - v_ref).square()).mean(None);
    let loss = &policy + &kl * cfg.kl_beta;

    let f = |x: &Tensor| x.double_value(&[]);
    let (metrics_x0, dev, old_kl) = tch::no_grad(|| {
        let x0_sq = x0.square();
        let dev = (v - &v_old).square();
        let old_kl = mean_non_batch(&(&v_old - v_ref).square()).mean(None);
        (
            (f(&x0_sq.mean(None)), f(&x0_sq.max())),
            (f(&dev.mean(None)), f(&dev.max())),
            f(&old_kl),
        )
    });
    NftTerms {
        policy_loss: f(&policy),
        unweighted_policy_loss: f(&ori_policy.mean(None)),
        kl_loss: f(&kl),
        old_kl,
        old_deviation: dev.0,
        old_deviation_max: dev.1,
        x0_norm: metrics_x0.0,
        x0_norm_max: metrics_x0.1,
        loss,
    }
}

/// Group advantages: `(r - mean) / (std + 1e-4)` per prompt (unbiased std), NaN → 0.
pub fn group_advantages(rewards: &[f64]) -> Vec<f64> {
    let n = rewards.len() as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0);
    rewards
        .iter()
        .map(|r| {
            let a = (r - mean) / (var.sqrt() + 1e-4);
            if a.is_nan() {
                0.0
            } else {
                a
            }
        })
        .collect()
}

/// `int(num_steps * timesteps_fraction)`: how many of each sample's timesteps train.
pub fn num_train_timesteps(num_steps: usize, timesteps_fraction: f64) -> usize {
    (num_steps as f64 * timesteps_fraction) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{load_named, parity_case};

    /// Against a Python implementation of the specification (scripts/parity/training.py).
    #[test]
    fn parity_nft_loss_metrics_and_gradient() {
        let dir = parity_case("training_nft");
        let x = load_named(&dir.join("inputs.safetensors"));
        let want = load_named(&dir.join("outputs.safetensors"));
        let cfg_json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let cfg = NftLossConfig {
            beta: cfg_json["beta"].as_f64().unwrap(),
            kl_beta: cfg_json["kl_beta"].as_f64().unwrap(),
            adv_low: cfg_json["adv_low"].as_f64().unwrap(),
            adv_high: cfg_json["adv_high"].as_f64().unwrap(),
        };
        let v = x["v"].detach().set_requires_grad(true);
        let xt = noised(&x["x0"], &x["t"], &x["eps"]);
        let sample = NftSample {
            x0: &x["x0"],
            xt: &xt,
            t: &x["t"],
            adv: &x["adv"],
        };
        let preds = NftPredictions {
            v: &v,
            v_old: &x["v_old"],
            v_ref: &x["v_ref"],
        };
        let terms = nft_loss(&cfg, &sample, &preds);
        terms.loss.backward();
        // Metrics are fp32 means of O(1) velocity terms: 1e-6 absolute is a few
        // ulps of their operands, for the ones that are (near) zero.
        let rel = |got: f64, name: &str| {
            crate::testing::assert_close(name, got, want[name].double_value(&[]), 1e-4, 1e-6)
        };
        rel(terms.loss.double_value(&[]), "loss");
        rel(terms.policy_loss, "policy_loss");
        rel(terms.unweighted_policy_loss, "unweighted_policy_loss");
        rel(terms.kl_loss, "kl_loss");
        rel(terms.old_kl, "old_kl");
        rel(terms.old_deviation, "old_deviation");
        rel(terms.old_deviation_max, "old_deviation_max");
        rel(terms.x0_norm, "x0_norm");
        rel(terms.x0_norm_max, "x0_norm_max");
        let g = v.grad();
        let gw = &want["grad_v"];
        let err = (&g - gw).abs().max().double_value(&[]) / gw.abs().max().double_value(&[]);
        eprintln!("grad_v rel err {err:.2e}");
        assert!(err <= 1e-4);
    }

    #[test]
    fn advantages_per_group() {
        let a = group_advantages(&[1.0, 2.0, 3.0]);
        assert!((a[0] + 0.99990001).abs() < 1e-6 && a[1] == 0.0);
        assert_eq!(group_advantages(&[5.0]), vec![0.0]);
        assert_eq!(group_advantages(&[2.0, 2.0]), vec![0.0, 0.0]);
        assert_eq!(num_train_timesteps(10, 0.6), 6);
    }
}
