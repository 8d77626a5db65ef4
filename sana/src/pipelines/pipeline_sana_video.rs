//! `diffusers/pipelines/sana_video/pipeline_sana_video.py`: text to video.
//! prompt → Gemma-2 states → the same denoising loop as images, with a time axis →
//! Wan VAE decode of `latents · std + mean` → frames.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::aspect_ratio_bins::{ASPECT_RATIO_480_BIN, ASPECT_RATIO_720_BIN};
use super::denoise::{
    check_request, denoise_prompts, encode_with_guidance, initial_latents, with_lora_scale,
    Sampler, Sampling, StepNoise,
};
use super::pipeline_sana::{classify_height_width_bin, resize_and_crop};
use super::text_encoding::{sub_folder, PromptOptions, SanaTextEncoder};
use crate::lora::AdapterFormat;
use crate::models::autoencoders::autoencoder_kl_wan::AutoencoderKLWan;
use crate::models::modeling_utils::parse_json;
use crate::models::SanaVideoTransformer3DModel;
use crate::schedulers::DPMSolverMultistepConfig;
use crate::{Result, SanaError};

/// One `SanaVideoPipeline.__call__`, with its defaults.
#[derive(Debug)]
pub struct VideoGenerateRequest {
    pub prompts: Vec<String>,
    pub negative_prompt: String,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub height: i64,
    pub width: i64,
    /// 1 + 4k (the Wan VAE's temporal factor); other counts are rounded down to it.
    pub frames: i64,
    pub num_videos_per_prompt: usize,
    pub sampler: Sampler,
    pub seed: Option<i64>,
    /// `[B, C, 1 + (frames-1)/4, H/8, W/8]` initial latents; overrides `seed`.
    pub init_noise: Option<Tensor>,
    /// One seed per sample for a stochastic solver's step noise
    /// ([`StepNoise::PerSample`]); `None` draws from the global generator.
    pub noise_seeds: Option<Vec<i64>>,
    pub use_resolution_binning: bool,
    pub prompt_options: PromptOptions,
    pub lora_scale: f64,
}

impl Default for VideoGenerateRequest {
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            negative_prompt: String::new(),
            num_inference_steps: 50,
            guidance_scale: 6.0,
            height: 480,
            width: 832,
            frames: 81,
            num_videos_per_prompt: 1,
            sampler: Sampler::Dpm,
            seed: None,
            init_noise: None,
            noise_seeds: None,
            use_resolution_binning: true,
            prompt_options: PromptOptions::video(),
            lora_scale: 1.0,
        }
    }
}

pub struct VideoGenerateOutput {
    /// `[B, 3, T, H, W]` fp32 in [0, 1] (before quantisation to 8 bits).
    pub videos: Tensor,
    /// `[B, C, T', h, w]` final latents (normalised, before `· std + mean`), fp32.
    pub latents: Tensor,
    /// The sampler's timesteps (0..1000), in order.
    pub timesteps: Vec<f64>,
    pub prompt_embeds: Tensor,
    pub prompt_attention_mask: Tensor,
}

/// diffusers' `SanaVideoPipeline` with the Wan 2.1 VAE (what the 480p model ships).
pub struct SanaVideoPipeline {
    pub text_encoder: SanaTextEncoder,
    pub transformer: SanaVideoTransformer3DModel,
    pub vae: AutoencoderKLWan,
    pub scheduler_config: PathBuf,
    pub flow_shift: f64,
}

impl SanaVideoPipeline {
    pub fn from_pretrained(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let index = dir.join("model_index.json");
        let text = std::fs::read_to_string(&index).map_err(|e| SanaError::io(&index, e))?;
        let map: serde_json::Value = parse_json(&index, &text)?;
        let class = |key: &str| -> Option<String> {
            map.get(key)?
                .as_array()?
                .get(1)?
                .as_str()
                .map(str::to_string)
        };
        if let Some(vae) = class("vae").filter(|c| c != "AutoencoderKLWan") {
            return Err(SanaError::config(
                &index,
                "vae",
                format!("{vae} is not supported for video; SANA-Video 480p uses AutoencoderKLWan"),
            ));
        }
        let scheduler_config = sub_folder(dir, "scheduler")?.join("scheduler_config.json");
        let dpm = DPMSolverMultistepConfig::from_json_file(&scheduler_config)?;
        let transformer = SanaVideoTransformer3DModel::from_pretrained(
            &sub_folder(dir, "transformer")?,
            device,
            kind,
        )?;
        // The VAE stays fp32 whatever `kind` is, as diffusers' SANA-Video example
        // loads it (`pipe.vae.to(torch.float32)`); decode casts the latents to it.
        let vae = AutoencoderKLWan::from_pretrained(&sub_folder(dir, "vae")?, device, Kind::Float)?;
        let text_encoder = SanaTextEncoder::from_pretrained(dir, device, kind)?;
        Ok(Self {
            text_encoder,
            transformer,
            vae,
            scheduler_config,
            flow_shift: dpm.flow_shift,
        })
    }

    /// `(temporal, spatial)` compression of the VAE.
    pub fn vae_scale_factors(&self) -> (i64, i64) {
        (
            self.vae.config.scale_factor_temporal.unwrap_or(4),
            self.vae.config.scale_factor_spatial.unwrap_or(8),
        )
    }

    /// Latent frames for `frames` video frames.
    pub fn latent_frames(&self, frames: i64) -> i64 {
        (frames - 1) / self.vae_scale_factors().0 + 1
    }

    /// diffusers' bins for `sample_size` 30 (480p) and 22 (720p); other sizes
    /// keep the asked size with a warning (diffusers raises).
    pub fn binned_size(&self, height: i64, width: i64) -> (i64, i64) {
        let table = match self.transformer.config.sample_size {
            30 => ASPECT_RATIO_480_BIN,
            22 => ASPECT_RATIO_720_BIN,
            other => {
                tracing::warn!(
                    sample_size = other,
                    "no video resolution bins for this sample_size; generating at the requested size"
                );
                return (height, width);
            }
        };
        classify_height_width_bin(height, width, table)
    }

    pub fn load_lora_weights(&mut self, path: &Path, adapter_name: &str) -> Result<AdapterFormat> {
        let format = self.transformer.lora.load_adapter(adapter_name, path)?;
        self.transformer.lora.set_active(adapter_name)?;
        Ok(format)
    }

    /// Text to video; `on_step(i, total)` after each denoising step.
    pub fn generate(
        &self,
        req: &VideoGenerateRequest,
        on_step: impl FnMut(usize, usize),
    ) -> Result<VideoGenerateOutput> {
        with_lora_scale(&self.transformer, req.lora_scale, || {
            self.generate_inner(req, on_step)
        })
    }

    fn generate_inner(
        &self,
        req: &VideoGenerateRequest,
        on_step: impl FnMut(usize, usize),
    ) -> Result<VideoGenerateOutput> {
        let (ft, f) = self.vae_scale_factors();
        if req.frames < 1 {
            return Err(SanaError::input(
                "frames",
                format!("{} frames: give at least 1 (1 + {ft}k)", req.frames),
            ));
        }
        if (req.frames - 1) % ft != 0 {
            tracing::warn!(
                frames = req.frames,
                made = (req.frames - 1) / ft * ft + 1,
                "frame count is not 1 + {ft}k; the VAE makes the largest such count below it"
            );
        }
        let (orig_h, orig_w) = (req.height, req.width);
        let (height, width) = if req.use_resolution_binning {
            self.binned_size(req.height, req.width)
        } else {
            (req.height, req.width)
        };
        check_request(
            &req.prompts,
            ("num_videos_per_prompt", req.num_videos_per_prompt),
            height,
            width,
            (
                f * self.transformer.config.patch_size[1],
                "the VAE factor × patch size",
            ),
        )?;
        let device = self.transformer.device();
        let do_cfg = req.guidance_scale > 1.0;
        let mut opts = req.prompt_options.clone();
        opts.num_images_per_prompt = req.num_videos_per_prompt;
        let (negative, positive) = encode_with_guidance(
            &self.text_encoder,
            &req.prompts,
            &req.negative_prompt,
            &opts,
            do_cfg,
        )?;
        let b = (req.prompts.len() * req.num_videos_per_prompt) as i64;
        let c = self.transformer.config.in_channels;
        let t = self.latent_frames(req.frames);
        let latents = initial_latents(
            &[b, c, t, height / f, width / f],
            &format!("prompts × videos, latent channels, 1 + (frames-1)/{ft}, H/{f}, W/{f}"),
            req.init_noise.as_ref(),
            req.seed,
            device,
        )?;
        let mut scheduler = req
            .sampler
            .scheduler(&self.scheduler_config, self.flow_shift)?;
        let latents = denoise_prompts(
            &self.transformer,
            scheduler.as_mut(),
            latents,
            (negative.as_ref(), &positive),
            Sampling {
                sampler: req.sampler,
                guidance_scale: req.guidance_scale,
                num_inference_steps: req.num_inference_steps,
                step_noise: StepNoise::from_seeds(req.noise_seeds.as_deref()),
            },
            on_step,
        )?;
        let videos = self.decode(&latents)?;
        let videos = if req.use_resolution_binning && (height, width) != (orig_h, orig_w) {
            resize_and_crop_video(&videos, orig_h, orig_w)
        } else {
            videos
        };
        Ok(VideoGenerateOutput {
            videos,
            latents,
            timesteps: scheduler.timesteps().to_vec(),
            prompt_embeds: positive.embeds,
            prompt_attention_mask: positive.mask,
        })
    }

    /// Normalised latents → `[B, 3, T, H, W]` in [0, 1]: diffusers casts to the VAE
    /// dtype, then `latents / (1/std) + mean`, decodes, and postprocesses.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = self.vae.denormalize(&latents.to_kind(self.vae.kind()));
        let video = tch::no_grad(|| self.vae.decode(&z))?.to_kind(Kind::Float);
        Ok((video / 2.0 + 0.5).clamp(0.0, 1.0))
    }
}

/// [`resize_and_crop`] on every frame of `[B, C, T, H, W]`.
pub fn resize_and_crop_video(videos: &Tensor, new_height: i64, new_width: i64) -> Tensor {
    let s = videos.size();
    let frames = videos
        .permute([0, 2, 1, 3, 4])
        .reshape([s[0] * s[2], s[1], s[3], s[4]]);
    resize_and_crop(&frames, new_height, new_width)
        .reshape([s[0], s[2], s[1], new_height, new_width])
        .permute([0, 2, 1, 3, 4])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{load_named, max_abs_diff, parity_case};

    #[derive(serde::Deserialize)]
    struct Case {
        prompts: Vec<String>,
        negative_prompt: String,
        steps: usize,
        guidance_scale: f64,
        sampler: String,
        height: i64,
        width: i64,
        frames: i64,
        num_videos_per_prompt: usize,
    }

    /// diffusers' SanaVideoPipeline from the same initial noise
    /// (scripts/parity/video.py): final latents and frames before quantisation.
    fn check(case: &str) {
        let dir = parity_case("pipeline_sana_video");
        let cases: std::collections::HashMap<String, Case> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        let c = &cases[case];
        let reference = load_named(&dir.join(format!("{case}.safetensors")));
        let pipe =
            SanaVideoPipeline::from_pretrained(&dir.join("pipeline"), Device::Cpu, Kind::Float)
                .unwrap();
        let req = VideoGenerateRequest {
            prompts: c.prompts.clone(),
            negative_prompt: c.negative_prompt.clone(),
            num_inference_steps: c.steps,
            guidance_scale: c.guidance_scale,
            height: c.height,
            width: c.width,
            frames: c.frames,
            num_videos_per_prompt: c.num_videos_per_prompt,
            sampler: if c.sampler == "dpm" {
                Sampler::Dpm
            } else {
                Sampler::Euler
            },
            init_noise: Some(reference["noise"].shallow_clone()),
            use_resolution_binning: false,
            ..Default::default()
        };
        let out = pipe.generate(&req, |_, _| {}).unwrap();
        let lat_err = max_abs_diff(&out.latents, &reference["latents"]);
        let vid_err = max_abs_diff(&out.videos, &reference["videos"]);
        eprintln!("video pipeline {case}: latents max abs err {lat_err:.3e}, frames {vid_err:.3e}");
        assert_eq!(out.videos.size(), reference["videos"].size());
        assert!(lat_err <= 1e-4, "{case}: latents max abs error {lat_err:e}");
        assert!(
            vid_err <= 1e-3,
            "{case}: frames max abs error {vid_err:e} > 1e-3"
        );
        crate::testing::check_departure_from_batched(&format!("video pipeline {case}"), &reference);
    }

    #[test]
    fn parity_video_dpm_cfg() {
        check("dpm_cfg");
    }

    #[test]
    fn parity_video_dpm_without_cfg_9_frames() {
        check("dpm_nocfg");
    }

    #[test]
    fn parity_video_euler_cfg() {
        check("euler_cfg");
    }

    #[test]
    fn parity_video_two_per_prompt_one_frame() {
        check("dpm_cfg_2per_prompt");
    }

    #[test]
    fn parity_video_two_per_prompt_without_cfg() {
        check("euler_nocfg_2per_prompt");
    }

    #[test]
    fn video_bins_match_diffusers() {
        // diffusers: classify_height_width_bin(480, 832, ASPECT_RATIO_480_BIN) and the 720 table.
        assert_eq!(
            classify_height_width_bin(480, 832, ASPECT_RATIO_480_BIN),
            (480, 832)
        );
        assert_eq!(
            classify_height_width_bin(720, 1280, ASPECT_RATIO_720_BIN),
            (704, 1280)
        );
    }

    #[test]
    fn bad_requests_are_clear_errors() {
        let dir = parity_case("pipeline_sana_video");
        let pipe =
            SanaVideoPipeline::from_pretrained(&dir.join("pipeline"), Device::Cpu, Kind::Float)
                .unwrap();
        let bad =
            |req: VideoGenerateRequest| pipe.generate(&req, |_, _| {}).err().unwrap().to_string();
        assert!(bad(VideoGenerateRequest::default()).contains("prompt list is empty"));
        let one = || VideoGenerateRequest {
            prompts: vec!["x".into()],
            use_resolution_binning: false,
            num_inference_steps: 1,
            ..Default::default()
        };
        let err = bad(VideoGenerateRequest { frames: 0, ..one() });
        assert!(err.contains("frames"), "{err}");
        let err = bad(VideoGenerateRequest {
            height: 60,
            width: 64,
            ..one()
        });
        assert!(err.contains("multiples of the VAE factor"), "{err}");
        let err = bad(VideoGenerateRequest {
            height: 64,
            width: 64,
            frames: 5,
            init_noise: Some(Tensor::zeros([1, 4, 1, 8, 8], (Kind::Float, Device::Cpu))),
            ..one()
        });
        assert!(
            err.contains("init_noise") && err.contains("[1, 4, 2, 8, 8]"),
            "{err}"
        );
    }
}
