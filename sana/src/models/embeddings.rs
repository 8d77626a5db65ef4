//! `diffusers/models/embeddings.py`: sinusoidal timestep and 2-D position
//! embeddings, the patch embedding, and the caption projection.

use tch::{nn, Device, Kind, Tensor};

use super::layers::{Conv2d, Conv2dConfig, Linear};

/// diffusers' `get_timestep_embedding`, computed in fp32 as diffusers does.
pub fn get_timestep_embedding(
    timesteps: &Tensor,
    embedding_dim: i64,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    scale: f64,
    max_period: f64,
) -> Tensor {
    let half_dim = embedding_dim / 2;
    let exponent = Tensor::arange(half_dim, (Kind::Float, timesteps.device())) * (-max_period.ln());
    let exponent = exponent / (half_dim as f64 - downscale_freq_shift);
    let emb = exponent.exp();
    let emb = timesteps.unsqueeze(1).to_kind(Kind::Float) * emb.unsqueeze(0);
    let emb = emb * scale;
    let emb = Tensor::cat(&[emb.sin(), emb.cos()], -1);
    let emb = if flip_sin_to_cos {
        Tensor::cat(
            &[
                emb.narrow(1, half_dim, half_dim),
                emb.narrow(1, 0, half_dim),
            ],
            -1,
        )
    } else {
        emb
    };
    if embedding_dim % 2 == 1 {
        emb.pad([0, 1, 0, 0], "constant", 0.0)
    } else {
        emb
    }
}

/// diffusers' `Timesteps` (sinusoidal projection, no parameters).
#[derive(Debug, Clone, Copy)]
pub struct Timesteps {
    pub num_channels: i64,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f64,
}

impl Timesteps {
    pub fn forward(&self, timesteps: &Tensor) -> Tensor {
        get_timestep_embedding(
            timesteps,
            self.num_channels,
            self.flip_sin_to_cos,
            self.downscale_freq_shift,
            1.0,
            10000.0,
        )
    }
}

/// diffusers' `TimestepEmbedding` with SiLU: linear → silu → linear.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vs: nn::Path, in_channels: i64, time_embed_dim: i64) -> Self {
        Self {
            linear_1: Linear::new(&vs / "linear_1", in_channels, time_embed_dim, true),
            linear_2: Linear::new(&vs / "linear_2", time_embed_dim, time_embed_dim, true),
        }
    }

    pub fn forward(&self, sample: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(sample).silu())
    }

    /// Its Linears in `named_modules()` order.
    pub(crate) fn linears(&self) -> Vec<&Linear> {
        vec![&self.linear_1, &self.linear_2]
    }
}

/// diffusers' `PixArtAlphaCombinedTimestepSizeEmbeddings` without the additional
/// resolution/aspect conditions (SANA never enables them).
#[derive(Debug)]
pub struct PixArtAlphaCombinedTimestepSizeEmbeddings {
    time_proj: Timesteps,
    timestep_embedder: TimestepEmbedding,
}

pub(crate) const SANA_TIME_PROJ: Timesteps = Timesteps {
    num_channels: 256,
    flip_sin_to_cos: true,
    downscale_freq_shift: 0.0,
};

impl PixArtAlphaCombinedTimestepSizeEmbeddings {
    pub fn new(vs: nn::Path, embedding_dim: i64) -> Self {
        Self {
            time_proj: SANA_TIME_PROJ,
            timestep_embedder: TimestepEmbedding::new(
                &vs / "timestep_embedder",
                256,
                embedding_dim,
            ),
        }
    }

    pub fn forward(&self, timestep: &Tensor, hidden_kind: Kind) -> Tensor {
        let proj = self.time_proj.forward(timestep);
        self.timestep_embedder.forward(&proj.to_kind(hidden_kind))
    }

    pub(crate) fn linears(&self) -> Vec<&Linear> {
        self.timestep_embedder.linears()
    }
}

/// diffusers' `PixArtAlphaTextProjection` with the default tanh-GELU.
#[derive(Debug)]
pub struct PixArtAlphaTextProjection {
    linear_1: Linear,
    linear_2: Linear,
}

impl PixArtAlphaTextProjection {
    pub fn new(vs: nn::Path, in_features: i64, hidden_size: i64) -> Self {
        Self {
            linear_1: Linear::new(&vs / "linear_1", in_features, hidden_size, true),
            linear_2: Linear::new(&vs / "linear_2", hidden_size, hidden_size, true),
        }
    }

    pub fn forward(&self, caption: &Tensor) -> Tensor {
        self.linear_2
            .forward(&self.linear_1.forward(caption).gelu("tanh"))
    }

    pub(crate) fn linears(&self) -> Vec<&Linear> {
        vec![&self.linear_1, &self.linear_2]
    }
}

/// diffusers' `get_1d_sincos_pos_embed_from_grid` (fp64 on CPU, as diffusers).
fn sincos_1d(embed_dim: i64, pos: &Tensor) -> Tensor {
    let omega =
        Tensor::arange(embed_dim / 2, (Kind::Double, pos.device())) / (embed_dim as f64 / 2.0);
    let omega = Tensor::pow_scalar(10000f64, &omega).reciprocal();
    let out = pos.reshape([-1]).to_kind(Kind::Double).outer(&omega);
    Tensor::cat(&[out.sin(), out.cos()], 1)
}

/// diffusers' `get_2d_sincos_pos_embed` for a `(height, width)` grid: `[H*W, D]` fp32.
pub fn get_2d_sincos_pos_embed(
    embed_dim: i64,
    grid_size: (i64, i64),
    base_size: i64,
    interpolation_scale: f64,
    device: Device,
) -> Tensor {
    let (gh, gw) = grid_size;
    let opts = (Kind::Float, device);
    let grid_h = Tensor::arange(gh, opts) / (gh as f64 / base_size as f64) / interpolation_scale;
    let grid_w = Tensor::arange(gw, opts) / (gw as f64 / base_size as f64) / interpolation_scale;
    // meshgrid(grid_w, grid_h, indexing="xy"): both [H, W], first varies along W.
    let w_coords = grid_w.unsqueeze(0).expand([gh, gw], false);
    let h_coords = grid_h.unsqueeze(1).expand([gh, gw], false);
    // diffusers encodes grid[0] (the w coordinate) in the first half.
    let emb_a = sincos_1d(embed_dim / 2, &w_coords);
    let emb_b = sincos_1d(embed_dim / 2, &h_coords);
    Tensor::cat(&[emb_a, emb_b], 1).to_kind(Kind::Float)
}

/// diffusers' `PatchEmbed` as SANA configures it: conv patchify, optional
/// (non-persistent) sin-cos position embedding when `interpolation_scale` is set.
#[derive(Debug)]
pub struct PatchEmbed {
    proj: Conv2d,
    patch_size: i64,
    base_size: i64,
    interpolation_scale: Option<f64>,
    embed_dim: i64,
}

impl PatchEmbed {
    pub fn new(
        vs: nn::Path,
        sample_size: i64,
        patch_size: i64,
        in_channels: i64,
        embed_dim: i64,
        interpolation_scale: Option<f64>,
    ) -> Self {
        let proj = Conv2d::new(
            &vs / "proj",
            in_channels,
            embed_dim,
            patch_size,
            Conv2dConfig {
                stride: patch_size,
                ..Default::default()
            },
        );
        Self {
            proj,
            patch_size,
            base_size: sample_size / patch_size,
            interpolation_scale,
            embed_dim,
        }
    }

    /// `[B, C, H, W]` → `[B, (H/p)(W/p), D]`.
    pub fn forward(&self, latent: &Tensor) -> Tensor {
        let (h, w) = (
            latent.size()[2] / self.patch_size,
            latent.size()[3] / self.patch_size,
        );
        let x = self.proj.forward(latent).flatten(2, -1).transpose(1, 2);
        match self.interpolation_scale {
            None => x,
            Some(scale) => {
                // diffusers recomputes the table for any grid other than the
                // configured one; the values are the same function either way.
                let pos = get_2d_sincos_pos_embed(
                    self.embed_dim,
                    (h, w),
                    self.base_size,
                    scale,
                    latent.device(),
                )
                .unsqueeze(0);
                let kind = x.kind();
                (x + pos).to_kind(kind)
            }
        }
    }
}
