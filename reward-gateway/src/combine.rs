//! Turning pulled scores into one reward per item, and rewards into group
//! advantages, as Cosmos-RL's `RemoteRewardCalculator` does (in float32, as
//! its torch tensors are).

use crate::config::{RemoteRewardConfig, RewardFn};
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CombineError {
    #[error("reward {reward:?}: missing score keys {missing:?} (requested {requested:?}, available {available:?})")]
    MissingKeys {
        reward: String,
        missing: Vec<String>,
        requested: String,
        available: Vec<String>,
    },
    #[error("reward {reward:?}: scores[{key:?}] is not a list of {n} numbers")]
    BadScores {
        reward: String,
        key: String,
        n: usize,
    },
}

/// One reward_fn's scores for the batch: `scores[score_key]`, or the sum of
/// the `+`-separated keys when that key itself is absent.
pub fn select_scores(
    f: &RewardFn,
    scores: &Map<String, Value>,
    n: usize,
) -> Result<Vec<f32>, CombineError> {
    let list = |key: &str| -> Result<Vec<f32>, CombineError> {
        let bad = || CombineError::BadScores {
            reward: f.name.clone(),
            key: key.to_string(),
            n,
        };
        let a = scores[key].as_array().ok_or_else(bad)?;
        if a.len() != n {
            return Err(bad());
        }
        a.iter()
            .map(|v| v.as_f64().map(|x| x as f32).ok_or_else(bad))
            .collect()
    };
    let key = f.score_key();
    if scores.contains_key(key) {
        return list(key);
    }
    let keys: Vec<&str> = key
        .split('+')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .collect();
    let missing: Vec<String> = keys
        .iter()
        .filter(|k| !scores.contains_key(**k))
        .map(|k| k.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(CombineError::MissingKeys {
            reward: f.name.clone(),
            missing,
            requested: key.to_string(),
            available: scores.keys().cloned().collect(),
        });
    }
    let mut total = vec![0f32; n];
    for k in keys {
        for (t, s) in total.iter_mut().zip(list(k)?) {
            *t += s;
        }
    }
    Ok(total)
}

fn clamp(x: f32, lo: Option<f64>, hi: Option<f64>) -> f32 {
    // torch.clamp with None leaves that side open; NaN stays NaN.
    let mut x = x;
    if let Some(lo) = lo {
        if x < lo as f32 {
            x = lo as f32;
        }
    }
    if let Some(hi) = hi {
        if x > hi as f32 {
            x = hi as f32;
        }
    }
    x
}

/// The combined reward per item from each reward_fn's selected scores (in
/// `cfg.reward_fns` order): clip, weight, add; then clip the total and scale.
pub fn combine(cfg: &RemoteRewardConfig, per_fn: &[Vec<f32>], n: usize) -> Vec<f32> {
    let mut total = vec![0f32; n];
    for (f, scores) in cfg.reward_fns.iter().zip(per_fn) {
        for (t, &s) in total.iter_mut().zip(scores) {
            *t += clamp(s, f.clip_min, f.clip_max) * f.weight as f32;
        }
    }
    total
        .into_iter()
        .map(|t| clamp(t, cfg.reward_clip_min, cfg.reward_clip_max) * cfg.scale as f32)
        .collect()
}

/// `(r - mean) / (std + 1e-4)` with the unbiased std; all zeros if any is NaN
/// (a group of one).
pub fn advantages(rewards: &[f32]) -> Vec<f32> {
    let n = rewards.len();
    let mean = (rewards.iter().map(|&r| r as f64).sum::<f64>() / n as f64) as f32;
    let var = rewards
        .iter()
        .map(|&r| ((r - mean) as f64).powi(2))
        .sum::<f64>()
        / (n as f64 - 1.0);
    let std = var.sqrt() as f32;
    let adv: Vec<f32> = rewards.iter().map(|&r| (r - mean) / (std + 1e-4)).collect();
    if adv.iter().any(|a| a.is_nan()) {
        vec![0.0; n]
    } else {
        adv
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn f(name: &str, key: Option<&str>, w: f64, lo: Option<f64>, hi: Option<f64>) -> RewardFn {
        RewardFn {
            name: name.into(),
            weight: w,
            score_key: key.map(String::from),
            clip_min: lo,
            clip_max: hi,
        }
    }

    #[test]
    fn composite_keys_sum_and_missing_keys_name_what_is_there() {
        let scores = json!({"vq": [1.0, 2.0], "mq": [0.5, 0.25]});
        let scores = scores.as_object().unwrap();
        let got = select_scores(&f("dance", Some("vq+mq"), 1.0, None, None), scores, 2).unwrap();
        assert_eq!(got, vec![1.5, 2.25]);
        let err =
            select_scores(&f("dance", Some("vq+ta"), 1.0, None, None), scores, 2).unwrap_err();
        assert_eq!(
            err,
            CombineError::MissingKeys {
                reward: "dance".into(),
                missing: vec!["ta".into()],
                requested: "vq+ta".into(),
                available: vec!["mq".into(), "vq".into()],
            }
        );
        assert!(select_scores(&f("vq", None, 1.0, None, None), scores, 3).is_err());
    }

    #[test]
    fn clip_weight_sum_clip_scale() {
        let cfg = RemoteRewardConfig {
            scale: 10.0,
            reward_clip_min: Some(-1.0),
            reward_clip_max: Some(0.5),
            reward_fns: vec![
                f("a", None, 2.0, Some(0.0), None),
                f("b", None, 0.5, None, Some(0.2)),
            ],
        };
        let got = combine(&cfg, &[vec![-1.0, 0.1, 3.0], vec![1.0, -4.0, 0.0]], 3);
        // a: [0, .1, 3]*2 = [0, .2, 6]; b: [.2, -4, 0]*.5 = [.1, -2, 0]; sum [.1, -1.8, 6]
        // clip [-1, .5] -> [.1, -1, .5]; * 10
        let want = [1.0f32, -10.0, 5.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn advantages_match_torch() {
        // torch: r = tensor([1., 2., 4.]); (r - r.mean()) / (r.std() + 1e-4)
        let a = advantages(&[1.0, 2.0, 4.0]);
        let want = [-0.872_863_f32, -0.218_216, 1.091_08];
        for (g, w) in a.iter().zip(want) {
            assert!((g - w).abs() < 1e-4, "{a:?}");
        }
        assert_eq!(advantages(&[3.0]), vec![0.0]);
        assert_eq!(advantages(&[2.0, 2.0]), vec![0.0, 0.0]);
    }
}
