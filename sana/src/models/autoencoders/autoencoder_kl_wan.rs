//! `diffusers/models/autoencoders/autoencoder_kl_wan.py`: `AutoencoderKLWan`,
//! the Wan 2.1 video VAE that SANA-Video decodes with (8× space, 4× time,
//! causal in time). Video runs in chunks: encode takes the first frame alone,
//! then 4 frames at a time; decode one latent frame at a time. Every causal
//! convolution keeps the last two frames of its input between chunks (the
//! feature cache), so chunked results equal a pass over the whole clip while
//! memory holds only one chunk's activations.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::models::modeling_utils::{self, ModelConfig};
use crate::{Result, SanaError};

/// Frames of history a causal 3-tap convolution needs.
const CACHE_T: i64 = 2;

/// `config.json` of an `AutoencoderKLWan` (Wan 2.1 layout), with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLWanConfig {
    pub base_dim: i64,
    pub decoder_base_dim: Option<i64>,
    pub z_dim: i64,
    pub dim_mult: Vec<i64>,
    pub num_res_blocks: i64,
    pub attn_scales: Vec<f64>,
    /// (sic, diffusers' spelling) which encoder stages also halve time.
    pub temperal_downsample: Vec<bool>,
    pub dropout: f64,
    pub latents_mean: Vec<f64>,
    pub latents_std: Vec<f64>,
    /// Wan 2.2's residual layout; not SANA-Video's.
    pub is_residual: bool,
    pub in_channels: i64,
    pub out_channels: i64,
    /// Wan 2.2's patchified input; not SANA-Video's.
    pub patch_size: Option<i64>,
    pub scale_factor_temporal: Option<i64>,
    pub scale_factor_spatial: Option<i64>,
}

impl Default for AutoencoderKLWanConfig {
    fn default() -> Self {
        Self {
            base_dim: 96,
            decoder_base_dim: None,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: vec![],
            temperal_downsample: vec![false, true, true],
            dropout: 0.0,
            latents_mean: vec![
                -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134,
                -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
            ],
            latents_std: vec![
                2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526,
                2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
            ],
            is_residual: false,
            in_channels: 3,
            out_channels: 3,
            patch_size: None,
            scale_factor_temporal: Some(4),
            scale_factor_spatial: Some(8),
        }
    }
}

impl ModelConfig for AutoencoderKLWanConfig {
    const CLASS_NAME: &'static str = "AutoencoderKLWan";
    const KNOWN_KEYS: &'static [&'static str] = &[
        "base_dim",
        "decoder_base_dim",
        "z_dim",
        "dim_mult",
        "num_res_blocks",
        "attn_scales",
        "temperal_downsample",
        "dropout",
        "latents_mean",
        "latents_std",
        "is_residual",
        "in_channels",
        "out_channels",
        "patch_size",
        "scale_factor_temporal",
        "scale_factor_spatial",
    ];

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((k.to_string(), m));
        if self.is_residual || self.patch_size.is_some() {
            return bad(
                "is_residual",
                "the Wan 2.2 VAE layout (is_residual / patch_size) is not supported; \
                 SANA-Video uses Wan 2.1's"
                    .into(),
            );
        }
        if !self.attn_scales.is_empty() {
            return bad(
                "attn_scales",
                "must be empty (diffusers' own encoder fails with attention in down blocks)".into(),
            );
        }
        if self.dim_mult.is_empty() || self.temperal_downsample.len() + 1 != self.dim_mult.len() {
            return bad(
                "temperal_downsample",
                format!(
                    "needs one entry per stage but the last: {} for dim_mult {:?}",
                    self.dim_mult.len().saturating_sub(1),
                    self.dim_mult
                ),
            );
        }
        for (k, v) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if v.len() != self.z_dim as usize {
                return bad(
                    k,
                    format!("has {} values for z_dim {}", v.len(), self.z_dim),
                );
            }
        }
        if self.base_dim <= 0 || self.z_dim <= 0 || self.num_res_blocks < 0 {
            return bad("base_dim", "base_dim and z_dim must be positive".into());
        }
        Ok(())
    }
}

/// One causal conv's history between chunks.
enum Slot {
    Empty,
    /// The decoder's time upsampling skipped the first latent frame (diffusers' "Rep").
    Rep,
    Frames(Tensor),
}

/// The feature cache of one encode or decode call: slots in the fixed order
/// the cached layers run in, restarted at every chunk.
#[derive(Default)]
struct FeatCache {
    slots: Vec<Slot>,
    idx: usize,
}

impl FeatCache {
    fn next(&mut self) -> &mut Slot {
        if self.idx == self.slots.len() {
            self.slots.push(Slot::Empty);
        }
        self.idx += 1;
        &mut self.slots[self.idx - 1]
    }
}

fn uniform(fan_in: i64) -> nn::Init {
    let b = 1.0 / (fan_in.max(1) as f64).sqrt();
    nn::Init::Uniform { lo: -b, up: b }
}

/// `WanCausalConv3d`: time padded at the front only (or with cached frames).
#[derive(Debug)]
struct CausalConv3d {
    weight: Tensor,
    bias: Tensor,
    /// F.pad order: (W left, W right, H top, H bottom, T front, T back).
    pad: [i64; 6],
    stride: [i64; 3],
}

impl CausalConv3d {
    fn new(
        vs: nn::Path,
        cin: i64,
        cout: i64,
        k: [i64; 3],
        stride: [i64; 3],
        pad: [i64; 3],
    ) -> Self {
        let init = uniform(cin * k[0] * k[1] * k[2]);
        Self {
            weight: vs.var("weight", &[cout, cin, k[0], k[1], k[2]], init),
            bias: vs.var("bias", &[cout], init),
            pad: [pad[2], pad[2], pad[1], pad[1], 2 * pad[0], 0],
            stride,
        }
    }

    fn k3(vs: nn::Path, cin: i64, cout: i64) -> Self {
        Self::new(vs, cin, cout, [3, 3, 3], [1, 1, 1], [1, 1, 1])
    }

    fn k1(vs: nn::Path, cin: i64, cout: i64) -> Self {
        Self::new(vs, cin, cout, [1, 1, 1], [1, 1, 1], [0, 0, 0])
    }

    fn forward(&self, x: &Tensor, cache: Option<&Tensor>) -> Tensor {
        let mut pad = self.pad;
        let x = match cache {
            Some(c) if pad[4] > 0 => {
                pad[4] -= c.size()[2];
                Tensor::cat(&[c, x], 2)
            }
            _ => x.shallow_clone(),
        };
        x.constant_pad_nd(pad).conv3d(
            &self.weight,
            Some(&self.bias),
            self.stride,
            [0, 0, 0],
            [1, 1, 1],
            1,
        )
    }

    /// The generic cached rule: compute with the slot's old frames, then keep
    /// the last two frames of this input (topped up from the old slot).
    fn cached(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let slot = cache.next();
        let t = x.size()[2];
        let mut keep = x.narrow(2, (t - CACHE_T).max(0), t.min(CACHE_T)).copy();
        let old = match slot {
            Slot::Frames(prev) => Some(prev.shallow_clone()),
            _ => None,
        };
        if keep.size()[2] < CACHE_T {
            if let Some(prev) = &old {
                let last = prev.size()[2] - 1;
                keep = Tensor::cat(&[prev.narrow(2, last, 1), keep], 2);
            }
        }
        let out = self.forward(x, old.as_ref());
        *slot = Slot::Frames(keep);
        out
    }
}

/// `WanRMS_norm`: L2-normalise over channels, times √C and a learned gamma.
#[derive(Debug)]
struct RmsNorm {
    gamma: Tensor,
    scale: f64,
}

impl RmsNorm {
    fn new(vs: nn::Path, dim: i64, images: bool) -> Self {
        let shape: &[i64] = if images {
            &[dim, 1, 1]
        } else {
            &[dim, 1, 1, 1]
        };
        Self {
            gamma: vs.var("gamma", shape, nn::Init::Const(1.0)),
            scale: (dim as f64).sqrt(),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let k = x.kind();
        let xf = if matches!(k, Kind::Half | Kind::BFloat16) {
            x.to_kind(Kind::Float)
        } else {
            x.shallow_clone()
        };
        let n = xf
            .norm_scalaropt_dim(2.0, [1i64].as_slice(), true)
            .clamp_min(1e-12);
        (xf / n).to_kind(k) * self.scale * &self.gamma
    }
}

/// A 2-D conv applied to every frame (`[B, C, T, H, W]` with frames folded into the batch).
#[derive(Debug)]
struct FrameConv2d {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
}

impl FrameConv2d {
    fn new(vs: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> Self {
        let init = uniform(cin * k * k);
        Self {
            weight: vs.var("weight", &[cout, cin, k, k], init),
            bias: vs.var("bias", &[cout], init),
            stride,
            padding,
        }
    }

    fn forward_2d(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            Some(&self.bias),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }
}

/// `[B, C, T, H, W]` → `[B·T, C, H, W]`, `f`, and back.
fn per_frame(x: &Tensor, f: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
    let s = x.size();
    let (b, c, t) = (s[0], s[1], s[2]);
    let y = f(&x.permute([0, 2, 1, 3, 4]).reshape([b * t, c, s[3], s[4]]));
    let o = y.size();
    y.view([b, t, o[1], o[2], o[3]]).permute([0, 2, 1, 3, 4])
}

#[derive(Debug)]
struct ResidualBlock {
    norm1: RmsNorm,
    conv1: CausalConv3d,
    norm2: RmsNorm,
    conv2: CausalConv3d,
    shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    fn new(vs: nn::Path, cin: i64, cout: i64) -> Self {
        Self {
            norm1: RmsNorm::new(&vs / "norm1", cin, false),
            conv1: CausalConv3d::k3(&vs / "conv1", cin, cout),
            norm2: RmsNorm::new(&vs / "norm2", cout, false),
            conv2: CausalConv3d::k3(&vs / "conv2", cout, cout),
            shortcut: (cin != cout).then(|| CausalConv3d::k1(&vs / "conv_shortcut", cin, cout)),
        }
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let h = match &self.shortcut {
            Some(s) => s.forward(x, None),
            None => x.shallow_clone(),
        };
        let y = self.conv1.cached(&self.norm1.forward(x).silu(), cache);
        let y = self.conv2.cached(&self.norm2.forward(&y).silu(), cache);
        y + h
    }
}

/// Single-head self-attention within each frame (not across time).
#[derive(Debug)]
struct AttentionBlock {
    norm: RmsNorm,
    to_qkv: FrameConv2d,
    proj: FrameConv2d,
}

impl AttentionBlock {
    fn new(vs: nn::Path, dim: i64) -> Self {
        Self {
            norm: RmsNorm::new(&vs / "norm", dim, true),
            to_qkv: FrameConv2d::new(&vs / "to_qkv", dim, 3 * dim, 1, 1, 0),
            proj: FrameConv2d::new(&vs / "proj", dim, dim, 1, 1, 0),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = per_frame(x, |f| {
            let s = f.size();
            let (bt, c, h, w) = (s[0], s[1], s[2], s[3]);
            let qkv = self.to_qkv.forward_2d(&self.norm.forward(f));
            let qkv = qkv.reshape([bt, 1, 3 * c, h * w]).permute([0, 1, 3, 2]);
            let p = qkv.chunk(3, -1);
            let o = Tensor::scaled_dot_product_attention(
                &p[0],
                &p[1],
                &p[2],
                None::<Tensor>,
                0.0,
                false,
                None,
                false,
            );
            let o = o.squeeze_dim(1).permute([0, 2, 1]).reshape([bt, c, h, w]);
            self.proj.forward_2d(&o)
        });
        y + x
    }
}

#[derive(Debug)]
enum ResampleMode {
    Down2d,
    Down3d(CausalConv3d),
    Up2d,
    Up3d(CausalConv3d),
}

/// `WanResample`: spatial ×½ or ×2 per frame, with time ×½ / ×2 in the 3-D modes.
#[derive(Debug)]
struct Resample {
    conv: FrameConv2d,
    mode: ResampleMode,
}

impl Resample {
    fn down(vs: nn::Path, dim: i64, time: bool) -> Self {
        let conv = FrameConv2d::new(&vs / "resample" / 1, dim, dim, 3, 2, 0);
        let mode = if time {
            ResampleMode::Down3d(CausalConv3d::new(
                &vs / "time_conv",
                dim,
                dim,
                [3, 1, 1],
                [2, 1, 1],
                [0, 0, 0],
            ))
        } else {
            ResampleMode::Down2d
        };
        Self { conv, mode }
    }

    fn up(vs: nn::Path, dim: i64, time: bool) -> Self {
        let conv = FrameConv2d::new(&vs / "resample" / 1, dim, dim / 2, 3, 1, 1);
        let mode = if time {
            ResampleMode::Up3d(CausalConv3d::new(
                &vs / "time_conv",
                dim,
                2 * dim,
                [3, 1, 1],
                [1, 1, 1],
                [1, 0, 0],
            ))
        } else {
            ResampleMode::Up2d
        };
        Self { conv, mode }
    }

    fn spatial_down(&self, x: &Tensor) -> Tensor {
        per_frame(x, |f| {
            self.conv.forward_2d(&f.constant_pad_nd([0, 1, 0, 1]))
        })
    }

    fn spatial_up(&self, x: &Tensor) -> Tensor {
        per_frame(x, |f| {
            let s = f.size();
            let up = f
                .to_kind(Kind::Float)
                .upsample_nearest2d([2 * s[2], 2 * s[3]], Some(2.0), Some(2.0))
                .to_kind(f.kind());
            self.conv.forward_2d(&up)
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        match &self.mode {
            ResampleMode::Down2d => self.spatial_down(x),
            ResampleMode::Up2d => self.spatial_up(x),
            ResampleMode::Down3d(time_conv) => {
                let x = self.spatial_down(x);
                let slot = cache.next();
                match slot {
                    // First chunk: remember the frame, no time step yet.
                    Slot::Empty | Slot::Rep => {
                        *slot = Slot::Frames(x.copy());
                        x
                    }
                    Slot::Frames(prev) => {
                        let t = x.size()[2];
                        let keep = x.narrow(2, t - 1, 1).copy();
                        let last = prev.size()[2] - 1;
                        let y =
                            time_conv.forward(&Tensor::cat(&[prev.narrow(2, last, 1), x], 2), None);
                        *slot = Slot::Frames(keep);
                        y
                    }
                }
            }
            ResampleMode::Up3d(time_conv) => {
                let slot = cache.next();
                let x = match slot {
                    Slot::Empty => {
                        *slot = Slot::Rep;
                        x.shallow_clone()
                    }
                    _ => {
                        let s = x.size();
                        let (b, c, t) = (s[0], s[1], s[2]);
                        let mut keep = x.narrow(2, (t - CACHE_T).max(0), t.min(CACHE_T)).copy();
                        let y = match slot {
                            Slot::Frames(prev) => {
                                if keep.size()[2] < CACHE_T {
                                    let last = prev.size()[2] - 1;
                                    keep = Tensor::cat(&[prev.narrow(2, last, 1), keep], 2);
                                }
                                time_conv.forward(x, Some(prev))
                            }
                            _ => {
                                // "Rep": the second latent frame sees zeros, as in diffusers.
                                if keep.size()[2] < CACHE_T {
                                    keep = Tensor::cat(&[keep.zeros_like(), keep], 2);
                                }
                                time_conv.forward(x, None)
                            }
                        };
                        *slot = Slot::Frames(keep);
                        // [b, 2c, t, h, w] → [b, c, 2t, h, w], frames interleaved.
                        y.view([b, 2, c, t, s[3], s[4]])
                            .permute([0, 2, 3, 1, 4, 5])
                            .reshape([b, c, 2 * t, s[3], s[4]])
                    }
                };
                self.spatial_up(&x)
            }
        }
    }
}

#[derive(Debug)]
struct MidBlock {
    res0: ResidualBlock,
    attn: AttentionBlock,
    res1: ResidualBlock,
}

impl MidBlock {
    fn new(vs: nn::Path, dim: i64) -> Self {
        Self {
            res0: ResidualBlock::new(&vs / "resnets" / 0, dim, dim),
            attn: AttentionBlock::new(&vs / "attentions" / 0, dim),
            res1: ResidualBlock::new(&vs / "resnets" / 1, dim, dim),
        }
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let x = self.res0.forward(x, cache);
        let x = self.attn.forward(&x);
        self.res1.forward(&x, cache)
    }
}

#[derive(Debug)]
enum DownLayer {
    Res(ResidualBlock),
    Resample(Resample),
}

#[derive(Debug)]
struct Encoder {
    conv_in: CausalConv3d,
    down: Vec<DownLayer>,
    mid: MidBlock,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Encoder {
    fn new(vs: nn::Path, c: &AutoencoderKLWanConfig) -> Self {
        let dims: Vec<i64> = std::iter::once(1)
            .chain(c.dim_mult.iter().copied())
            .map(|m| c.base_dim * m)
            .collect();
        let n = c.dim_mult.len();
        let blocks = &vs / "down_blocks";
        let mut down = Vec::new();
        for i in 0..n {
            let (mut cin, cout) = (dims[i], dims[i + 1]);
            for _ in 0..c.num_res_blocks {
                down.push(DownLayer::Res(ResidualBlock::new(
                    &blocks / down.len(),
                    cin,
                    cout,
                )));
                cin = cout;
            }
            if i != n - 1 {
                let r = Resample::down(&blocks / down.len(), cout, c.temperal_downsample[i]);
                down.push(DownLayer::Resample(r));
            }
        }
        let top = dims[n];
        Self {
            conv_in: CausalConv3d::k3(&vs / "conv_in", c.in_channels, dims[0]),
            down,
            mid: MidBlock::new(&vs / "mid_block", top),
            norm_out: RmsNorm::new(&vs / "norm_out", top, false),
            conv_out: CausalConv3d::k3(&vs / "conv_out", top, 2 * c.z_dim),
        }
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let mut x = self.conv_in.cached(x, cache);
        for l in &self.down {
            x = match l {
                DownLayer::Res(r) => r.forward(&x, cache),
                DownLayer::Resample(r) => r.forward(&x, cache),
            };
        }
        let x = self.mid.forward(&x, cache);
        self.conv_out
            .cached(&self.norm_out.forward(&x).silu(), cache)
    }
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResidualBlock>,
    upsampler: Option<Resample>,
}

#[derive(Debug)]
struct Decoder {
    conv_in: CausalConv3d,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Decoder {
    fn new(vs: nn::Path, c: &AutoencoderKLWanConfig) -> Self {
        let base = c.decoder_base_dim.unwrap_or(c.base_dim);
        let last = *c.dim_mult.last().expect("validated config");
        let dims: Vec<i64> = std::iter::once(last)
            .chain(c.dim_mult.iter().rev().copied())
            .map(|m| base * m)
            .collect();
        let n = c.dim_mult.len();
        let time_up: Vec<bool> = c.temperal_downsample.iter().rev().copied().collect();
        let blocks = &vs / "up_blocks";
        let up = (0..n)
            .map(|i| {
                let b = &blocks / i;
                let cin = if i == 0 { dims[i] } else { dims[i] / 2 };
                let cout = dims[i + 1];
                let resnets = (0..=c.num_res_blocks)
                    .map(|j| {
                        let from = if j == 0 { cin } else { cout };
                        ResidualBlock::new(&b / "resnets" / j, from, cout)
                    })
                    .collect();
                let upsampler =
                    (i != n - 1).then(|| Resample::up(&b / "upsamplers" / 0, cout, time_up[i]));
                UpBlock { resnets, upsampler }
            })
            .collect();
        Self {
            conv_in: CausalConv3d::k3(&vs / "conv_in", c.z_dim, dims[0]),
            mid: MidBlock::new(&vs / "mid_block", dims[0]),
            up,
            norm_out: RmsNorm::new(&vs / "norm_out", dims[n], false),
            conv_out: CausalConv3d::k3(&vs / "conv_out", dims[n], c.out_channels),
        }
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let x = self.conv_in.cached(x, cache);
        let mut x = self.mid.forward(&x, cache);
        for block in &self.up {
            for r in &block.resnets {
                x = r.forward(&x, cache);
            }
            if let Some(u) = &block.upsampler {
                x = u.forward(&x, cache);
            }
        }
        self.conv_out
            .cached(&self.norm_out.forward(&x).silu(), cache)
    }
}

/// The Wan 2.1 VAE.
pub struct AutoencoderKLWan {
    pub config: AutoencoderKLWanConfig,
    pub vs: nn::VarStore,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: CausalConv3d,
    post_quant_conv: CausalConv3d,
}

impl std::fmt::Debug for AutoencoderKLWan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutoencoderKLWan")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl AutoencoderKLWan {
    pub fn new(config: AutoencoderKLWanConfig, device: Device) -> Result<Self> {
        modeling_utils::check_config(&config)?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let z = config.z_dim;
        Ok(Self {
            encoder: Encoder::new(&root / "encoder", &config),
            decoder: Decoder::new(&root / "decoder", &config),
            quant_conv: CausalConv3d::k1(&root / "quant_conv", 2 * z, 2 * z),
            post_quant_conv: CausalConv3d::k1(&root / "post_quant_conv", z, z),
            config,
            vs,
        })
    }

    pub fn from_pretrained(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config: AutoencoderKLWanConfig = modeling_utils::read_config(dir)?;
        let mut vae = Self::new(config, device)?;
        modeling_utils::load_weights(&mut vae.vs, dir)?;
        vae.vs.set_kind(kind);
        Ok(vae)
    }

    pub fn kind(&self) -> Kind {
        self.quant_conv.weight.kind()
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The posterior's parameters `[B, 2z, 1 + (T-1)/4, H/8, W/8]` (mean, then
    /// log-variance) of a video `[B, C, T, H, W]` in [-1, 1]. Frames past the
    /// last whole chunk of 4 are dropped, as diffusers does; T = 1 + 4k fits.
    pub fn encode_parameters(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.size();
        if s.len() != 5 || s[1] != self.config.in_channels || s[2] < 1 {
            return Err(SanaError::input(
                "video",
                format!(
                    "expected [B, {}, T ≥ 1, H, W], got {s:?}",
                    self.config.in_channels
                ),
            ));
        }
        let x = x.to_device(self.device()).to_kind(self.kind());
        let mut cache = FeatCache::default();
        let chunks = 1 + (s[2] - 1) / 4;
        let mut outs = Vec::with_capacity(chunks as usize);
        for i in 0..chunks {
            cache.idx = 0;
            let part = if i == 0 {
                x.narrow(2, 0, 1)
            } else {
                x.narrow(2, 1 + 4 * (i - 1), 4)
            };
            outs.push(self.encoder.forward(&part, &mut cache));
        }
        Ok(self.quant_conv.forward(&Tensor::cat(&outs, 2), None))
    }

    /// The posterior mean (what the pipelines encode with).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.encode_parameters(x)?;
        Ok(p.narrow(1, 0, self.config.z_dim))
    }

    /// A video `[B, C, 1 + 4(L-1), 8h, 8w]` in [-1, 1] from latents `[B, z, L, h, w]`,
    /// one latent frame at a time.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let s = z.size();
        if s.len() != 5 || s[1] != self.config.z_dim {
            return Err(SanaError::input(
                "latents",
                format!("expected [B, {}, L, h, w], got {s:?}", self.config.z_dim),
            ));
        }
        let z = self
            .post_quant_conv
            .forward(&z.to_device(self.device()).to_kind(self.kind()), None);
        let mut cache = FeatCache::default();
        let outs: Vec<Tensor> = (0..s[2])
            .map(|i| {
                cache.idx = 0;
                self.decoder.forward(&z.narrow(2, i, 1), &mut cache)
            })
            .collect();
        Ok(Tensor::cat(&outs, 2).clamp(-1.0, 1.0))
    }

    fn stats(&self, z: &Tensor) -> (Tensor, Tensor) {
        let shape = [1, self.config.z_dim, 1, 1, 1];
        let t = |v: &[f64]| {
            Tensor::from_slice(v)
                .to_kind(z.kind())
                .to_device(z.device())
                .view(shape)
        };
        (t(&self.config.latents_mean), t(&self.config.latents_std))
    }

    /// `(z - mean) / std`: what SANA-Video's transformer sees.
    pub fn normalize(&self, z: &Tensor) -> Tensor {
        let (mean, std) = self.stats(z);
        (z - mean) * std.reciprocal()
    }

    /// The inverse of [`Self::normalize`], before [`Self::decode`].
    pub fn denormalize(&self, z: &Tensor) -> Tensor {
        let (mean, std) = self.stats(z);
        z / std.reciprocal() + mean
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{load_named, max_abs_diff, parity_case};

    /// Against diffusers' AutoencoderKLWan (scripts/parity/video.py): encode and
    /// decode of 1, 5 and 9 frames on a tiny random VAE.
    #[test]
    fn parity_wan_vae_encode_decode() {
        let dir = parity_case("wan_vae");
        let vae = AutoencoderKLWan::from_pretrained(&dir.join("model"), Device::Cpu, Kind::Float)
            .unwrap();
        let io = load_named(&dir.join("io.safetensors"));
        for t in [1, 5, 9] {
            let x = &io[&format!("x_T{t}")];
            let params = tch::no_grad(|| vae.encode_parameters(x)).unwrap();
            let want = &io[&format!("enc_params_T{t}")];
            let e_enc = max_abs_diff(&params, want);
            let z = params.narrow(1, 0, vae.config.z_dim);
            let video = tch::no_grad(|| vae.decode(&z)).unwrap();
            let want_v = &io[&format!("dec_T{t}")];
            assert_eq!(video.size(), want_v.size());
            let e_dec = max_abs_diff(&video, want_v);
            eprintln!("wan vae, {t} frames: encode max abs err {e_enc:.2e}, decode {e_dec:.2e}");
            assert!(
                e_enc <= 1e-4 && e_dec <= 1e-4,
                "{t} frames: {e_enc} / {e_dec}"
            );
        }
        let z = Tensor::randn([1, 4, 2, 2, 2], (Kind::Float, Device::Cpu));
        let back = vae.denormalize(&vae.normalize(&z));
        assert!(max_abs_diff(&back, &z) < 1e-6);
    }

    #[test]
    fn unsupported_layouts_are_named() {
        let cfg = AutoencoderKLWanConfig {
            is_residual: true,
            ..Default::default()
        };
        let e = AutoencoderKLWan::new(cfg, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Wan 2.2"), "{e}");
        let cfg = AutoencoderKLWanConfig {
            latents_mean: vec![0.0; 3],
            ..Default::default()
        };
        let e = AutoencoderKLWan::new(cfg, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("latents_mean") && e.contains("3 values for z_dim 16"),
            "{e}"
        );
    }
}
