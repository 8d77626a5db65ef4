//! `diffusers/pipelines/auto_pipeline.py`'s idea for SANA: the pipeline a
//! directory's `model_index.json` names (`SanaPipeline` or `SanaVideoPipeline`),
//! behind one interface for the workers. Images are the same path as videos
//! without the time axis.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::denoise::Sampler;
use super::pipeline_sana::{GenerateRequest, SanaPipeline};
use super::pipeline_sana_video::{SanaVideoPipeline, VideoGenerateRequest};
use super::text_encoding::{PromptOptions, SanaTextEncoder};
use crate::models::modeling_utils::parse_json;
use crate::models::DiffusionTransformer;
use crate::{Result, SanaError};

/// Whether `dir/model_index.json` names a `SanaVideoPipeline`.
pub fn is_video_pipeline(dir: &Path) -> Result<bool> {
    let index = dir.join("model_index.json");
    let text = std::fs::read_to_string(&index).map_err(|e| SanaError::io(&index, e))?;
    let map: serde_json::Value = parse_json(&index, &text)?;
    Ok(map.get("_class_name").and_then(|v| v.as_str()) == Some("SanaVideoPipeline"))
}

pub enum AutoPipeline {
    Image(Box<SanaPipeline>),
    Video(Box<SanaVideoPipeline>),
}

/// One sampling call of either pipeline.
pub struct SampleRequest {
    pub prompts: Vec<String>,
    pub per_prompt: usize,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub height: i64,
    pub width: i64,
    /// Video frames (ignored for images).
    pub frames: i64,
    pub sampler: Sampler,
    /// Initial latents, `[B, ...]` as [`AutoPipeline::latent_shape`] per sample.
    pub init_noise: Tensor,
    /// One seed per sample for a stochastic solver's step noise.
    pub noise_seeds: Option<Vec<i64>>,
    pub max_sequence_length: usize,
}

pub struct SampleOutput {
    /// `[B, 3, H, W]` or `[B, 3, T, H, W]` in [0, 1].
    pub media: Tensor,
    pub latents: Tensor,
    pub timesteps: Vec<f64>,
    pub prompt_embeds: Tensor,
    pub prompt_attention_mask: Tensor,
}

impl AutoPipeline {
    pub fn from_pretrained(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        Ok(if is_video_pipeline(dir)? {
            Self::Video(Box::new(SanaVideoPipeline::from_pretrained(
                dir, device, kind,
            )?))
        } else {
            Self::Image(Box::new(SanaPipeline::from_pretrained(dir, device, kind)?))
        })
    }

    pub fn is_video(&self) -> bool {
        matches!(self, Self::Video(_))
    }

    pub fn transformer(&self) -> &dyn DiffusionTransformer {
        match self {
            Self::Image(p) => &p.transformer,
            Self::Video(p) => &p.transformer,
        }
    }

    pub fn transformer_mut(&mut self) -> &mut dyn DiffusionTransformer {
        match self {
            Self::Image(p) => &mut p.transformer,
            Self::Video(p) => &mut p.transformer,
        }
    }

    pub fn text_encoder(&self) -> &SanaTextEncoder {
        match self {
            Self::Image(p) => &p.text_encoder,
            Self::Video(p) => &p.text_encoder,
        }
    }

    pub fn scheduler_config(&self) -> &Path {
        match self {
            Self::Image(p) => &p.scheduler_config,
            Self::Video(p) => &p.scheduler_config,
        }
    }

    /// The pipeline's default prompt handling (its own complex human instruction).
    pub fn prompt_options(&self, max_sequence_length: usize) -> PromptOptions {
        let base = if self.is_video() {
            PromptOptions::video()
        } else {
            PromptOptions::default()
        };
        PromptOptions {
            max_sequence_length,
            ..base
        }
    }

    /// One sample's latent shape for a request of `height × width` (binned as
    /// the pipeline bins) and `frames`.
    pub fn latent_shape(&self, height: i64, width: i64, frames: i64) -> Vec<i64> {
        match self {
            Self::Image(p) => {
                let f = p.vae_scale_factor();
                let (h, w) = p.binned_size(height, width);
                vec![p.transformer.config.in_channels, h / f, w / f]
            }
            Self::Video(p) => {
                let (_, f) = p.vae_scale_factors();
                let (h, w) = p.binned_size(height, width);
                vec![
                    p.transformer.config.in_channels,
                    p.latent_frames(frames),
                    h / f,
                    w / f,
                ]
            }
        }
    }

    pub fn sample(&self, req: SampleRequest) -> Result<SampleOutput> {
        let prompt_options = self.prompt_options(req.max_sequence_length);
        match self {
            Self::Image(p) => {
                let out = p.generate(
                    &GenerateRequest {
                        prompts: req.prompts,
                        negative_prompt: String::new(),
                        num_inference_steps: req.num_inference_steps,
                        guidance_scale: req.guidance_scale,
                        height: req.height,
                        width: req.width,
                        num_images_per_prompt: req.per_prompt,
                        sampler: req.sampler,
                        seed: None,
                        init_noise: Some(req.init_noise),
                        noise_seeds: req.noise_seeds,
                        use_resolution_binning: true,
                        prompt_options,
                        lora_scale: 1.0,
                    },
                    |_, _| {},
                )?;
                Ok(SampleOutput {
                    media: out.images,
                    latents: out.latents,
                    timesteps: out.timesteps,
                    prompt_embeds: out.prompt_embeds,
                    prompt_attention_mask: out.prompt_attention_mask,
                })
            }
            Self::Video(p) => {
                let out = p.generate(
                    &VideoGenerateRequest {
                        prompts: req.prompts,
                        negative_prompt: String::new(),
                        num_inference_steps: req.num_inference_steps,
                        guidance_scale: req.guidance_scale,
                        height: req.height,
                        width: req.width,
                        frames: req.frames,
                        num_videos_per_prompt: req.per_prompt,
                        sampler: req.sampler,
                        seed: None,
                        init_noise: Some(req.init_noise),
                        noise_seeds: req.noise_seeds,
                        use_resolution_binning: true,
                        prompt_options,
                        lora_scale: 1.0,
                    },
                    |_, _| {},
                )?;
                Ok(SampleOutput {
                    media: out.videos,
                    latents: out.latents,
                    timesteps: out.timesteps,
                    prompt_embeds: out.prompt_embeds,
                    prompt_attention_mask: out.prompt_attention_mask,
                })
            }
        }
    }

    /// Training media in [-1, 1] (`[B, 3, H, W]` or `[B, 3, T, H, W]`) → the
    /// latents the transformer learns: the DC-AE's times its scaling factor, or
    /// the Wan VAE's posterior mean normalised by `latents_mean`/`latents_std`.
    pub fn encode(&self, media: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| match self {
            Self::Image(p) => {
                let device = p.transformer.device();
                let z = p
                    .vae
                    .encode(&media.to_device(device).to_kind(p.vae.kind()))?;
                Ok((z * p.vae.scaling_factor()).to_kind(Kind::Float))
            }
            Self::Video(p) => {
                let z = p.vae.encode(media)?;
                Ok(p.vae.normalize(&z).to_kind(Kind::Float))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::solver::SolverConfig;
    use crate::testing::{max_abs_diff, parity_case, seeded_randn, unequal_prompts};

    /// Sampling two prompts of very different lengths, two samples each, in one
    /// call (as a rollout does) against each prompt alone from the same initial
    /// noise and step-noise seeds: `(worst latent difference, latents together)`.
    /// Equal when every sample conditions on its own prompt's embeddings and
    /// caption mask and draws its own noise.
    fn together_vs_alone(
        case: &str,
        frames: i64,
        guidance_scale: f64,
        sampler: Sampler,
        seeds: &[i64],
    ) -> (f64, Tensor) {
        let dir = parity_case(case);
        let pipe =
            AutoPipeline::from_pretrained(&dir.join("pipeline"), Device::Cpu, Kind::Float).unwrap();
        let prompts = unequal_prompts();
        let n = 2usize;
        let mut shape = vec![(prompts.len() * n) as i64];
        shape.extend(pipe.latent_shape(64, 96, frames));
        let noise = seeded_randn(&shape, 77);
        let req = |prompts: Vec<String>, noise: Tensor, seeds: &[i64]| SampleRequest {
            prompts,
            per_prompt: n,
            num_inference_steps: 4,
            guidance_scale,
            height: 64,
            width: 96,
            frames,
            sampler,
            init_noise: noise,
            noise_seeds: Some(seeds.to_vec()),
            max_sequence_length: 300,
        };
        let together = pipe
            .sample(req(prompts.clone(), noise.shallow_clone(), seeds))
            .unwrap()
            .latents;
        let mut worst = 0.0f64;
        for (j, p) in prompts.iter().enumerate() {
            let (at, len) = ((j * n) as i64, n as i64);
            let alone = pipe
                .sample(req(
                    vec![p.clone()],
                    noise.narrow(0, at, len),
                    &seeds[j * n..(j + 1) * n],
                ))
                .unwrap();
            worst = worst.max(max_abs_diff(&together.narrow(0, at, len), &alone.latents));
        }
        eprintln!(
            "{case}, {frames} frames, guidance {guidance_scale}, {sampler:?}: 2 prompts × {n} \
             together vs each alone, latents max abs diff {worst:.3e}"
        );
        (worst, together)
    }

    const SEEDS: [i64; 4] = [11, 12, 13, 14];

    /// Batch size changes only the kernels' summation order (~1e-6 here); a
    /// sample conditioned on another prompt's caption mask moves by O(1)
    /// (3.4 with CFG, 0.93 without, on this pipeline with diffusers' tiled mask).
    const TOL: f64 = 1e-4;

    #[test]
    fn image_prompts_together_equal_each_alone_with_cfg() {
        let (d, _) = together_vs_alone("pipeline_sana", 1, 4.5, Sampler::Dpm, &SEEDS);
        assert!(d <= TOL, "{d}");
    }

    #[test]
    fn image_prompts_together_equal_each_alone_without_cfg() {
        let (d, _) = together_vs_alone("pipeline_sana", 1, 1.0, Sampler::Euler, &SEEDS);
        assert!(d <= TOL, "{d}");
    }

    #[test]
    fn video_prompts_together_equal_each_alone_with_cfg() {
        let (d, _) = together_vs_alone("pipeline_sana_video", 5, 6.0, Sampler::Dpm, &SEEDS);
        assert!(d <= TOL, "{d}");
    }

    #[test]
    fn video_prompts_together_equal_each_alone_without_cfg() {
        let (d, _) = together_vs_alone("pipeline_sana_video", 5, 1.0, Sampler::Euler, &SEEDS);
        assert!(d <= TOL, "{d}");
    }

    /// A stochastic DiffusionNFT solver with per-sample step-noise seeds, as a
    /// rollout samples: the draws do not depend on the batch either, and other
    /// seeds give other samples (the noise is used).
    #[test]
    fn stochastic_solver_samples_do_not_depend_on_the_batch() {
        let flow = Sampler::Solver(SolverConfig::parse("flow", false, 0.7).unwrap());
        for (case, frames) in [("pipeline_sana", 1), ("pipeline_sana_video", 5)] {
            let (d, a) = together_vs_alone(case, frames, 1.0, flow, &SEEDS);
            assert!(d <= TOL, "{case}: {d}");
            let (_, b) = together_vs_alone(case, frames, 1.0, flow, &[21, 22, 23, 24]);
            let moved = max_abs_diff(&a, &b);
            eprintln!("{case}: other step-noise seeds move the samples by {moved:.3e}");
            assert!(moved > 1e-2, "{case}: {moved}");
        }
    }
}
