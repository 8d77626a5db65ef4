//! The denoising loop of diffusers' `SanaPipeline.__call__` (steps 7ff), from
//! given initial latents and caption embeddings to the final latents.

use tch::{Kind, Tensor};

use crate::models::transformers::sana_transformer::TransformerInputs;
use crate::models::SanaTransformer2DModel;
use crate::schedulers::Scheduler;
use crate::{Result, SanaError};

/// Caption conditioning: `[B, L, D]` embeddings and the `[B, L]` keep-mask.
pub struct Conditioning<'a> {
    pub embeds: &'a Tensor,
    pub mask: &'a Tensor,
}

pub struct DenoiseRequest<'a> {
    /// `[B, C, H, W]` initial noise (already scaled by `init_noise_sigma`).
    pub latents: Tensor,
    pub prompt: Conditioning<'a>,
    /// Required when `guidance_scale > 1` (classifier-free guidance).
    pub negative: Option<Conditioning<'a>>,
    pub guidance_scale: f64,
    pub num_inference_steps: usize,
}

/// Runs the loop; `on_step(i, total)` is called after each step (progress bars).
pub fn denoise(
    model: &SanaTransformer2DModel,
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
    let cfg = &model.config;
    let latent_channels = cfg.in_channels;
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
        let timestep = Tensor::from_slice(&[t as f32])
            .to_device(device)
            .expand([b], false)
            * cfg.timestep_scale;
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
        if cfg.out_channels() / 2 == latent_channels {
            pred = pred.chunk(2, 1).swap_remove(0);
        }
        latents = scheduler.step(&pred, &latents)?;
        on_step(i + 1, total);
    }
    Ok(latents)
}
