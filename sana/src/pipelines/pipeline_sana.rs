//! `diffusers/pipelines/sana/pipeline_sana.py`: text to image.
//! prompt → Gemma-2 states → transformer sampling loop → DC-AE decode → pixels.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::aspect_ratio_bins::{
    ASPECT_RATIO_1024_BIN, ASPECT_RATIO_2048_BIN, ASPECT_RATIO_4096_BIN, ASPECT_RATIO_512_BIN,
};
pub use super::denoise::Sampler;
use super::denoise::{
    check_request, denoise_prompts, encode_with_guidance, initial_latents, with_lora_scale,
    Sampling, StepNoise,
};
use super::text_encoding::{sub_folder, PromptOptions, SanaTextEncoder};
use crate::lora::AdapterFormat;
use crate::models::autoencoders::autoencoder_dc::AutoencoderDC;
use crate::models::modeling_utils::parse_json;
use crate::models::SanaTransformer2DModel;
use crate::schedulers::{DPMSolverMultistepConfig, Scheduler};
use crate::{Result, SanaError};

/// One `SanaPipeline.__call__`.
#[derive(Debug)]
pub struct GenerateRequest {
    pub prompts: Vec<String>,
    pub negative_prompt: String,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub height: i64,
    pub width: i64,
    pub num_images_per_prompt: usize,
    pub sampler: Sampler,
    /// Seeds the CPU generator the initial noise is drawn from (as `torch.Generator("cpu")`).
    pub seed: Option<i64>,
    /// `[B, C, h, w]` initial latents (B = prompts × images per prompt); overrides `seed`.
    pub init_noise: Option<Tensor>,
    /// One seed per sample for a stochastic solver's step noise
    /// ([`StepNoise::PerSample`]); `None` draws from the global generator.
    pub noise_seeds: Option<Vec<i64>>,
    pub use_resolution_binning: bool,
    pub prompt_options: PromptOptions,
    /// diffusers' `attention_kwargs={"scale": s}`: multiplies the active LoRA adapter's
    /// scaling for this call (no effect without an adapter).
    pub lora_scale: f64,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            negative_prompt: String::new(),
            num_inference_steps: 20,
            guidance_scale: 4.5,
            height: 1024,
            width: 1024,
            num_images_per_prompt: 1,
            sampler: Sampler::Dpm,
            seed: None,
            init_noise: None,
            noise_seeds: None,
            use_resolution_binning: true,
            prompt_options: PromptOptions::default(),
            lora_scale: 1.0,
        }
    }
}

pub struct GenerateOutput {
    /// `[B, 3, H, W]` fp32 in [0, 1] (before quantisation to 8 bits).
    pub images: Tensor,
    /// `[B, C, h, w]` final denoised latents (before the VAE), fp32.
    pub latents: Tensor,
    /// The sampler's timesteps (0..1000 scale, before `timestep_scale`), in order:
    /// what DiffusionNFT trains on.
    pub timesteps: Vec<f64>,
    /// The positive caption embeddings and mask the samples were drawn with.
    pub prompt_embeds: Tensor,
    pub prompt_attention_mask: Tensor,
}

/// diffusers' `SanaPipeline`, loaded from a `save_pretrained` directory.
pub struct SanaPipeline {
    pub text_encoder: SanaTextEncoder,
    pub transformer: SanaTransformer2DModel,
    pub vae: AutoencoderDC,
    pub scheduler_config: PathBuf,
    pub flow_shift: f64,
}

impl SanaPipeline {
    /// Loads `model_index.json`, `transformer/`, `vae/`, `text_encoder/`,
    /// `tokenizer/` and `scheduler/`; models are cast to `kind`.
    pub fn from_pretrained(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let index = dir.join("model_index.json");
        let text = std::fs::read_to_string(&index).map_err(|e| SanaError::io(&index, e))?;
        let map: serde_json::Value = parse_json(&index, &text)?;
        match map.get("_class_name").and_then(|v| v.as_str()) {
            Some("SanaPipeline") | None => {}
            Some(other) => {
                tracing::warn!(file = %index.display(), class = other, "not a SanaPipeline; loading its SANA parts anyway")
            }
        }
        let scheduler_config = sub_folder(dir, "scheduler")?.join("scheduler_config.json");
        let dpm = DPMSolverMultistepConfig::from_json_file(&scheduler_config)?;
        let transformer = SanaTransformer2DModel::from_pretrained(
            &sub_folder(dir, "transformer")?,
            device,
            kind,
        )?;
        let vae = AutoencoderDC::from_pretrained(&sub_folder(dir, "vae")?, device, kind)?;
        let text_encoder = SanaTextEncoder::from_pretrained(dir, device, kind)?;
        Ok(Self {
            text_encoder,
            transformer,
            vae,
            scheduler_config,
            flow_shift: dpm.flow_shift,
        })
    }

    pub fn vae_scale_factor(&self) -> i64 {
        self.vae.spatial_compression_ratio()
    }

    fn scheduler(&self, sampler: Sampler) -> Result<Box<dyn Scheduler>> {
        sampler.scheduler(&self.scheduler_config, self.flow_shift)
    }

    /// `(height, width)` to generate at: diffusers' resolution bins for the
    /// transformer's `sample_size`. For a size diffusers has no table for it
    /// raises; we keep the asked size and warn.
    pub fn binned_size(&self, height: i64, width: i64) -> (i64, i64) {
        let table = match self.transformer.config.sample_size {
            128 => ASPECT_RATIO_4096_BIN,
            64 => ASPECT_RATIO_2048_BIN,
            32 => ASPECT_RATIO_1024_BIN,
            16 => ASPECT_RATIO_512_BIN,
            other => {
                tracing::warn!(
                    sample_size = other,
                    "no resolution bins for this sample_size; generating at the requested size"
                );
                return (height, width);
            }
        };
        classify_height_width_bin(height, width, table)
    }

    /// diffusers' `load_lora_weights`: loads a LoRA adapter (a PEFT folder or diffusers'
    /// `pytorch_lora_weights.safetensors`) into the transformer as `adapter_name` and
    /// makes it the active one.
    pub fn load_lora_weights(&mut self, path: &Path, adapter_name: &str) -> Result<AdapterFormat> {
        let format = self.transformer.lora.load_adapter(adapter_name, path)?;
        self.transformer.lora.set_active(adapter_name)?;
        Ok(format)
    }

    /// Text to image; `on_step(i, total)` after each denoising step.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_step: impl FnMut(usize, usize),
    ) -> Result<GenerateOutput> {
        with_lora_scale(&self.transformer, req.lora_scale, || {
            self.generate_inner(req, on_step)
        })
    }

    fn generate_inner(
        &self,
        req: &GenerateRequest,
        on_step: impl FnMut(usize, usize),
    ) -> Result<GenerateOutput> {
        let (orig_h, orig_w) = (req.height, req.width);
        let (height, width) = if req.use_resolution_binning {
            self.binned_size(req.height, req.width)
        } else {
            (req.height, req.width)
        };
        let f = self.vae_scale_factor();
        check_request(
            &req.prompts,
            ("num_images_per_prompt", req.num_images_per_prompt),
            height,
            width,
            (f, "the VAE factor"),
        )?;
        let device = self.transformer.device();
        let do_cfg = req.guidance_scale > 1.0;
        let mut opts = req.prompt_options.clone();
        opts.num_images_per_prompt = req.num_images_per_prompt;
        let (negative, positive) = encode_with_guidance(
            &self.text_encoder,
            &req.prompts,
            &req.negative_prompt,
            &opts,
            do_cfg,
        )?;
        let b = (req.prompts.len() * req.num_images_per_prompt) as i64;
        let c = self.transformer.config.in_channels;
        let latents = initial_latents(
            &[b, c, height / f, width / f],
            &format!("prompts × images, latent channels, H/{f}, W/{f}"),
            req.init_noise.as_ref(),
            req.seed,
            device,
        )?;
        let mut scheduler = self.scheduler(req.sampler)?;
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
        // diffusers casts to the VAE dtype first, then divides (in that dtype).
        let z = latents.to_kind(self.vae.kind()) / self.vae.scaling_factor();
        let image = tch::no_grad(|| self.vae.decode(&z))?.to_kind(Kind::Float);
        let image = if req.use_resolution_binning && (height, width) != (orig_h, orig_w) {
            resize_and_crop(&image, orig_h, orig_w)
        } else {
            image
        };
        // PixArtImageProcessor.postprocess: denormalise [-1, 1] → [0, 1].
        let images = (image / 2.0 + 0.5).clamp(0.0, 1.0);
        Ok(GenerateOutput {
            images,
            latents,
            timesteps: scheduler.timesteps().to_vec(),
            prompt_embeds: positive.embeds,
            prompt_attention_mask: positive.mask,
        })
    }
}

/// diffusers' `classify_height_width_bin`: the bin whose aspect ratio is closest
/// (first in table order on ties).
pub fn classify_height_width_bin(height: i64, width: i64, table: &[(f64, f64, f64)]) -> (i64, i64) {
    let ar = height as f64 / width as f64;
    let mut best = table[0];
    for &entry in &table[1..] {
        if (entry.0 - ar).abs() < (best.0 - ar).abs() {
            best = entry;
        }
    }
    (best.1 as i64, best.2 as i64)
}

/// diffusers' `resize_and_crop_tensor`: bilinear resize to cover, then centre crop.
pub fn resize_and_crop(samples: &Tensor, new_height: i64, new_width: i64) -> Tensor {
    let (h, w) = (samples.size()[2], samples.size()[3]);
    if (h, w) == (new_height, new_width) {
        return samples.shallow_clone();
    }
    let ratio = (new_height as f64 / h as f64).max(new_width as f64 / w as f64);
    let (rw, rh) = ((w as f64 * ratio) as i64, (h as f64 * ratio) as i64);
    let resized = samples.upsample_bilinear2d([rh, rw], false, None, None);
    let (sx, sy) = ((rw - new_width) / 2, (rh - new_height) / 2);
    resized.narrow(2, sy, new_height).narrow(3, sx, new_width)
}

/// `[3, H, W]` in [0, 1] → 8-bit RGB PNG, rounding as diffusers' `numpy_to_pil`.
pub fn write_png(image: &Tensor, path: &Path) -> Result<()> {
    let size = image.size();
    if size.len() != 3 || size[0] != 3 {
        return Err(SanaError::input(
            "image",
            format!("expected [3, H, W], got {size:?}"),
        ));
    }
    let (h, w) = (size[1] as u32, size[2] as u32);
    let bytes = (image.to_device(Device::Cpu).to_kind(Kind::Float) * 255.0)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .permute([1, 2, 0])
        .contiguous();
    let data = Vec::<u8>::try_from(bytes.flatten(0, -1)).map_err(SanaError::Tch)?;
    let file = std::fs::File::create(path).map_err(|e| SanaError::io(path, e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let io = |e: png::EncodingError| SanaError::io(path, std::io::Error::other(e));
    enc.write_header()
        .map_err(io)?
        .write_image_data(&data)
        .map_err(io)?;
    Ok(())
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
        num_images_per_prompt: usize,
    }

    fn check(case: &str) {
        let dir = parity_case("pipeline_sana");
        let cases: std::collections::HashMap<String, Case> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        let c = &cases[case];
        let reference = load_named(&dir.join(format!("{case}.safetensors")));
        let pipe =
            SanaPipeline::from_pretrained(&dir.join("pipeline"), Device::Cpu, Kind::Float).unwrap();
        let req = GenerateRequest {
            prompts: c.prompts.clone(),
            negative_prompt: c.negative_prompt.clone(),
            num_inference_steps: c.steps,
            guidance_scale: c.guidance_scale,
            height: c.height,
            width: c.width,
            num_images_per_prompt: c.num_images_per_prompt,
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
        let img_err = max_abs_diff(&out.images, &reference["images"]);
        eprintln!("pipeline {case}: latents max abs err {lat_err:.3e}, images {img_err:.3e}");
        assert!(
            img_err <= 1e-3,
            "{case}: image max abs error {img_err:e} > 1e-3"
        );
        crate::testing::check_departure_from_batched(&format!("pipeline {case}"), &reference);
    }

    #[test]
    fn parity_dpm_cfg() {
        check("dpm_cfg");
    }

    #[test]
    fn parity_dpm_without_cfg() {
        check("dpm_nocfg");
    }

    #[test]
    fn parity_euler_cfg() {
        check("euler_cfg");
    }

    #[test]
    fn parity_euler_without_cfg() {
        check("euler_nocfg");
    }

    #[test]
    fn parity_two_images_per_prompt() {
        check("dpm_cfg_2per_prompt");
    }

    #[test]
    fn parity_two_images_per_prompt_without_cfg() {
        check("euler_nocfg_2per_prompt");
    }

    #[test]
    fn resolution_bins_match_diffusers() {
        // Expected values printed by diffusers' `PixArtImageProcessor.classify_height_width_bin`.
        assert_eq!(
            classify_height_width_bin(1024, 1024, ASPECT_RATIO_1024_BIN),
            (1024, 1024)
        );
        assert_eq!(
            classify_height_width_bin(500, 1000, ASPECT_RATIO_1024_BIN),
            (704, 1408)
        );
        assert_eq!(
            classify_height_width_bin(3000, 1000, ASPECT_RATIO_1024_BIN),
            (1728, 576)
        );
        assert_eq!(
            classify_height_width_bin(768, 1360, ASPECT_RATIO_1024_BIN),
            (768, 1344)
        );
    }

    #[test]
    fn resize_and_crop_keeps_requested_size() {
        let x = Tensor::rand([1, 3, 64, 96], (Kind::Float, Device::Cpu));
        assert_eq!(resize_and_crop(&x, 50, 60).size(), [1, 3, 50, 60]);
        assert!(resize_and_crop(&x, 64, 96).equal(&x));
    }

    #[test]
    fn bad_requests_are_clear_errors() {
        let dir = parity_case("pipeline_sana");
        let pipe =
            SanaPipeline::from_pretrained(&dir.join("pipeline"), Device::Cpu, Kind::Float).unwrap();
        let err = pipe
            .generate(&GenerateRequest::default(), |_, _| {})
            .err()
            .unwrap();
        assert!(err.to_string().contains("prompt list is empty"), "{err}");
        let req = GenerateRequest {
            prompts: vec!["x".into()],
            height: 60,
            width: 64,
            use_resolution_binning: false,
            ..Default::default()
        };
        let err = pipe.generate(&req, |_, _| {}).err().unwrap();
        assert!(
            err.to_string().contains("multiples of the VAE factor"),
            "{err}"
        );

        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("model_index.json"), "{}").unwrap();
        let err = SanaPipeline::from_pretrained(tmp.path(), Device::Cpu, Kind::Float)
            .err()
            .unwrap();
        assert!(err.to_string().contains("scheduler"), "{err}");
    }
}
