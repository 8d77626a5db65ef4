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
