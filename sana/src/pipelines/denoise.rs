//! The denoising loop of diffusers' `SanaPipeline.__call__` (steps 7ff), from
//! given initial latents and caption embeddings to the final latents. The video
//! pipeline runs the same loop (its timestep is the raw scheduler value).

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::text_encoding::{PromptEmbeds, PromptOptions, SanaTextEncoder};

use crate::models::transformers::{DiffusionTransformer, TransformerInputs};
use crate::schedulers::solver::{SolverConfig, SolverRun};
use crate::schedulers::{scheduler_from_config_file, FlowMatchEulerDiscreteScheduler, Scheduler};
use crate::{Result, SanaError};

/// Which sampler drives the loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    /// The pipeline's own `scheduler/` config (DPM-Solver++ with flow sigmas for SANA).
    Dpm,
    /// `FlowMatchEulerDiscreteScheduler` with `shift` = the scheduler config's `flow_shift`.
    Euler,
    /// One of DiffusionNFT's rollout solvers (`schedulers::solver`) over the sigma
    /// schedule of the pipeline's own scheduler, which also gives the timesteps
    /// the transformer sees.
    Solver(SolverConfig),
}

impl Sampler {
    /// A fresh scheduler: `scheduler_config` is the pipeline's `scheduler/scheduler_config.json`.
    pub fn scheduler(self, scheduler_config: &Path, flow_shift: f64) -> Result<Box<dyn Scheduler>> {
        Ok(match self {
            Sampler::Dpm | Sampler::Solver(_) => scheduler_from_config_file(scheduler_config)?,
            Sampler::Euler => Box::new(FlowMatchEulerDiscreteScheduler::new(flow_shift)),
        })
    }

    /// The DiffusionNFT solver that replaces the scheduler's step, if any.
    pub fn solver(self) -> Option<SolverConfig> {
        match self {
            Sampler::Solver(c) => Some(c),
            _ => None,
        }
    }
}

/// How a stochastic solver draws each step's noise.
#[derive(Debug, Clone, Copy, Default)]
pub enum StepNoise<'a> {
    /// From libtorch's global generator, in step order (as `torch.randn_like`).
    #[default]
    Global,
    /// Sample `b`'s noise at step `i` from its own seed mixed with `i`: a sample's
    /// draws do not depend on which other samples share its batch (rollouts).
    PerSample(&'a [i64]),
}

impl<'a> StepNoise<'a> {
    /// Per-sample seeds when a request carries them, else the global generator.
    pub fn from_seeds(seeds: Option<&'a [i64]>) -> Self {
        seeds.map_or(StepNoise::Global, StepNoise::PerSample)
    }

    /// Standard-normal noise shaped like `like` (fp32) for step `i`.
    fn draw(&self, i: usize, like: &Tensor) -> Result<Tensor> {
        match *self {
            StepNoise::Global => Ok(like.to_kind(Kind::Float).randn_like()),
            StepNoise::PerSample(seeds) => {
                let size = like.size();
                if seeds.len() as i64 != size[0] {
                    return Err(SanaError::input(
                        "noise_seeds",
                        format!("{} seeds for a batch of {}", seeds.len(), size[0]),
                    ));
                }
                let draws: Vec<Tensor> = seeds
                    .iter()
                    .map(|&s| {
                        tch::manual_seed(step_seed(s, i));
                        Tensor::randn(&size[1..], (Kind::Float, Device::Cpu))
                    })
                    .collect();
                Ok(Tensor::stack(&draws, 0).to_device(like.device()))
            }
        }
    }
}

/// SplitMix64 of a sample's seed and a step index.
fn step_seed(seed: i64, step: usize) -> i64 {
    let mut z = (seed as u64) ^ ((step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// The timestep the transformer sees for a scheduler timestep `t` (`[B]`, 0..1000):
/// times the model's `timestep_scale`, as diffusers' pipeline feeds it. Sampling
/// and both trainers go through here, so a SANA-Sprint-style model trains on the
/// timesteps it samples with.
pub fn model_timestep(model: &dyn DiffusionTransformer, t: &Tensor) -> Tensor {
    let scale = model.timestep_scale();
    if scale == 1.0 {
        t.shallow_clone()
    } else {
        t * scale
    }
}

/// The checks both pipelines make first: a prompt, at least one sample per
/// prompt (`per_prompt` is (its name, value)), and a (binned) size that `f`
/// (named `what`: the VAE factor, times the patch size for video) divides.
pub fn check_request(
    prompts: &[String],
    per_prompt: (&str, usize),
    height: i64,
    width: i64,
    (f, what): (i64, &str),
) -> Result<()> {
    if prompts.is_empty() {
        return Err(SanaError::input(
            "prompts",
            "the prompt list is empty: give at least one prompt",
        ));
    }
    if per_prompt.1 == 0 {
        return Err(SanaError::input(per_prompt.0, "must be at least 1"));
    }
    if height <= 0 || width <= 0 || height % f != 0 || width % f != 0 {
        return Err(SanaError::input(
            "height/width",
            format!("{height}×{width} must be positive multiples of {what} {f}"),
        ));
    }
    Ok(())
}

/// How a pipeline call samples: the loop's sampler and, for a stochastic
/// solver, where its step noise comes from.
#[derive(Debug, Clone, Copy)]
pub struct Sampling<'a> {
    pub sampler: Sampler,
    pub guidance_scale: f64,
    pub num_inference_steps: usize,
    pub step_noise: StepNoise<'a>,
}

/// [`denoise`] conditioned on encoded prompts (the negative ones under CFG).
pub fn denoise_prompts(
    model: &dyn DiffusionTransformer,
    scheduler: &mut dyn Scheduler,
    latents: Tensor,
    (negative, positive): (Option<&PromptEmbeds>, &PromptEmbeds),
    sampling: Sampling<'_>,
    on_step: impl FnMut(usize, usize),
) -> Result<Tensor> {
    denoise(
        model,
        scheduler,
        DenoiseRequest {
            latents,
            prompt: Conditioning {
                embeds: &positive.embeds,
                mask: &positive.mask,
            },
            negative: negative.map(|n| Conditioning {
                embeds: &n.embeds,
                mask: &n.mask,
            }),
            guidance_scale: sampling.guidance_scale,
            num_inference_steps: sampling.num_inference_steps,
            solver: sampling.sampler.solver(),
            step_noise: sampling.step_noise,
        },
        on_step,
    )
}

/// `encode_prompt` of both pipelines: the positive embeddings and, with CFG, the
/// negative prompt's (repeated per prompt and per sample).
pub fn encode_with_guidance(
    text_encoder: &SanaTextEncoder,
    prompts: &[String],
    negative_prompt: &str,
    opts: &PromptOptions,
    do_cfg: bool,
) -> Result<(Option<PromptEmbeds>, PromptEmbeds)> {
    if do_cfg {
        let (n, p) = text_encoder.encode_prompt_with_negative(prompts, negative_prompt, opts)?;
        Ok((Some(n), p))
    } else {
        Ok((None, text_encoder.encode_prompt(prompts, opts)?))
    }
}

/// The initial latents: `init_noise` (checked against `shape`; `layout` names the
/// axes for the error) or fp32 normal noise drawn on the CPU from `seed`, as
/// diffusers' examples do with a CPU generator, so a seed gives the same noise on
/// every device.
pub fn initial_latents(
    shape: &[i64],
    layout: &str,
    init_noise: Option<&Tensor>,
    seed: Option<i64>,
    device: Device,
) -> Result<Tensor> {
    match init_noise {
        Some(n) if n.size() != shape => Err(SanaError::input(
            "init_noise",
            format!("expected {shape:?} ({layout}), got {:?}", n.size()),
        )),
        Some(n) => Ok(n.to_kind(Kind::Float).to_device(device)),
        None => {
            if let Some(seed) = seed {
                tch::manual_seed(seed);
            }
            Ok(Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_device(device))
        }
    }
}

/// The sample loop under diffusers' `attention_kwargs={"scale": s}`: the active
/// LoRA adapter's scaling is multiplied by `scale` for the call and restored after.
pub fn with_lora_scale<T>(
    model: &dyn DiffusionTransformer,
    scale: f64,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let lora = model.lora();
    let previous = lora.scale();
    lora.set_scale(scale)?;
    let out = f();
    lora.set_scale(previous)?;
    out
}

/// Caption conditioning: `[B, L, D]` embeddings and the `[B, L]` keep-mask.
pub struct Conditioning<'a> {
    pub embeds: &'a Tensor,
    pub mask: &'a Tensor,
}

pub struct DenoiseRequest<'a> {
    /// `[B, C, H, W]` (image) or `[B, C, T, H, W]` (video) initial noise (already
    /// scaled by `init_noise_sigma`).
    pub latents: Tensor,
    pub prompt: Conditioning<'a>,
    /// Required when `guidance_scale > 1` (classifier-free guidance).
    pub negative: Option<Conditioning<'a>>,
    pub guidance_scale: f64,
    pub num_inference_steps: usize,
    /// A DiffusionNFT solver stepping over the scheduler's sigmas instead of
    /// the scheduler's own step.
    pub solver: Option<SolverConfig>,
    /// Where a stochastic solver's step noise comes from.
    pub step_noise: StepNoise<'a>,
}

/// Runs the loop; `on_step(i, total)` is called after each step (progress bars).
pub fn denoise(
    model: &dyn DiffusionTransformer,
    scheduler: &mut dyn Scheduler,
    req: DenoiseRequest<'_>,
    mut on_step: impl FnMut(usize, usize),
) -> Result<Tensor> {
    let do_cfg = req.guidance_scale > 1.0;
    let (embeds, mask) = match (&req.negative, do_cfg) {
        (Some(neg), true) => (
            Tensor::cat(&[neg.embeds, req.prompt.embeds], 0),
            Tensor::cat(&[neg.mask, req.prompt.mask], 0),
        ),
        (None, true) => {
            return Err(SanaError::input(
                "negative",
                format!(
                    "guidance_scale {} > 1 needs negative caption embeddings",
                    req.guidance_scale
                ),
            ))
        }
        (_, false) => (
            req.prompt.embeds.shallow_clone(),
            req.prompt.mask.shallow_clone(),
        ),
    };
    scheduler.set_timesteps(req.num_inference_steps)?;
    let timesteps = scheduler.timesteps().to_vec();
    // Over the scheduler's sigmas (SolverRun rounds them to fp32, as
    // DiffusionNFT receives `scheduler.sigmas.float()`).
    let mut solver = req
        .solver
        .map(|c| SolverRun::new(c, scheduler.sigmas()).map(SolverRun::without_log_prob))
        .transpose()?;
    let latent_channels = model.in_channels();
    let mut latents = req.latents.to_kind(Kind::Float);
    let device = latents.device();
    let total = timesteps.len();
    for (i, &t) in timesteps.iter().enumerate() {
        let _span = tracing::debug_span!("denoise_step", step = i, t).entered();
        let input = if do_cfg {
            Tensor::cat(&[&latents, &latents], 0)
        } else {
            latents.shallow_clone()
        };
        let b = input.size()[0];
        // diffusers: t.expand(B) * timestep_scale, in the scheduler's timestep dtype (fp32).
        let timestep = model_timestep(
            model,
            &Tensor::from_slice(&[t as f32])
                .to_device(device)
                .expand([b], false),
        );
        let pred = tch::no_grad(|| {
            model.forward(&TransformerInputs {
                hidden_states: &input,
                encoder_hidden_states: &embeds,
                timestep: &timestep,
                guidance: None,
                encoder_attention_mask: Some(&mask),
            })
        })?
        .to_kind(Kind::Float);
        let mut pred = if do_cfg {
            let parts = pred.chunk(2, 0);
            &parts[0] + (&parts[1] - &parts[0]) * req.guidance_scale
        } else {
            pred
        };
        // Learned-sigma checkpoints predict twice the channels; keep the mean.
        if model.out_channels() / 2 == latent_channels {
            pred = pred.chunk(2, 1).swap_remove(0);
        }
        latents = match solver.as_mut() {
            Some(run) => {
                let noise = if run.needs_noise() {
                    Some(req.step_noise.draw(i, &latents)?)
                } else {
                    None
                };
                run.step(i, &pred, &latents, noise.as_ref())?.prev_sample
            }
            None => scheduler.step(&pred, &latents)?,
        };
        on_step(i + 1, total);
    }
    Ok(latents)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sampling loop feeds the transformer the scheduler's timestep times
    /// the model's `timestep_scale`, as diffusers does (and as training now does).
    #[test]
    fn sampling_feeds_the_scaled_timestep() {
        let spy = crate::testing::TimestepSpy::new(crate::testing::tiny_transformer(2), 0.25);
        let mut scheduler = crate::schedulers::FlowMatchEulerDiscreteScheduler::new(3.0);
        let embeds = crate::testing::seeded_randn(&[2, 5, 6], 1);
        let mask = Tensor::ones([2, 5], (Kind::Int64, Device::Cpu));
        let _latents = denoise(
            &spy,
            &mut scheduler,
            DenoiseRequest {
                latents: crate::testing::seeded_randn(&[2, 4, 4, 4], 2),
                prompt: Conditioning {
                    embeds: &embeds,
                    mask: &mask,
                },
                negative: None,
                guidance_scale: 1.0,
                num_inference_steps: 3,
                solver: None,
                step_noise: Default::default(),
            },
            |_, _| {},
        )
        .unwrap();
        let timesteps = scheduler.timesteps().to_vec();
        let seen = spy.seen_values();
        assert_eq!(seen.len(), 3 * 2);
        for (k, t) in seen.iter().enumerate() {
            let want = timesteps[k / 2] as f32 as f64 * 0.25;
            assert!(
                (t - want).abs() < 1e-3,
                "step {}: saw {t}, want {want}",
                k / 2
            );
        }
    }
}
