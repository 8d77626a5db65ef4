//! The rollout worker: a SANA pipeline with the rollout LoRA adapter ("old"),
//! sampling prompt batches for the controller (`sana_rl.runtime.v1.RolloutWorker`),
//! scoring the decoded media through the reward gateway, and returning the
//! trajectories DiffusionNFT trains on (clean latents, timesteps, captions) with
//! rewards and group advantages.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use futures::StreamExt;
use proto::reward::v1::ScoreRequest;
use proto::runtime::v1::rollout_worker_server::{RolloutWorker, RolloutWorkerServer};
use proto::runtime::v1::*;
use proto::worker::{stop_on_signals, WorkerState};
use reward_gateway::client::{image_request, video_request, GatewayClient};
use sana::config::runtime::{kind_of, lora_config, resolve_model_dir};
use sana::config::RunConfig;
use sana::pipelines::auto_pipeline::{AutoPipeline, SampleOutput, SampleRequest};
use sana::pipelines::denoise::Sampler;
use sana::schedulers::solver::SolverConfig;
use tch::{Device, Kind, Tensor};
use tensor_wire::{from_wire, to_wire};
use tonic::{Request, Response, Status, Streaming};

/// The adapter rollouts sample with.
pub const ROLLOUT_ADAPTER: &str = "old";
/// The frame rate rollout videos are scored and logged at (Cosmos-RL logs at 8).
pub const ROLLOUT_FPS: f64 = 8.0;

#[derive(Debug, Clone)]
pub struct WorkerSetup {
    pub config: RunConfig,
    pub base_dir: PathBuf,
    pub rank: u32,
    pub device: Device,
    /// The reward gateway (`http://host:port`).
    pub gateway: String,
    /// Prefix of reward request ids (unique per run start, so a resumed run never
    /// reads answers cached for an earlier attempt).
    pub run_id: String,
    /// Parent of the spans of every call (the process root, under the controller's).
    pub trace_root: tracing::Span,
}

struct State {
    pipeline: AutoPipeline,
    /// The "old" adapter version loaded (none before the first push).
    version: Option<u64>,
    /// The rollout solver the config names (checked when the config loaded).
    solver: SolverConfig,
}

pub struct RolloutService {
    setup: WorkerSetup,
    state: WorkerState<State>,
    gateway: GatewayClient,
    stop: tokio::sync::watch::Sender<bool>,
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// SplitMix64 of the sample's coordinates: its noise seed, independent of how
/// samples are split over workers and batches.
pub fn sample_seed(seed: u64, step: u64, prompt_index: u64, generation: u64) -> i64 {
    let mut z = seed
        ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ prompt_index.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ generation.wrapping_mul(0x1656_67B1_9E37_79F9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

fn build_state(setup: &WorkerSetup) -> anyhow::Result<State> {
    let c = &setup.config;
    let dir = resolve_model_dir(&c.policy.model_name_or_path, &setup.base_dir)?;
    let kind = match setup.device {
        Device::Cpu => Kind::Float,
        _ => kind_of(&c.policy.diffusers.dtype)?,
    };
    let mut pipeline = AutoPipeline::from_pretrained(&dir, setup.device, kind)
        .with_context(|| format!("loading the pipeline {}", dir.display()))?;
    if pipeline.is_video() != c.policy.diffusers.is_video {
        anyhow::bail!(
            "policy.diffusers.is_video = {} but {} holds {} pipeline",
            c.policy.diffusers.is_video,
            dir.display(),
            if pipeline.is_video() {
                "a video"
            } else {
                "an image"
            }
        );
    }
    if let Some(lora) = &c.policy.lora {
        let l = pipeline.transformer_mut().lora_mut();
        l.add_adapter(ROLLOUT_ADAPTER, &lora_config(lora)?)?;
        l.set_active(ROLLOUT_ADAPTER)?;
    }
    let s = &c.policy.diffusers.sample;
    let solver = SolverConfig::parse(&s.solver, s.deterministic_sampling, s.noise_level)
        .context("policy.diffusers.sample")?;
    Ok(State {
        pipeline,
        version: None,
        solver,
    })
}

/// The rollout of one prompt batch, before scoring.
struct Sampled {
    latents: Tensor,
    timesteps: Vec<f64>,
    embeds: Tensor,
    mask: Tensor,
    /// uint8 `[N, H, W, 3]` images, or `[N, T, H, W, 3]` video frames.
    images: Tensor,
    seconds: f64,
}

/// The sampling calls of one rollout: consecutive runs of `(prompt position,
/// samples)` in prompt-major order, each call holding at most `mini_batch`
/// samples (`rollout.n_generation_mini_batch`; all of them when unset, as
/// Cosmos-RL's NFT rollout splits the flat prompts × generations batch).
pub fn sampling_calls(
    prompts: usize,
    per_prompt: usize,
    mini_batch: Option<usize>,
) -> Vec<Vec<(usize, usize)>> {
    let total = prompts * per_prompt;
    let size = mini_batch.unwrap_or(total).clamp(1, total.max(1));
    (0..total)
        .step_by(size)
        .map(|start| {
            let mut runs: Vec<(usize, usize)> = Vec::new();
            for k in start..(start + size).min(total) {
                match runs.last_mut() {
                    Some((p, n)) if *p == k / per_prompt => *n += 1,
                    _ => runs.push((k / per_prompt, 1)),
                }
            }
            runs
        })
        .collect()
}

/// One call's prompts (positions in the batch) and samples per prompt: each
/// prompt once with its count when the counts agree, else one entry per sample
/// (a call that cuts through a prompt's group). Expanded as the pipeline
/// repeats them, they are the call's samples in order.
pub fn call_prompts(runs: &[(usize, usize)]) -> (Vec<usize>, usize) {
    if runs.iter().all(|r| r.1 == runs[0].1) {
        (runs.iter().map(|r| r.0).collect(), runs[0].1)
    } else {
        let each = runs
            .iter()
            .flat_map(|&(p, n)| std::iter::repeat_n(p, n))
            .collect();
        (each, 1)
    }
}

fn sample(setup: &WorkerSetup, s: &mut State, b: &PromptBatch) -> Result<Sampled, Status> {
    let c = &setup.config;
    let d = &c.policy.diffusers;
    let g = b.n_generation.max(1) as usize;
    let started = Instant::now();
    let (h, w) = (d.inference_size[0], d.inference_size[1]);
    // Cosmos-RL's NFT rollout samples `train_frames` frames.
    let frames = d.train_frames;
    let shape = s.pipeline.latent_shape(h, w, frames);
    // Every sample's initial noise (and a stochastic solver's step noise) from
    // its own seed, so a sample does not depend on how the batch is split.
    let seeds: Vec<i64> = b
        .prompts
        .iter()
        .flat_map(|p| (0..g).map(move |k| (p.index, k as u64)))
        .map(|(idx, k)| sample_seed(b.seed, b.step, idx, k))
        .collect();
    let noise: Vec<Tensor> = seeds
        .iter()
        .map(|&seed| {
            tch::manual_seed(seed);
            Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu))
        })
        .collect();
    let steps = if b.validation {
        d.sample.eval_num_steps
    } else {
        d.sample.num_steps
    };
    let calls = sampling_calls(b.prompts.len(), g, c.rollout.n_generation_mini_batch);
    let mut parts = Vec::new();
    let mut start = 0usize;
    for runs in calls {
        let n: usize = runs.iter().map(|r| r.1).sum();
        let (positions, per_prompt) = call_prompts(&runs);
        let prompts = positions
            .iter()
            .map(|&p| b.prompts[p].text.clone())
            .collect();
        tracing::debug!(samples = n, "sampling call");
        let out = s
            .pipeline
            .sample(SampleRequest {
                prompts,
                per_prompt,
                num_inference_steps: steps,
                guidance_scale: d.sample.guidance_scale,
                height: h,
                width: w,
                frames,
                sampler: Sampler::Solver(s.solver),
                init_noise: Tensor::stack(&noise[start..start + n], 0),
                noise_seeds: Some(seeds[start..start + n].to_vec()),
                max_sequence_length: d.max_prompt_length,
            })
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        parts.push(out);
        start += n;
    }
    let cat = |f: &dyn Fn(&SampleOutput) -> Tensor| {
        Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0)
    };
    let media = cat(&|o| o.media.shallow_clone());
    // diffusers' numpy_to_pil: (x * 255).round() as uint8, channels last.
    let media = (media * 255.0)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8);
    let images = if media.dim() == 5 {
        media.permute([0, 2, 3, 4, 1]) // [N, 3, T, H, W] → [N, T, H, W, 3]
    } else {
        media.permute([0, 2, 3, 1])
    }
    .contiguous()
    .to_device(Device::Cpu);
    Ok(Sampled {
        latents: cat(&|o| o.latents.shallow_clone()),
        timesteps: parts[0].timesteps.clone(),
        embeds: cat(&|o| o.prompt_embeds.shallow_clone()),
        mask: cat(&|o| o.prompt_attention_mask.shallow_clone()),
        images,
        seconds: started.elapsed().as_secs_f64(),
    })
}

impl RolloutService {
    async fn with_state<T: Send + 'static>(
        &self,
        activity: String,
        f: impl FnOnce(&mut State) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let span =
            tracing::info_span!(parent: &self.setup.trace_root, "call", activity = %activity);
        self.state.call(span, activity, f).await
    }

    /// Score requests: one for the batch, or one per prompt when prompts carry
    /// reward extras (geneval metadata differs per prompt; the gateway batches
    /// only requests whose extras are equal).
    fn score_requests(&self, b: &PromptBatch, images: &Tensor) -> Vec<ScoreRequest> {
        let g = b.n_generation.max(1) as usize;
        let size = images.size();
        let video = size.len() == 5;
        let per_prompt = b
            .prompts
            .iter()
            .any(|p| !p.metadata_json.is_empty() && p.metadata_json != "{}");
        let groups: Vec<Vec<usize>> = if per_prompt {
            (0..b.prompts.len()).map(|i| vec![i]).collect()
        } else {
            vec![(0..b.prompts.len()).collect()]
        };
        groups
            .into_iter()
            .enumerate()
            .map(|(k, idx)| {
                let first = idx[0] * g;
                let n = idx.len() * g;
                let part = images.narrow(0, first as i64, n as i64);
                // Videos go as the protocol's [B, C, T, H, W].
                let part = if video {
                    part.permute([0, 4, 1, 2, 3])
                } else {
                    part
                }
                .contiguous();
                let shape: Vec<u64> = part.size().iter().map(|&d| d as u64).collect();
                let mut data = vec![0u8; part.numel()];
                part.copy_data_u8(&mut data, part.numel());
                let prompts: Vec<(&str, u32)> = idx
                    .iter()
                    .map(|&i| (b.prompts[i].text.as_str(), g as u32))
                    .collect();
                let id = format!(
                    "{}-s{}-r{}-{}{}",
                    self.setup.run_id,
                    b.step,
                    self.setup.rank,
                    if b.validation { "val-" } else { "" },
                    k
                );
                let mut r = if video {
                    let shape = [shape[0], shape[1], shape[2], shape[3], shape[4]];
                    video_request(id, &prompts, shape, data, ROLLOUT_FPS)
                } else {
                    image_request(id, &prompts, [shape[0], shape[1], shape[2], shape[3]], data)
                };
                r.worker_id = format!("rollout-{}", self.setup.rank);
                r.step = b.step;
                r.validation = b.validation;
                if per_prompt {
                    r.extras_json = b.prompts[idx[0]].metadata_json.clone();
                }
                r
            })
            .collect()
    }
}

#[tonic::async_trait]
impl RolloutWorker for RolloutService {
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthReply>, Status> {
        let (version, state) = self
            .state
            .peek(|s, activity| (s.version.unwrap_or(0), activity.to_string()))
            .unwrap_or((0, "busy".into()));
        Ok(Response::new(HealthReply {
            role: "rollout".into(),
            rank: self.setup.rank,
            pid: std::process::id(),
            device: format!("{:?}", self.setup.device),
            weight_version: version,
            state,
        }))
    }

    async fn generate(&self, req: Request<PromptBatch>) -> Result<Response<Trajectories>, Status> {
        let b = req.into_inner();
        if b.prompts.is_empty() {
            return Err(Status::invalid_argument("an empty prompt batch"));
        }
        let setup = self.setup.clone();
        let batch = b.clone();
        let lora = setup.config.policy.lora.is_some();
        let sampled = self
            .with_state(format!("sampling step {}", b.step), move |s| {
                if lora && s.version != Some(batch.weight_version) {
                    return Err(Status::failed_precondition(format!(
                        "asked to sample with adapter version {}, but this worker holds {:?}",
                        batch.weight_version, s.version
                    )));
                }
                sample(&setup, s, &batch)
            })
            .await?;
        let reward_started = Instant::now();
        let mut scores = Vec::new();
        let mut raw: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
        let mut gateway = self.gateway.clone();
        let g = b.n_generation.max(1);
        for req in self.score_requests(&b, &sampled.images) {
            let res = gateway
                .score(req)
                .await
                .map_err(|e| Status::unavailable(format!("reward gateway: {}", e.message())))?;
            for (k, v) in &res.raw_scores {
                let e = raw.entry(k.clone()).or_default();
                e.0 += v.values.iter().map(|&x| x as f64).sum::<f64>();
                e.1 += v.values.len();
            }
            for grp in res.groups {
                let pi = b
                    .prompts
                    .iter()
                    .find(|p| {
                        p.text == grp.prompt
                            && !scores
                                .iter()
                                .any(|s: &SampleScore| s.prompt_index == p.index)
                    })
                    .map(|p| p.index)
                    .ok_or_else(|| {
                        Status::internal(format!(
                            "the gateway answered for an unknown prompt {:?}",
                            grp.prompt
                        ))
                    })?;
                if grp.rewards.len() != g as usize {
                    return Err(Status::internal(format!(
                        "the gateway answered {} rewards for a group of {g}",
                        grp.rewards.len()
                    )));
                }
                for (k, (r, a)) in grp.rewards.iter().zip(&grp.advantages).enumerate() {
                    scores.push(SampleScore {
                        prompt_index: pi,
                        generation: k as u32,
                        reward: *r,
                        advantage: *a,
                    });
                }
            }
        }
        let n = (b.prompts.len() as u32 * g) as usize;
        if scores.len() != n {
            return Err(Status::internal(format!(
                "{} scores for {n} samples",
                scores.len()
            )));
        }
        let reward_seconds = reward_started.elapsed().as_secs_f64();
        let wire = |name: &str, t: &Tensor| to_wire(name, t).map_err(internal);
        let mut tensors = Vec::new();
        if !b.validation {
            let nt = sampled.timesteps.len() as i64;
            let ts = Tensor::from_slice(
                &sampled
                    .timesteps
                    .iter()
                    .map(|&t| t as f32)
                    .collect::<Vec<_>>(),
            )
            .view([1, nt])
            .repeat([n as i64, 1]);
            tensors = vec![
                wire("latents_clean", &sampled.latents)?,
                wire("timesteps", &ts)?,
                wire("prompt_embeds", &sampled.embeds)?,
                wire("prompt_attention_mask", &sampled.mask)?,
            ];
        }
        let k = (b.return_images as i64).min(n as i64);
        let images = if k > 0 {
            Some(wire("images", &sampled.images.narrow(0, 0, k))?)
        } else {
            None
        };
        Ok(Response::new(Trajectories {
            step: b.step,
            weight_version: b.weight_version,
            scores,
            tensors,
            images,
            sample_seconds: sampled.seconds,
            reward_seconds,
            raw_score_means: raw
                .into_iter()
                .map(|(k, (s, c))| (k, s / c.max(1) as f64))
                .collect(),
        }))
    }

    async fn load_weights(
        &self,
        req: Request<Streaming<WeightChunk>>,
    ) -> Result<Response<Ack>, Status> {
        let mut stream = req.into_inner();
        let mut tensors = Vec::new();
        let mut version = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            version = Some(chunk.version);
            for t in &chunk.tensors {
                tensors.push((
                    t.name.clone(),
                    from_wire(t).map_err(|e| Status::invalid_argument(e.to_string()))?,
                ));
            }
        }
        let version = version.ok_or_else(|| Status::invalid_argument("no weight chunks"))?;
        self.with_state(format!("loading weights v{version}"), move |s| {
            let lora = s.pipeline.transformer().lora();
            let device = s.pipeline.transformer().device();
            let tensors: Vec<(String, Tensor)> = tensors
                .into_iter()
                .map(|(n, t)| (n, t.to_device(device)))
                .collect();
            lora.load_state_dict(
                ROLLOUT_ADAPTER,
                &tensors,
                std::path::Path::new("<weight update>"),
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
            s.version = Some(version);
            tracing::info!(version, "rollout adapter updated");
            Ok(())
        })
        .await?;
        Ok(Response::new(Ack {}))
    }

    async fn shutdown(&self, req: Request<ShutdownRequest>) -> Result<Response<Ack>, Status> {
        tracing::info!(reason = %req.into_inner().reason, "shutting down");
        let _ = self.stop.send(true);
        Ok(Response::new(Ack {}))
    }
}

/// Serves until Shutdown, SIGTERM or Ctrl-C.
pub async fn serve(setup: WorkerSetup, listen: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr()?;
    let gateway = GatewayClient::connect(setup.gateway.clone(), usize::MAX >> 1)
        .await
        .with_context(|| format!("connecting to the reward gateway at {}", setup.gateway))?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let s2 = setup.clone();
    let state = tokio::task::spawn_blocking(move || build_state(&s2)).await??;
    let service = RolloutService {
        setup,
        state: WorkerState::new(state),
        gateway,
        stop: stop_tx.clone(),
    };
    tracing::info!(%addr, "rollout worker serving");
    stop_on_signals(stop_tx.clone());
    tonic::transport::Server::builder()
        .add_service(
            RolloutWorkerServer::new(service)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        )
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            },
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n_generation_mini_batch` bounds every sampling call, whole groups or
    /// not, and the calls cover every sample once, in order.
    #[test]
    fn sampling_calls_hold_at_most_the_mini_batch() {
        for (prompts, g, mini) in [
            (4, 8, None),
            (4, 8, Some(8)),
            (4, 8, Some(3)),
            (3, 2, Some(4)),
            (2, 5, Some(100)),
            (1, 1, Some(1)),
        ] {
            let calls = sampling_calls(prompts, g, mini);
            let bound = mini.unwrap_or(prompts * g).min(prompts * g);
            let sizes: Vec<usize> = calls.iter().map(|c| c.iter().map(|r| r.1).sum()).collect();
            assert!(
                sizes.iter().all(|&n| n <= bound),
                "{prompts}×{g}, mini {mini:?}: {sizes:?}"
            );
            assert_eq!(calls.len(), (prompts * g).div_ceil(bound));
            let flat: Vec<usize> = calls
                .iter()
                .flatten()
                .flat_map(|&(p, n)| std::iter::repeat_n(p, n))
                .collect();
            let want: Vec<usize> = (0..prompts)
                .flat_map(|p| std::iter::repeat_n(p, g))
                .collect();
            assert_eq!(flat, want);
        }
        // 4 prompts × 8 with mini batch 3: eleven calls, the third cutting a group.
        assert_eq!(sampling_calls(4, 8, Some(3))[2], vec![(0, 2), (1, 1)]);
    }

    /// Each call's prompts, repeated as the pipeline repeats them, are its
    /// samples' prompts in order: sample k of the rollout is prompt k / g's.
    #[test]
    fn call_prompts_expand_to_the_samples_in_order() {
        let g = 4;
        for mini in [3, 4, 5, 8, 12] {
            let mut samples = Vec::new();
            for runs in sampling_calls(3, g, Some(mini)) {
                let (positions, per) = call_prompts(&runs);
                samples.extend(positions.iter().flat_map(|&p| std::iter::repeat_n(p, per)));
            }
            let want: Vec<usize> = (0..3 * g).map(|k| k / g).collect();
            assert_eq!(samples, want, "mini batch {mini}");
        }
        assert_eq!(call_prompts(&[(0, 2), (1, 2)]), (vec![0, 1], 2));
        assert_eq!(call_prompts(&[(0, 2), (1, 1)]), (vec![0, 0, 1], 1));
    }

    #[test]
    fn sample_seeds_differ_by_every_coordinate() {
        let base = sample_seed(42, 3, 17, 2);
        assert_eq!(base, sample_seed(42, 3, 17, 2));
        for other in [
            sample_seed(43, 3, 17, 2),
            sample_seed(42, 4, 17, 2),
            sample_seed(42, 3, 18, 2),
            sample_seed(42, 3, 17, 3),
        ] {
            assert_ne!(base, other);
        }
        assert!(base >= 0);
    }
}
