//! Data parallelism for the trainers: every rank holds the whole model and the
//! whole step's batch, draws the same shuffles and noise (same seeds), computes
//! its own slice of every mini batch, and the gradients are summed across
//! ranks before the optimizer step. Each rank then applies the same update, so
//! N ranks equal one process on the same global batch.
//!
//! `train_policy.mini_batch` and `batch_size_per_optimize` are per rank, as in
//! Cosmos-RL: the global mini batch is `mini_batch × world`.

use c10d::{ProcessGroup, ReduceOp};
use tch::{Kind, Tensor};

use crate::{Result, SanaError};

/// This process's part in data-parallel training (one rank when alone).
#[derive(Debug, Default)]
pub struct DataParallel {
    group: Option<ProcessGroup>,
    /// `train.fsdp_reduce_dtype`: the dtype gradients are summed in.
    reduce_kind: Option<Kind>,
    /// This rank's device: NCCL reduces there (each rank its own GPU).
    device: Option<tch::Device>,
}

fn collective(e: c10d::Error) -> SanaError {
    SanaError::Collective(e.to_string())
}

impl DataParallel {
    /// Alone: no communication.
    pub fn single() -> Self {
        Self::default()
    }

    /// `device`: the model's, where gradients (and, on NCCL, metrics) are reduced.
    pub fn new(group: ProcessGroup, reduce_kind: Kind, device: tch::Device) -> Self {
        Self {
            group: Some(group),
            reduce_kind: Some(reduce_kind),
            device: Some(device),
        }
    }

    /// Changes the dtype gradients are summed in.
    pub fn set_reduce_kind(&mut self, kind: Kind) {
        self.reduce_kind = Some(kind);
    }

    /// The dtype gradients are summed in (`fsdp_reduce_dtype`; fp32 alone).
    pub fn reduce_kind(&self) -> Kind {
        self.reduce_kind.unwrap_or(Kind::Float)
    }

    pub fn rank(&self) -> usize {
        self.group.as_ref().map_or(0, |g| g.rank())
    }

    pub fn world_size(&self) -> usize {
        self.group.as_ref().map_or(1, |g| g.world_size())
    }

    pub fn group(&self) -> Option<&ProcessGroup> {
        self.group.as_ref()
    }

    /// This rank's contiguous part `(start, len)` of `n` items; parts differ by at most one.
    pub fn slice(&self, n: i64) -> (i64, i64) {
        rank_slice(self.rank(), self.world_size(), n)
    }

    /// Sums every parameter's gradient across ranks, in one flat buffer.
    /// A parameter this rank gave no gradient counts as zeros.
    pub fn all_reduce_grads(&self, params: &[Tensor]) -> Result<()> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        let kind = self.reduce_kind.unwrap_or(Kind::Float);
        let flat: Vec<Tensor> = params
            .iter()
            .map(|p| {
                let g = p.grad();
                if g.defined() {
                    g.to_kind(kind).flatten(0, -1)
                } else {
                    Tensor::zeros([p.numel() as i64], (kind, p.device()))
                }
            })
            .collect();
        let mut buf = Tensor::cat(&flat, 0);
        group
            .all_reduce(&mut buf, ReduceOp::Sum)
            .map_err(collective)?;
        let mut offset = 0;
        for p in params {
            let n = p.numel() as i64;
            let part = buf.narrow(0, offset, n).view(p.size().as_slice());
            offset += n;
            let mut g = p.grad();
            if !g.defined() {
                // No backward reached this parameter on this rank (no samples);
                // tch cannot assign `.grad`, so a zero backward materialises it.
                (p.sum(None) * 0.0).backward();
                g = p.grad();
            }
            g.copy_(&part);
        }
        Ok(())
    }

    /// Element-wise reduction of `values` across ranks (f64 on the CPU).
    pub fn all_reduce_values(&self, values: &mut [f64], op: ReduceOp) -> Result<()> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        if values.is_empty() {
            return Ok(());
        }
        let device = match group.backend() {
            c10d::Backend::Nccl => self.device.unwrap_or(tch::Device::Cuda(0)),
            c10d::Backend::Gloo => tch::Device::Cpu,
        };
        let mut t = Tensor::from_slice(values).to_device(device);
        group.all_reduce(&mut t, op).map_err(collective)?;
        let back = Vec::<f64>::try_from(t.to_device(tch::Device::Cpu)).map_err(SanaError::from)?;
        values.copy_from_slice(&back);
        Ok(())
    }
}

/// Rank `rank`'s contiguous part `(start, len)` of `n` items split over `world` ranks.
pub fn rank_slice(rank: usize, world: usize, n: i64) -> (i64, i64) {
    let (r, w) = (rank as i64, world.max(1) as i64);
    let (base, extra) = (n / w, n % w);
    (r * base + r.min(extra), base + i64::from(r < extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_everything_once() {
        for n in 0..12i64 {
            for world in 1..5usize {
                let mut next = 0;
                for rank in 0..world {
                    let (s, l) = rank_slice(rank, world, n);
                    assert!(l == n / world as i64 || l == n / world as i64 + 1);
                    assert_eq!(s, next, "n {n} world {world} rank {rank}");
                    next += l;
                }
                assert_eq!(next, n);
            }
        }
    }

    use crate::testing::{rank_env, spawn_ranks, tiny_nft_model_and_batch};
    use crate::training::nft_trainer::{tests::test_config, NftStepMetrics, NftTrainer};
    use std::collections::HashMap;
    use std::path::Path;

    const STEPS: u64 = 2;

    /// `STEPS` NFT steps (two passes each) on the tiny model, every rank on the
    /// same 6-sample batch; per-rank batch sizes are the 1-rank ones over the world.
    fn nft_steps(mut dp: DataParallel, kind: Kind, positive: bool, out: &Path) -> DataParallel {
        let world = dp.world_size();
        dp.set_reduce_kind(kind);
        let (mut model, mut batch) = tiny_nft_model_and_batch(7);
        if positive {
            batch.advantages = batch.advantages.abs();
        }
        model.set_kind(kind);
        batch.latents_clean = batch.latents_clean.to_kind(kind);
        batch.prompt_embeds = batch.prompt_embeds.to_kind(kind);
        let mut cfg = test_config();
        cfg.mu_iterations = 2;
        // Global optimize batches of 4 then 2, one mini batch each: at 4 ranks
        // the last one leaves two ranks without a sample.
        cfg.batch_size_per_optimize = Some(4 / world);
        cfg.mini_batch = Some(4 / world);
        let mut trainer = NftTrainer::new(&mut model, cfg).unwrap();
        trainer.dp = dp;
        let metrics: Vec<NftStepMetrics> = (0..STEPS)
            .map(|_| trainer.train_step(&model, &batch).unwrap())
            .collect();
        let state = trainer.state(&model, serde_json::Value::Null).unwrap();
        Tensor::write_safetensors(&state.tensors, out.with_extension("safetensors")).unwrap();
        std::fs::write(
            out.with_extension("json"),
            serde_json::to_string(&metrics).unwrap(),
        )
        .unwrap();
        std::mem::take(&mut trainer.dp)
    }

    /// One data-parallel rank, started by the tests below.
    #[test]
    #[ignore = "a rank process for the data-parallel tests, not a test"]
    fn nft_rank_process() {
        let Some((dp, out)) = rank_env() else {
            return;
        };
        let dp = nft_steps(dp, Kind::Double, false, &suffixed(&out, "f64"));
        let dp = nft_steps(dp, Kind::Double, true, &suffixed(&out, "f64pos"));
        nft_steps(dp, Kind::Float, true, &suffixed(&out, "f32pos"));
    }

    /// `<stem>_<suffix>`: outputs then add their own extensions.
    fn suffixed(stem: &Path, suffix: &str) -> std::path::PathBuf {
        let mut s = stem.as_os_str().to_owned();
        s.push(format!("_{suffix}"));
        s.into()
    }

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-12)
    }

    /// What one run wrote: every state tensor by name, and the metrics per step.
    fn read_run(stem: &Path) -> (HashMap<String, Tensor>, Vec<serde_json::Value>) {
        let tensors = Tensor::read_safetensors(stem.with_extension("safetensors"))
            .unwrap()
            .into_iter()
            .collect();
        let metrics =
            serde_json::from_str(&std::fs::read_to_string(stem.with_extension("json")).unwrap())
                .unwrap();
        (tensors, metrics)
    }

    /// Each state tensor's and each step's metric's error against another run,
    /// by name: a tensor's max abs difference relative to its max abs value, a
    /// metric's difference relative to max(|value|, 1). Metrics near zero
    /// (`old_deviation` is 0 at the first step, where "old" is "default") get an
    /// absolute bound that way instead of a relative one that 1e-15 would break.
    fn errors(got: &Path, want: &Path) -> std::collections::BTreeMap<String, f64> {
        let ((gt, gm), (wt, wm)) = (read_run(got), read_run(want));
        assert_eq!(gt.len(), wt.len());
        assert_eq!(gm.len(), STEPS as usize);
        let mut out: std::collections::BTreeMap<String, f64> = wt
            .iter()
            .map(|(name, w)| (name.clone(), rel(&gt[name], w)))
            .collect();
        for (step, (g, w)) in gm.iter().zip(&wm).enumerate() {
            for (k, wx) in w.as_object().unwrap() {
                let (a, b) = (g[k].as_f64().unwrap(), wx.as_f64().unwrap());
                out.insert(
                    format!("step {} {k}", step + 1),
                    (a - b).abs() / b.abs().max(1.0),
                );
            }
        }
        out
    }

    /// The worst error over the state tensors and over the metrics.
    fn worst_errors(got: &Path, want: &Path) -> (f64, f64) {
        let e = errors(got, want);
        let worst = |metrics: bool| {
            e.iter()
                .filter(|(k, _)| k.starts_with("step ") == metrics)
                .map(|(_, &v)| v)
                .fold(0.0, f64::max)
        };
        (worst(false), worst(true))
    }

    /// `STEPS` full-weight SFT steps on a tiny model (the video transformer on
    /// 3-frame latents when `video`), every rank with the same 6-sample batch;
    /// global mini batches of 4 then 2.
    fn sft_steps(
        mut dp: DataParallel,
        kind: Kind,
        out: &Path,
        fsdp: bool,
        video: bool,
    ) -> DataParallel {
        use crate::models::DiffusionTransformer;
        use crate::schedulers::DPMSolverMultistepConfig;
        use crate::training::lr_schedule::{DecayType, LrSchedule};
        use crate::training::optim::AdamWConfig;
        use crate::training::sft::{SftTimesteps, WeightingScheme};
        use crate::training::sft_trainer::{SftBatch, SftTrainer, SftTrainerConfig};
        use crate::training::trainable::TrainTarget;
        let world = dp.world_size();
        dp.set_reduce_kind(kind);
        let mut model: Box<dyn DiffusionTransformer> = if video {
            let mut m = crate::testing::tiny_video_transformer(11);
            m.set_kind(kind);
            Box::new(m)
        } else {
            let mut m = crate::testing::tiny_transformer(11);
            m.set_kind(kind);
            Box::new(m)
        };
        let f = (kind, tch::Device::Cpu);
        let latents: &[i64] = if video {
            &[6, 4, 3, 4, 4]
        } else {
            &[6, 4, 4, 4]
        };
        let batch = SftBatch {
            latents: Tensor::randn(latents, f),
            prompt_embeds: Tensor::randn([6, 5, 6], f),
            prompt_attention_mask: Tensor::ones([6, 5], (Kind::Int64, tch::Device::Cpu)),
        };
        let cfg = SftTrainerConfig {
            target: TrainTarget::Full,
            mini_batch: Some(4 / world),
            weighting: WeightingScheme::parse("logit_normal", 0.0, 1.0, 1.29).unwrap(),
            grad_norm_clip: 1.0,
            ema: Some((0.9, 1)),
            optimizer: AdamWConfig {
                lr: 1e-3,
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.01,
            },
            schedule: LrSchedule::new(1000, 0.0, false, None, DecayType::None, 0.0, 0.0),
            seed: 5,
        };
        let timesteps = SftTimesteps::new(&DPMSolverMultistepConfig::sana(), 3.0).unwrap();
        let mut trainer = if fsdp {
            SftTrainer::new_fsdp(model.as_mut(), cfg, timesteps, dp, kind, true).unwrap()
        } else {
            let mut t = SftTrainer::new(model.as_mut(), cfg, timesteps).unwrap();
            t.dp = dp;
            t
        };
        let metrics: Vec<serde_json::Value> = (0..STEPS)
            .map(|_| {
                serde_json::to_value(trainer.train_step(model.as_ref(), &batch).unwrap()).unwrap()
            })
            .collect();
        // Elements held between steps: the model's weights (empty while sharded),
        // gradients, AdamW moments, EMA, and FSDP's master shards.
        let numel = |ts: &[Tensor]| ts.iter().map(|t| t.numel()).sum::<usize>();
        let grads = |ts: &[Tensor]| {
            ts.iter()
                .map(|t| t.grad())
                .filter(|g| g.defined())
                .map(|g| g.numel())
                .sum::<usize>()
        };
        let vars: Vec<Tensor> = model.var_store().variables().into_values().collect();
        let opt = &trainer.params.optimizer;
        let mut held = numel(&vars) + grads(&vars) + numel(&opt.exp_avg) + numel(&opt.exp_avg_sq);
        held += trainer.params.ema.as_ref().map_or(0, |e| numel(&e.shadow));
        if trainer.fsdp.is_some() {
            held += numel(&opt.params) + grads(&opt.params);
        }
        std::fs::write(out.with_extension("held"), held.to_string()).unwrap();
        let state = trainer.state(serde_json::Value::Null).unwrap();
        Tensor::write_safetensors(&state.tensors, out.with_extension("safetensors")).unwrap();
        std::fs::write(
            out.with_extension("json"),
            serde_json::to_string(&metrics).unwrap(),
        )
        .unwrap();
        // A checkpoint written by another world size (SANA_TEST_RESTORE: one
        // rank's state) restores into this one's shards; its state reads back.
        if let Ok(from) = std::env::var("SANA_TEST_RESTORE") {
            let mut st = trainer.state(serde_json::Value::Null).unwrap();
            st.tensors = Tensor::read_safetensors(&from).unwrap();
            trainer.restore(st, Path::new(&from)).unwrap();
            let back = trainer.state(serde_json::Value::Null).unwrap();
            Tensor::write_safetensors(&back.tensors, out.with_extension("restored.safetensors"))
                .unwrap();
        }
        std::mem::take(&mut trainer.dp)
    }

    #[test]
    #[ignore = "a rank process for the data-parallel tests, not a test"]
    fn sft_rank_process() {
        let Some((dp, out)) = rank_env() else {
            return;
        };
        let fsdp = std::env::var("SANA_TEST_FSDP").is_ok();
        let video = std::env::var("SANA_TEST_VIDEO").is_ok();
        sft_steps(dp, Kind::Double, &suffixed(&out, "f64"), fsdp, video);
    }

    /// Full-weight SFT over 2 ranks equals one rank on the same global batch
    /// (fp64: the algorithm, without fp32 summation order; measured ~1e-14).
    #[test]
    fn sft_steps_on_2_ranks_equal_one_rank() {
        let dir = tempfile::tempdir().unwrap();
        let one = suffixed(&dir.path().join("one"), "f64");
        sft_steps(DataParallel::single(), Kind::Double, &one, false, false);
        let test = "training::parallel::tests::sft_rank_process";
        for (rank, stem) in spawn_ranks(test, 2, dir.path(), &[]).iter().enumerate() {
            let (t, m) = worst_errors(&suffixed(stem, "f64"), &one);
            eprintln!("SFT, 2 ranks, rank {rank}: worst relative error {t:.2e} over the state, {m:.2e} over the metrics");
            // The SFT loss itself is taken in fp32 (as diffusers does), so the
            // reported loss differs by fp32 rounding (measured ~9e-9).
            assert!(t <= 1e-10 && m <= 1e-6, "rank {rank}");
        }
    }

    /// FSDP full-weight SFT over 2 and 4 ranks (weights, gradients, moments
    /// and EMA sharded; blocks gathered one at a time and recomputed for the
    /// backward) equals one unsharded rank on the same global batch, and each
    /// rank holds about 1/N of the unsharded weights + gradients + optimizer;
    /// a 1-rank checkpoint restores into 2 and 4 ranks' shards exactly.
    #[test]
    fn fsdp_sft_on_2_and_4_ranks_equals_one_rank_at_a_fraction_of_the_memory() {
        let dir = tempfile::tempdir().unwrap();
        let one = suffixed(&dir.path().join("one"), "f64");
        sft_steps(DataParallel::single(), Kind::Double, &one, false, false);
        let held = |stem: &Path| -> f64 {
            std::fs::read_to_string(stem.with_extension("held"))
                .unwrap()
                .parse()
                .unwrap()
        };
        let test = "training::parallel::tests::sft_rank_process";
        for world in [2usize, 4] {
            let sub = dir.path().join(format!("fsdp{world}"));
            std::fs::create_dir_all(&sub).unwrap();
            let restore = one.with_extension("safetensors");
            let env = [
                ("SANA_TEST_FSDP", "1"),
                ("SANA_TEST_RESTORE", restore.to_str().unwrap()),
            ];
            let stems = spawn_ranks(test, world, &sub, &env);
            for (rank, stem) in stems.iter().enumerate() {
                let stem = suffixed(stem, "f64");
                let (t, m) = worst_errors(&stem, &one);
                let ratio = held(&stem) / held(&one);
                eprintln!(
                    "FSDP, {world} ranks, rank {rank}: worst relative error {t:.2e} over the \
                     state, {m:.2e} over the metrics; holds {ratio:.3} of one rank's \
                     weights + gradients + optimizer elements"
                );
                assert!(t <= 1e-10 && m <= 1e-6, "{world} ranks, rank {rank}");
                assert!(
                    ratio <= 0.6 / (world as f64 / 2.0),
                    "{world} ranks: {ratio}"
                );
                // The 1-rank checkpoint, loaded into this rank's shards and
                // gathered back, is itself (checkpoints move across world sizes).
                let want = Tensor::read_safetensors(&restore).unwrap();
                let got: HashMap<String, Tensor> =
                    Tensor::read_safetensors(stem.with_extension("restored.safetensors"))
                        .unwrap()
                        .into_iter()
                        .collect();
                assert_eq!(got.len(), want.len());
                for (name, w) in &want {
                    assert!(
                        rel(&got[name], w) == 0.0,
                        "{name} after a 1 → {world} rank restore"
                    );
                }
            }
        }
    }

    /// FSDP on the video transformer (blocks with the rotary tables and the
    /// temporal conv, 3 latent frames) over 2 ranks equals one unsharded rank.
    #[test]
    fn fsdp_video_sft_on_2_ranks_equals_one_rank() {
        let dir = tempfile::tempdir().unwrap();
        let one = suffixed(&dir.path().join("one"), "f64");
        sft_steps(DataParallel::single(), Kind::Double, &one, false, true);
        let test = "training::parallel::tests::sft_rank_process";
        let env = [("SANA_TEST_FSDP", "1"), ("SANA_TEST_VIDEO", "1")];
        for (rank, stem) in spawn_ranks(test, 2, dir.path(), &env).iter().enumerate() {
            let (t, m) = worst_errors(&suffixed(stem, "f64"), &one);
            eprintln!("FSDP video, 2 ranks, rank {rank}: worst relative error {t:.2e} over the state, {m:.2e} over the metrics");
            assert!(t <= 1e-10 && m <= 1e-6, "rank {rank}");
        }
    }

    /// 2 and 4 Gloo ranks give the same loss, metrics and updated weights
    /// (adapter, moments, EMA, "old") as one rank on the same global batch. At 4
    /// ranks the last mini batch leaves two ranks without a sample.
    ///
    /// fp64 (gradients reduced in fp64): the ranks equal one process to
    /// rounding (measured ~1e-15), held to 1e-10, so any slip in the slicing,
    /// scaling or reduction shows.
    ///
    /// fp32: the ranks sum the gradients in another order than one backward
    /// over the whole mini batch, so they differ by rounding. How much depends
    /// on the conditioning: with the test batch's ± advantage pairs the
    /// per-sample gradients cancel, and the fp32 error — of one rank as much as
    /// of N — moved from 2e-5 to 2e-4 with the CPU's kernels. So the fp32 runs
    /// train on the same batch with one-signed advantages (|A|), where the
    /// error follows from the arithmetic: each gradient element is a sum of n
    /// terms without cancellation (n = global mini batch × latent positions ×
    /// trained timesteps), so its relative rounding is at most γ_n = n·u (u =
    /// 2⁻²⁴), and forward and backward each add such an error; AdamW passes a
    /// relative gradient error on to its update at most one for one, and the k
    /// optimizer steps add theirs up. Each fp32 run, one rank or N, is held to
    /// 2·k·γ_n of the fp64 run on the same batch (exact to ~1e-15). A
    /// slicing, scaling or reduction bug moves the update by O(1) relative; a
    /// reduction in bf16 (u = 2⁻⁸) by far more than the bound too.
    #[test]
    fn nft_steps_on_2_and_4_ranks_equal_one_rank() {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("one");
        let dp = nft_steps(
            DataParallel::single(),
            Kind::Double,
            false,
            &suffixed(&one, "f64"),
        );
        let dp = nft_steps(dp, Kind::Double, true, &suffixed(&one, "f64pos"));
        nft_steps(dp, Kind::Float, true, &suffixed(&one, "f32pos"));
        let exact = suffixed(&one, "f64");
        let exact_pos = suffixed(&one, "f64pos");
        // n and k from what the runs did: a global mini batch of 4 latents of
        // 4×4 positions, 2 trained timesteps; the optimizer steps they took.
        let (_, metrics) = read_run(&exact_pos);
        let k: u64 = metrics
            .iter()
            .map(|m| m["optimizer_steps"].as_u64().unwrap())
            .sum();
        let n = (4 * 4 * 4 * test_config().num_train_timesteps) as f64;
        let bound = 2.0 * k as f64 * n * f32::EPSILON as f64 / 2.0;
        let check = |what: &str, stem: &Path| {
            let (t, m) = worst_errors(stem, &exact_pos);
            eprintln!(
                "{what}, f32 (one-signed advantages) against f64: worst relative error {t:.2e} \
                 over the state tensors, {m:.2e} over the metrics; bound 2·k·γ_n = {bound:.2e} \
                 (k = {k}, n = {n})"
            );
            assert!(t.max(m) <= bound, "{what}, f32: {t:e} / {m:e} > {bound:e}");
        };
        check("1 rank", &suffixed(&one, "f32pos"));
        for world in [2usize, 4] {
            let test = "training::parallel::tests::nft_rank_process";
            for (rank, stem) in spawn_ranks(test, world, dir.path(), &[]).iter().enumerate() {
                let (t, m) = worst_errors(&suffixed(stem, "f64"), &exact);
                eprintln!(
                    "{world} ranks, rank {rank}, f64: worst relative error {t:.2e} over the \
                     state tensors, {m:.2e} over the metrics"
                );
                assert!(t <= 1e-10 && m <= 1e-10, "{world} ranks, rank {rank}, f64");
                check(
                    &format!("{world} ranks, rank {rank}"),
                    &suffixed(stem, "f32pos"),
                );
            }
        }
    }

    #[test]
    fn alone_it_is_rank_zero_of_one_and_touches_nothing() {
        let dp = DataParallel::single();
        assert_eq!((dp.rank(), dp.world_size(), dp.slice(5)), (0, 1, (0, 5)));
        let mut v = [1.0, 2.0];
        dp.all_reduce_values(&mut v, ReduceOp::Sum).unwrap();
        assert_eq!(v, [1.0, 2.0]);
    }
}
