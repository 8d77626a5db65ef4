//! What a run leaves to read and plot: a progress bar with step, reward and
//! ETA; `metrics.jsonl` (one JSON object per step: every NFT metric, rewards,
//! throughput) and the same as TensorBoard scalars in `tensorboard/`; `mm_data/step_<N>.png` image grids of rollouts with
//! `step_<N>.json` holding their prompts and rewards.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use proto::runtime::v1::{CheckpointReply, StepResult, Trajectories};
use sana::data::prompts::PromptItem;
use serde_json::{json, Map, Value};
use tch::{Kind, Tensor};

/// Logged rollout videos play at Cosmos-RL's 8 fps.
const VIDEO_LOG_FPS: u32 = 8;

pub struct RunLog {
    dir: PathBuf,
    metrics: File,
    events: crate::tensorboard::EventWriter,
    bar: indicatif::ProgressBar,
    mm_interval: Option<u64>,
    /// Mean reward per step (NFT) and loss per step (SFT), for the summary.
    pub rewards: Vec<(u64, f64)>,
    pub losses: Vec<f64>,
}

fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    let m = x.iter().sum::<f64>() / n;
    let v = x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (m, v.sqrt())
}

impl RunLog {
    pub fn open(
        dir: &Path,
        first_step: u64,
        last_step: u64,
        mm_interval: Option<u64>,
    ) -> anyhow::Result<Self> {
        let path = dir.join("metrics.jsonl");
        let metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let bar = indicatif::ProgressBar::new(last_step);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "step {pos}/{len} [{bar:30}] {msg} elapsed {elapsed} ETA {eta}",
            )
            .expect("valid template"),
        );
        bar.set_position(first_step);
        bar.set_message("starting");
        let events = crate::tensorboard::EventWriter::create(&dir.join("tensorboard"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            metrics,
            events,
            bar,
            mm_interval,
            rewards: Vec::new(),
            losses: Vec::new(),
        })
    }

    /// Cosmos-RL logs media at step 1 and every `multi_modal_log_interval` steps.
    pub fn wants_images(&self, step: u64) -> bool {
        self.mm_interval
            .is_some_and(|k| step == 1 || (k > 0 && step.is_multiple_of(k)))
    }

    pub fn step(
        &mut self,
        step: u64,
        prompts: &[(usize, PromptItem)],
        t: &Trajectories,
        r: &StepResult,
        train_secs: f64,
        step_secs: f64,
    ) -> anyhow::Result<()> {
        let rewards: Vec<f64> = t.scores.iter().map(|s| s.reward as f64).collect();
        let (rm, rs) = mean_std(&rewards);
        let n = rewards.len() as f64;
        let mut m: Map<String, Value> = serde_json::from_str(&r.metrics_json).unwrap_or_default();
        m.insert("step".into(), step.into());
        m.insert("reward_mean".into(), rm.into());
        m.insert("reward_std".into(), rs.into());
        for (k, v) in &t.raw_score_means {
            m.insert(format!("reward/{k}"), (*v).into());
        }
        m.insert(
            "rollout_images_per_s".into(),
            (n / t.sample_seconds.max(1e-9)).into(),
        );
        m.insert(
            "train_samples_per_s".into(),
            (n / train_secs.max(1e-9)).into(),
        );
        m.insert("sample_seconds".into(), t.sample_seconds.into());
        m.insert("reward_seconds".into(), t.reward_seconds.into());
        m.insert("train_seconds".into(), train_secs.into());
        m.insert("step_seconds".into(), step_secs.into());
        m.insert(
            "time".into(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
                .into(),
        );
        writeln!(self.metrics, "{}", Value::Object(m.clone()))?;
        self.metrics.flush()?;
        self.events.scalars(step, &m)?;
        self.rewards.push((step, rm));
        let loss = m.get("loss").and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        self.bar.set_position(step);
        self.bar
            .set_message(format!("reward {rm:+.4} ±{rs:.4} loss {loss:.4}"));
        tracing::info!(step, reward_mean = rm, loss, "step done");
        if let Some(images) = &t.images {
            self.image_grid(step, prompts, t, images)?;
        }
        Ok(())
    }

    fn image_grid(
        &self,
        step: u64,
        prompts: &[(usize, PromptItem)],
        t: &Trajectories,
        images: &proto::runtime::v1::TensorData,
    ) -> anyhow::Result<()> {
        let img = tensor_wire::from_wire(images)?; // [K, H, W, 3] (videos [K, T, H, W, 3]) uint8
        let k = img.size()[0];
        if k == 0 {
            return Ok(());
        }
        if img.dim() == 5 {
            return self.rollout_videos(step, prompts, t, &img);
        }
        let cols = (k as f64).sqrt().ceil() as i64;
        let rows = (k + cols - 1) / cols;
        let (h, w) = (img.size()[1], img.size()[2]);
        let grid = Tensor::zeros([3, rows * h, cols * w], (Kind::Float, tch::Device::Cpu));
        for i in 0..k {
            let (r, c) = (i / cols, i % cols);
            let tile = img.get(i).permute([2, 0, 1]).to_kind(Kind::Float) / 255.0;
            grid.narrow(1, r * h, h).narrow(2, c * w, w).copy_(&tile);
        }
        let dir = self.dir.join("mm_data");
        std::fs::create_dir_all(&dir)?;
        sana::pipelines::pipeline_sana::write_png(&grid, &dir.join(format!("step_{step}.png")))?;
        let g = (t.scores.len() / prompts.len().max(1)).max(1);
        let captions: Vec<Value> = (0..k as usize)
            .map(|i| {
                let s = &t.scores[i];
                json!({
                    "tile": i,
                    "row": i as i64 / cols,
                    "col": i as i64 % cols,
                    "prompt": prompts.get(i / g).map(|p| p.1.text.clone()).unwrap_or_default(),
                    "reward": s.reward,
                    "advantage": s.advantage,
                })
            })
            .collect();
        std::fs::write(
            dir.join(format!("step_{step}.json")),
            serde_json::to_string_pretty(&captions)?,
        )?;
        Ok(())
    }

    /// Video rollouts: one H.264 mp4 each (`mm_data/step_<s>_<i>.mp4`, at the
    /// rollout frame rate) and `step_<s>.json` with their prompts and rewards.
    fn rollout_videos(
        &self,
        step: u64,
        prompts: &[(usize, PromptItem)],
        t: &Trajectories,
        videos: &Tensor,
    ) -> anyhow::Result<()> {
        let dir = self.dir.join("mm_data");
        std::fs::create_dir_all(&dir)?;
        let g = (t.scores.len() / prompts.len().max(1)).max(1);
        let mut captions = Vec::new();
        for i in 0..videos.size()[0] {
            let file = format!("step_{step}_{i}.mp4");
            let frames = videos.get(i).permute([0, 3, 1, 2]).to_kind(Kind::Float) / 255.0;
            // A clip that cannot be encoded is a log line, never the end of the run.
            if let Err(e) = sana::video_io::write_mp4(&frames, &dir.join(&file), VIDEO_LOG_FPS) {
                tracing::warn!(step, "rollout video not written: {e}");
                continue;
            }
            let s = &t.scores[i as usize];
            captions.push(json!({
                "video": file,
                "prompt": prompts.get(i as usize / g).map(|p| p.1.text.clone()).unwrap_or_default(),
                "reward": s.reward,
                "advantage": s.advantage,
            }));
        }
        std::fs::write(
            dir.join(format!("step_{step}.json")),
            serde_json::to_string_pretty(&captions)?,
        )?;
        Ok(())
    }

    pub fn sft_step(
        &mut self,
        step: u64,
        r: &StepResult,
        batch: usize,
        step_secs: f64,
    ) -> anyhow::Result<()> {
        let mut m: Map<String, Value> = serde_json::from_str(&r.metrics_json).unwrap_or_default();
        m.insert("step".into(), step.into());
        m.insert("skipped".into(), r.skipped.into());
        m.insert(
            "train_samples_per_s".into(),
            (batch as f64 / r.seconds.max(1e-9)).into(),
        );
        m.insert("step_seconds".into(), step_secs.into());
        writeln!(self.metrics, "{}", Value::Object(m.clone()))?;
        self.metrics.flush()?;
        self.events.scalars(step, &m)?;
        let loss = m.get("loss").and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        self.losses.push(loss);
        if r.skipped > 0 {
            self.bar.println(format!(
                "step {step}: {} unreadable samples skipped",
                r.skipped
            ));
        }
        self.bar.set_position(step);
        self.bar.set_message(format!("loss {loss:.4}"));
        Ok(())
    }

    pub fn validation(&mut self, step: u64, t: &Trajectories) -> anyhow::Result<()> {
        let rewards: Vec<f64> = t.scores.iter().map(|s| s.reward as f64).collect();
        let (m, s) = mean_std(&rewards);
        let row = json!({"step": step, "validation/reward_mean": m, "validation/reward_std": s, "validation/samples": rewards.len()});
        writeln!(self.metrics, "{row}")?;
        if let Value::Object(map) = &row {
            self.events.scalars(step, map)?;
        }
        self.bar.println(format!(
            "step {step}: validation reward {m:+.4} ±{s:.4} over {} samples",
            rewards.len()
        ));
        Ok(())
    }

    pub fn finish(&mut self, ckpt: &CheckpointReply) -> anyhow::Result<()> {
        self.bar.finish();
        let k = self.rewards.len().min(5);
        if k > 0 {
            let first: f64 = self.rewards[..k].iter().map(|r| r.1).sum::<f64>() / k as f64;
            let last: f64 = self.rewards[self.rewards.len() - k..]
                .iter()
                .map(|r| r.1)
                .sum::<f64>()
                / k as f64;
            eprintln!("mean reward: first {k} steps {first:+.4}, last {k} steps {last:+.4}");
        }
        let k = self.losses.len().min(5);
        if k > 0 {
            let first: f64 = self.losses[..k].iter().sum::<f64>() / k as f64;
            let n = self.losses.len();
            let last: f64 = self.losses[n - k..].iter().sum::<f64>() / k as f64;
            eprintln!("mean loss: first {k} steps {first:.4}, last {k} steps {last:.4}");
        }
        eprintln!("checkpoint {}", ckpt.path);
        if !ckpt.export_path.is_empty() {
            eprintln!("exported weights {}", ckpt.export_path);
        }
        Ok(())
    }
}
