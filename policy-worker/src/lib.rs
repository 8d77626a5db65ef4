//! The policy worker: holds the trainable SANA transformer (LoRA "default" and
//! "old" for DiffusionNFT; full weights or a LoRA for SFT, with the VAE and text
//! encoder that encode its samples), its optimizer, EMA and checkpoints, and
//! runs the training steps the controller sends (`sana_rl.runtime.v1.PolicyWorker`).
//! All tensor work runs on a blocking thread; the gRPC side only moves bytes.

use std::path::PathBuf;
use std::pin::Pin;
use std::time::Instant;

use anyhow::Context;
use c10d::{Backend, ProcessGroup, Rendezvous};
use futures::Stream;
use proto::runtime::v1::policy_worker_server::{PolicyWorker, PolicyWorkerServer};
use proto::runtime::v1::*;
use proto::worker::{stop_on_signals, WorkerState};
use sana::config::runtime::{
    kind_of, lora_config, nft_trainer_config, resolve_model_dir, sft_trainer_config,
};
use sana::config::{RunConfig, RunKind};
use sana::data::image_folder::{load_batch, ImageFolder};
use sana::data::video_folder::{load_video_batch, ClipSpec, VideoFolder};
use sana::models::modeling_utils::SaveOptions;
use sana::models::transformers::load_transformer;
use sana::models::DiffusionTransformer;
use sana::pipelines::auto_pipeline::AutoPipeline;
use sana::pipelines::text_encoding::PromptOptions;
use sana::schedulers::DPMSolverMultistepConfig;
use sana::training::checkpoint::{CheckpointManager, SaveMode, TrainingState};
use sana::training::nft_trainer::{NftBatch, NftTrainer, OLD_ADAPTER, TRAINED_ADAPTER};
use sana::training::parallel::DataParallel;
use sana::training::sft::SftTimesteps;
use sana::training::sft_trainer::{SftBatch as SftTensors, SftTrainer};
use sana::training::trainable::TrainTarget;
use tch::{Device, Kind};
use tensor_wire::{take, to_wire};
use tonic::{Request, Response, Status};

/// `WeightsRequest.which` for the EMA of the trained adapter (validation).
pub const EMA_WEIGHTS: &str = "ema";
/// Marks a weight version as EMA weights, so a rollout with the training
/// adapter's version is refused while they are loaded.
pub const EMA_VERSION_BIT: u64 = 1 << 63;

/// How the controller started this worker.
#[derive(Debug, Clone)]
pub struct WorkerSetup {
    pub config: RunConfig,
    /// The config file's directory: relative paths in it are relative to it... or to the cwd.
    pub base_dir: PathBuf,
    pub rank: u32,
    /// Data-parallel ranks; above 1 they form a c10d group at `master`.
    pub world_size: u32,
    /// Rank 0's rendezvous `host:port`.
    pub master: Option<String>,
    /// The address this rank's Gloo binds and peers reach it by (None: loopback
    /// when the master is local, else this host's name).
    pub local_addr: Option<String>,
    /// Bounds every collective: a dead rank is an error within it.
    pub collective_timeout: std::time::Duration,
    pub device: Device,
    /// Optimizer-schedule length (the run's steps), for the LR schedule.
    pub total_steps: u64,
    /// The run's output directory (checkpoints under `checkpoints/`, exports under `safetensors/`).
    pub output_dir: PathBuf,
    /// Parent of the spans of every call (the process root, under the controller's).
    pub trace_root: tracing::Span,
}

/// What this worker trains.
enum Job {
    Nft {
        model: Box<dyn DiffusionTransformer>,
        trainer: Box<NftTrainer>,
    },
    /// SFT needs the VAE and text encoder too: samples are encoded here.
    Sft {
        pipeline: Box<AutoPipeline>,
        trainer: Box<SftTrainer>,
        data: SftData,
        prompts: PromptOptions,
        export: SaveOptions,
    },
}

/// SFT's local folder: images (`name.jpg`) or clips (`name.mp4`), with how to size them.
enum SftData {
    Images { folder: ImageFolder, size: i64 },
    Videos { folder: VideoFolder, clip: ClipSpec },
}

struct State {
    job: Job,
    ckpt: CheckpointManager,
}

impl State {
    fn step(&self) -> u64 {
        match &self.job {
            Job::Nft { trainer, .. } => trainer.step,
            Job::Sft { trainer, .. } => trainer.step,
        }
    }
}

/// The gRPC service.
pub struct PolicyService {
    setup: WorkerSetup,
    state: WorkerState<State>,
    stop: tokio::sync::watch::Sender<bool>,
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// Adds the trained adapter ("default": from `lora_path` or freshly initialised).
fn add_trained_adapter(
    model: &mut dyn DiffusionTransformer,
    c: &RunConfig,
    base: &std::path::Path,
) -> anyhow::Result<Option<sana::lora::LoraConfig>> {
    let Some(lora) = &c.policy.lora else {
        return Ok(None);
    };
    // Adapter init draws random numbers: seed them so every run (and a resume) starts alike.
    tch::manual_seed(c.seed() as i64);
    let lcfg = lora_config(lora)?;
    match &lora.lora_path {
        Some(p) => {
            let path = base.join(p);
            model
                .lora_mut()
                .load_adapter(TRAINED_ADAPTER, &path)
                .with_context(|| format!("policy.lora.lora_path {}", path.display()))?;
        }
        None => model.lora_mut().add_adapter(TRAINED_ADAPTER, &lcfg)?,
    }
    Ok(Some(lcfg))
}

/// Joins the other policy ranks (blocks until all have come, or the timeout).
fn data_parallel(setup: &WorkerSetup) -> anyhow::Result<DataParallel> {
    if setup.world_size <= 1 {
        return Ok(DataParallel::single());
    }
    let master = setup.master.as_deref().with_context(|| {
        format!(
            "rank {} of {}: --master host:port is required with several ranks",
            setup.rank, setup.world_size
        )
    })?;
    let (host, port) = master
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .with_context(|| format!("--master {master:?} is not host:port"))?;
    let mut rdv = Rendezvous::new(host, port, setup.rank as usize, setup.world_size as usize);
    rdv.timeout = setup.collective_timeout;
    // Gloo binds the address the controller placed us at; ranks on one host
    // meet on loopback; else this host's name (which Debian may map to 127.0.1.1).
    rdv.local_addr = match &setup.local_addr {
        Some(a) => Some(a.clone()),
        None if host == "localhost" || host.starts_with("127.") => Some("127.0.0.1".into()),
        None => None,
    };
    // Dropout draws from the generator every rank must keep in step (shared
    // shuffles and noise); a rank's slice size would move it.
    if let Some(l) = &setup.config.policy.lora {
        if l.lora_dropout > 0.0 {
            anyhow::bail!(
                "policy.lora.lora_dropout = {} with {} data-parallel ranks: dropout would \
                 put the ranks' random draws out of step; set it to 0 or use one rank",
                l.lora_dropout,
                setup.world_size
            );
        }
    }
    let backend = Backend::for_device(setup.device);
    let started = Instant::now();
    let group = ProcessGroup::new(backend, &rdv)?;
    let reduce = kind_of(&setup.config.train.fsdp_reduce_dtype)?;
    tracing::info!(
        rank = setup.rank,
        world = setup.world_size,
        %backend,
        secs = started.elapsed().as_secs_f64(),
        "joined the data-parallel group"
    );
    Ok(DataParallel::new(group, reduce, setup.device))
}

/// Builds the model, adapters and trainer (minutes for a large model: done before serving).
fn build_state(setup: &WorkerSetup) -> anyhow::Result<State> {
    let c = &setup.config;
    let model_dir = resolve_model_dir(&c.policy.model_name_or_path, &setup.base_dir)?;
    // Master weights in fp32; compute in fp32 too (mixed precision arrives with FSDP).
    let job = match c.run_kind() {
        RunKind::Nft => {
            let mut model =
                load_transformer(&model_dir.join("transformer"), setup.device, Kind::Float)
                    .with_context(|| {
                        format!("loading the transformer of {}", model_dir.display())
                    })?;
            let lcfg = add_trained_adapter(model.as_mut(), c, &setup.base_dir)?
                .context("DiffusionNFT trains a LoRA: [policy.lora] is required")?;
            model.lora_mut().add_adapter(OLD_ADAPTER, &lcfg)?;
            let mut trainer =
                NftTrainer::new(model.as_mut(), nft_trainer_config(c, setup.total_steps)?)?;
            trainer.dp = data_parallel(setup)?;
            Job::Nft {
                model,
                trainer: Box::new(trainer),
            }
        }
        RunKind::Sft => {
            let mut pipeline = AutoPipeline::from_pretrained(&model_dir, setup.device, Kind::Float)
                .with_context(|| format!("loading the pipeline {}", model_dir.display()))?;
            add_trained_adapter(pipeline.transformer_mut(), c, &setup.base_dir)?;
            let dpm = DPMSolverMultistepConfig::from_json_file(pipeline.scheduler_config())?;
            let timesteps = SftTimesteps::new(&dpm, c.policy.diffusers.train_flow_shift)?;
            let config = sft_trainer_config(c, setup.total_steps)?;
            let dp = data_parallel(setup)?;
            // Full weights over several ranks shard (FSDP) unless the config asks
            // for pure replication (dp_shard_size = 1); a LoRA replicates.
            let shard = dp.world_size() > 1
                && config.target == TrainTarget::Full
                && c.policy.parallelism.dp_shard_size != 1;
            let trainer = if shard {
                SftTrainer::new_fsdp(
                    pipeline.transformer_mut(),
                    config,
                    timesteps,
                    dp,
                    kind_of(&c.train.param_dtype)?,
                    c.train.fsdp_reshard_after_forward != "false",
                )?
            } else {
                let mut t = SftTrainer::new(pipeline.transformer_mut(), config, timesteps)?;
                t.dp = dp;
                t
            };
            let dir = setup.base_dir.join(&c.train.train_policy.dataset.local_dir);
            let d = &c.policy.diffusers;
            let data = if pipeline.is_video() {
                let folder = VideoFolder::open(&dir)?;
                let clip = ClipSpec {
                    frames: d.train_frames.max(1) as usize,
                    height: d.inference_size[0],
                    width: d.inference_size[1],
                    seed: c.seed(),
                    // A bounded pool: decoding must not starve the training threads.
                    threads: std::thread::available_parallelism()
                        .map_or(2, |n| n.get())
                        .min(4),
                };
                (folder.unpaired, SftData::Videos { folder, clip })
            } else {
                let folder = ImageFolder::open(&dir)?;
                let size = d.inference_size[0];
                (folder.unpaired, SftData::Images { folder, size })
            };
            if data.0 > 0 {
                tracing::warn!(
                    unpaired = data.0,
                    "SFT samples without their media or prompt are skipped"
                );
            }
            Job::Sft {
                prompts: pipeline.prompt_options(d.max_prompt_length),
                pipeline: Box::new(pipeline),
                trainer: Box::new(trainer),
                data: data.1,
                export: SaveOptions {
                    kind: Some(kind_of(&c.train.param_dtype)?),
                    ..Default::default()
                },
            }
        }
    };
    let mode = if c.train.ckpt.save_mode == "sync" {
        SaveMode::Sync
    } else {
        SaveMode::Async
    };
    let keep = if c.train.ckpt.max_keep < 0 {
        0
    } else {
        c.train.ckpt.max_keep as usize
    };
    let ckpt = CheckpointManager::new(setup.output_dir.join("checkpoints"), mode, keep);
    Ok(State { job, ckpt })
}

impl PolicyService {
    pub fn new(setup: WorkerSetup, stop: tokio::sync::watch::Sender<bool>) -> anyhow::Result<Self> {
        let started = Instant::now();
        let state = build_state(&setup)?;
        tracing::info!(
            rank = setup.rank,
            device = ?setup.device,
            secs = started.elapsed().as_secs_f64(),
            "policy worker ready"
        );
        Ok(Self {
            setup,
            state: WorkerState::new(state),
            stop,
        })
    }

    /// Runs `f` on the state on a blocking thread.
    async fn with_state<T: Send + 'static>(
        &self,
        activity: String,
        f: impl FnOnce(&mut State) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let span =
            tracing::info_span!(parent: &self.setup.trace_root, "call", activity = %activity);
        self.state.call(span, activity, f).await
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl PolicyWorker for PolicyService {
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthReply>, Status> {
        // try_lock: a busy worker is healthy; say what it is doing.
        let (version, state) = self
            .state
            .peek(|s, activity| (s.step(), activity.to_string()))
            .unwrap_or((0, "busy".into()));
        Ok(Response::new(HealthReply {
            role: "policy".into(),
            rank: self.setup.rank,
            pid: std::process::id(),
            device: format!("{:?}", self.setup.device),
            weight_version: version,
            state,
        }))
    }

    async fn train_nft(&self, req: Request<TrainBatch>) -> Result<Response<StepResult>, Status> {
        let req = req.into_inner();
        let device = self.setup.device;
        let step = req.step;
        self.with_state(format!("training step {step}"), move |s| {
            let Job::Nft { model, trainer } = &mut s.job else {
                return Err(Status::failed_precondition(
                    "this worker runs SFT, not DiffusionNFT",
                ));
            };
            if step != trainer.step + 1 {
                return Err(Status::failed_precondition(format!(
                    "asked to train step {step}, but this worker has done {} steps",
                    trainer.step
                )));
            }
            let t = |name: &str| {
                take(&req.tensors, name)
                    .map(|x| x.to_device(device))
                    .map_err(|e| Status::invalid_argument(e.to_string()))
            };
            let batch = NftBatch {
                latents_clean: t("latents_clean")?,
                timesteps: t("timesteps")?,
                prompt_embeds: t("prompt_embeds")?.to_kind(model.kind()),
                prompt_attention_mask: t("prompt_attention_mask")?,
                advantages: t("advantages")?,
            };
            let started = Instant::now();
            let m = trainer
                .train_step(model.as_ref(), &batch)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            Ok(Response::new(StepResult {
                step: m.step,
                metrics_json: serde_json::to_string(&m).map_err(internal)?,
                skipped: 0,
                seconds: started.elapsed().as_secs_f64(),
            }))
        })
        .await
    }

    async fn train_sft(&self, req: Request<SftBatch>) -> Result<Response<StepResult>, Status> {
        let req = req.into_inner();
        let step = req.step;
        self.with_state(format!("training step {step}"), move |s| {
            let Job::Sft {
                pipeline,
                trainer,
                data,
                prompts,
                ..
            } = &mut s.job
            else {
                return Err(Status::failed_precondition(
                    "this worker runs DiffusionNFT, not SFT",
                ));
            };
            if step != trainer.step + 1 {
                return Err(Status::failed_precondition(format!(
                    "asked to train step {step}, but this worker has done {} steps",
                    trainer.step
                )));
            }
            let started = Instant::now();
            let indices: Vec<usize> = req.indices.iter().map(|&i| i as usize).collect();
            let (media, texts, skipped) = match data {
                SftData::Images { folder, size } => load_batch(folder, &indices, *size),
                SftData::Videos { folder, clip } => {
                    // Each step cuts its own windows, the same again on a resume.
                    let spec = ClipSpec {
                        seed: clip.seed ^ step.wrapping_mul(0x2545_F491_4F6C_DD1D),
                        ..*clip
                    };
                    load_video_batch(folder, &indices, &spec)
                }
            };
            let Some(media) = media else {
                return Err(Status::data_loss(format!(
                    "step {step}: none of the {} samples could be read (see the worker log)",
                    indices.len()
                )));
            };
            // Encoders frozen, in no_grad (AutoPipeline::encode: the VAE's latents as
            // the transformer learns them).
            let (latents, emb) = tch::no_grad(|| -> sana::Result<_> {
                let latents = pipeline.encode(&media)?;
                let emb = pipeline.text_encoder().encode_prompt(&texts, prompts)?;
                Ok((latents, emb))
            })
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let batch = SftTensors {
                latents,
                prompt_embeds: emb.embeds.to_kind(pipeline.transformer().kind()),
                prompt_attention_mask: emb.mask,
            };
            let m = trainer
                .train_step(pipeline.transformer(), &batch)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            Ok(Response::new(StepResult {
                step: m.step,
                metrics_json: serde_json::to_string(&m).map_err(internal)?,
                skipped: skipped as u32,
                seconds: started.elapsed().as_secs_f64(),
            }))
        })
        .await
    }

    type GetWeightsStream = ChunkStream;

    async fn get_weights(
        &self,
        req: Request<WeightsRequest>,
    ) -> Result<Response<Self::GetWeightsStream>, Status> {
        let which = req.into_inner().which;
        if which != OLD_ADAPTER && which != EMA_WEIGHTS {
            return Err(Status::invalid_argument(format!(
                "weights {which:?}: this worker serves \"{OLD_ADAPTER}\" (the rollout adapter) \
                 and \"{EMA_WEIGHTS}\" (the trained adapter's EMA, for validation)"
            )));
        }
        let chunk = self
            .with_state("sending weights".into(), move |s| {
                let Job::Nft { model, trainer } = &s.job else {
                    return Err(Status::failed_precondition(
                        "an SFT worker has no rollout adapter",
                    ));
                };
                // The EMA weights (the trained ones when EMA is off), as Cosmos-RL
                // validates with; copied out while they are swapped in.
                let named = if which == EMA_WEIGHTS {
                    trainer.params.with_ema_weights(|| {
                        model.lora().state_dict(TRAINED_ADAPTER).map(|v| {
                            v.into_iter()
                                .map(|(n, t)| (n, t.copy()))
                                .collect::<Vec<_>>()
                        })
                    })
                } else {
                    model.lora().state_dict(OLD_ADAPTER)
                }
                .map_err(internal)?;
                let tensors = named
                    .iter()
                    .map(|(n, t)| to_wire(n, t))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(internal)?;
                let version = if which == EMA_WEIGHTS {
                    trainer.step | EMA_VERSION_BIT
                } else {
                    trainer.step
                };
                Ok(WeightChunk {
                    version,
                    chunk: 0,
                    num_chunks: 1,
                    tensors,
                })
            })
            .await?;
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(chunk)]))))
    }

    async fn checkpoint(
        &self,
        req: Request<CheckpointRequest>,
    ) -> Result<Response<CheckpointReply>, Status> {
        let req = req.into_inner();
        let out = self.setup.output_dir.clone();
        let rank0 = self.setup.rank == 0;
        self.with_state(format!("checkpointing step {}", req.step), move |s| {
            // Every rank holds the same weights, so rank 0 writes; sharded
            // (FSDP) ranks all take part in gathering them.
            let sharded = matches!(&s.job, Job::Sft { trainer, .. } if trainer.fsdp.is_some());
            if !rank0 && !sharded {
                return Ok(Response::new(CheckpointReply::default()));
            }
            let data: serde_json::Value = if req.controller_state_json.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_str(&req.controller_state_json)
                    .map_err(|e| Status::invalid_argument(format!("controller_state_json: {e}")))?
            };
            let state: TrainingState = match &s.job {
                Job::Nft { model, trainer } => {
                    trainer.state(model.as_ref(), data).map_err(internal)?
                }
                Job::Sft { trainer, .. } => trainer.state(data).map_err(internal)?,
            };
            if rank0 {
                s.ckpt.save(&state).map_err(internal)?;
                if req.wait {
                    s.ckpt.wait().map_err(internal)?;
                }
            }
            let path = s
                .ckpt
                .root()
                .join(sana::training::checkpoint::step_dir_name(state.step));
            let mut export_path = String::new();
            if req.export {
                let dir = out.join("safetensors").join(format!("step_{}", state.step));
                match &s.job {
                    Job::Nft { model, trainer } if rank0 => {
                        trainer.export_adapter(model.as_ref(), &dir)
                    }
                    Job::Nft { .. } => Ok(()),
                    // Full weights: a diffusers transformer/ folder in param_dtype.
                    Job::Sft {
                        pipeline,
                        trainer,
                        export,
                        ..
                    } => {
                        let target = if pipeline.transformer().lora().adapter_names().is_empty() {
                            dir.join("transformer")
                        } else {
                            dir.clone()
                        };
                        trainer.export(pipeline.transformer(), &target, export)
                    }
                }
                .map_err(internal)?;
                export_path = dir.display().to_string();
            }
            Ok(Response::new(CheckpointReply {
                path: path.display().to_string(),
                export_path,
            }))
        })
        .await
    }

    async fn resume(&self, _: Request<ResumeRequest>) -> Result<Response<ResumeReply>, Status> {
        self.with_state("resuming".into(), move |s| {
            let Some(r) = s
                .ckpt
                .load_latest()
                .map_err(|e| Status::data_loss(e.to_string()))?
            else {
                return Ok(Response::new(ResumeReply::default()));
            };
            let data = match &mut s.job {
                Job::Nft { model, trainer } => trainer.restore(model.as_ref(), r.state, &r.path),
                Job::Sft { trainer, .. } => trainer.restore(r.state, &r.path),
            }
            .map_err(|e| Status::data_loss(e.to_string()))?;
            Ok(Response::new(ResumeReply {
                found: true,
                step: s.step(),
                controller_state_json: data.to_string(),
                path: r.path.display().to_string(),
                skipped: r
                    .skipped
                    .iter()
                    .map(|(p, why)| format!("{}: {why}", p.display()))
                    .collect(),
            }))
        })
        .await
    }

    async fn shutdown(&self, req: Request<ShutdownRequest>) -> Result<Response<Ack>, Status> {
        tracing::info!(reason = %req.into_inner().reason, "shutting down");
        self.with_state("shutting down".into(), |s| {
            s.ckpt.wait().map_err(internal)?;
            Ok(())
        })
        .await?;
        let _ = self.stop.send(true);
        Ok(Response::new(Ack {}))
    }
}

/// Serves until Shutdown, SIGTERM or Ctrl-C. Binds before building the model so
/// the controller sees the port early; calls wait until the model is ready.
pub async fn serve(setup: WorkerSetup, listen: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr()?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let stop2 = stop_tx.clone();
    let service = tokio::task::spawn_blocking(move || PolicyService::new(setup, stop2)).await??;
    tracing::info!(%addr, "policy worker serving");
    stop_on_signals(stop_tx);
    tonic::transport::Server::builder()
        .add_service(
            PolicyWorkerServer::new(service)
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
