//! `diffusers/models/autoencoders/autoencoder_dc.py`: `AutoencoderDC`, the deep
//! compression autoencoder (DC-AE) of SANA (`mit-han-lab/dc-ae-f32c32-sana-1.0/1.1`)
//! and the DC-AE in/mix family, with diffusers' tiled encode/decode.
//!
//! Latents are raw: `encode` returns diffusers' `encode(x).latent` and `decode` takes
//! what diffusers' `decode` takes. A diffusion pipeline multiplies encoded latents by
//! [`AutoencoderDC::scaling_factor`] and divides denoised latents by it before `decode`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::models::layers::{BatchNorm2d, Conv2d, Conv2dConfig, Linear};
use crate::models::modeling_utils::{self, ModelConfig};
use crate::models::normalization::RMSNorm;
use crate::models::transformers::sana_transformer::GLUMBConv;
use crate::{Result, SanaError};

/// A config value that diffusers accepts either once for all stages or per stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The per-stage values; `Err` when a list has the wrong length.
    fn per_stage(&self, stages: usize) -> std::result::Result<Vec<T>, String> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); stages]),
            OneOrMany::Many(v) if v.len() == stages => Ok(v.clone()),
            OneOrMany::Many(v) => Err(format!("has {} entries for {stages} stages", v.len())),
        }
    }
}

/// `config.json` of an `AutoencoderDC`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoencoderDCConfig {
    pub in_channels: i64,
    pub latent_channels: i64,
    pub attention_head_dim: i64,
    /// `"ResBlock"` or `"EfficientViTBlock"`, once or per stage.
    pub encoder_block_types: OneOrMany<String>,
    pub decoder_block_types: OneOrMany<String>,
    pub encoder_block_out_channels: Vec<i64>,
    pub decoder_block_out_channels: Vec<i64>,
    pub encoder_layers_per_block: Vec<i64>,
    pub decoder_layers_per_block: Vec<i64>,
    /// Kernel sizes of the extra multiscale q/k/v projections, per stage.
    pub encoder_qkv_multiscales: Vec<Vec<i64>>,
    pub decoder_qkv_multiscales: Vec<Vec<i64>>,
    /// `"interpolate"` (nearest ×2 then conv); anything else is pixel shuffle, as in diffusers.
    pub upsample_block_type: String,
    /// `"pixel_unshuffle"`; anything else (SANA: `"Conv"`) is a stride-2 conv, as in diffusers.
    pub downsample_block_type: String,
    /// `"rms_norm"` or `"batch_norm"`, once or per stage.
    pub decoder_norm_types: OneOrMany<String>,
    /// `silu`/`swish`, `relu`, `gelu`, `mish`, once or per stage; `null` entries are identity.
    pub decoder_act_fns: OneOrMany<Option<String>>,
    pub encoder_out_shortcut: bool,
    pub decoder_in_shortcut: bool,
    pub decoder_conv_act_fn: String,
    /// Used by pipelines (latents are multiplied by it after encoding), not by the model.
    pub scaling_factor: f64,
}

impl Default for AutoencoderDCConfig {
    fn default() -> Self {
        let stages = |v: &[&[i64]]| v.iter().map(|s| s.to_vec()).collect::<Vec<_>>();
        Self {
            in_channels: 3,
            latent_channels: 32,
            attention_head_dim: 32,
            encoder_block_types: OneOrMany::One("ResBlock".into()),
            decoder_block_types: OneOrMany::One("ResBlock".into()),
            encoder_block_out_channels: vec![128, 256, 512, 512, 1024, 1024],
            decoder_block_out_channels: vec![128, 256, 512, 512, 1024, 1024],
            encoder_layers_per_block: vec![2, 2, 2, 3, 3, 3],
            decoder_layers_per_block: vec![3, 3, 3, 3, 3, 3],
            encoder_qkv_multiscales: stages(&[&[], &[], &[], &[5], &[5], &[5]]),
            decoder_qkv_multiscales: stages(&[&[], &[], &[], &[5], &[5], &[5]]),
            upsample_block_type: "pixel_shuffle".into(),
            downsample_block_type: "pixel_unshuffle".into(),
            decoder_norm_types: OneOrMany::One("rms_norm".into()),
            decoder_act_fns: OneOrMany::One(Some("silu".into())),
            encoder_out_shortcut: true,
            decoder_in_shortcut: true,
            decoder_conv_act_fn: "relu".into(),
            scaling_factor: 1.0,
        }
    }
}

impl AutoencoderDCConfig {
    /// The published `mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers` config.
    pub fn sana() -> Self {
        let types = OneOrMany::Many(
            [
                "ResBlock",
                "ResBlock",
                "ResBlock",
                "EfficientViTBlock",
                "EfficientViTBlock",
                "EfficientViTBlock",
            ]
            .map(String::from)
            .to_vec(),
        );
        Self {
            encoder_block_types: types.clone(),
            decoder_block_types: types,
            downsample_block_type: "Conv".into(),
            upsample_block_type: "interpolate".into(),
            scaling_factor: 0.41407,
            ..Default::default()
        }
    }

    fn encoder_stages(&self) -> usize {
        self.encoder_block_out_channels.len()
    }

    fn decoder_stages(&self) -> usize {
        self.decoder_block_out_channels.len()
    }
}

/// Which block a stage stacks.
#[derive(Debug, Clone, Copy, PartialEq)]
enum BlockType {
    Res,
    EfficientViT,
}

fn parse_block_type(s: &str) -> std::result::Result<BlockType, String> {
    match s {
        "ResBlock" => Ok(BlockType::Res),
        "EfficientViTBlock" => Ok(BlockType::EfficientViT),
        _ => Err(format!(
            "block type {s:?} is not supported (ResBlock, EfficientViTBlock)"
        )),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum NormType {
    Rms,
    Batch,
}

fn parse_norm_type(s: &str) -> std::result::Result<NormType, String> {
    match s {
        "rms_norm" => Ok(NormType::Rms),
        "batch_norm" => Ok(NormType::Batch),
        // diffusers builds it, but applies it to NCHW unpermuted, i.e. over the width.
        "layer_norm" => {
            Err("layer_norm is not supported: diffusers applies it over the image width".into())
        }
        _ => Err(format!(
            "norm type {s:?} is not supported (rms_norm, batch_norm)"
        )),
    }
}

/// diffusers' `get_activation` (case-insensitive), plus identity for a `null` entry.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Act {
    Silu,
    Relu,
    Gelu,
    Mish,
    Identity,
}

impl Act {
    fn parse(s: Option<&str>) -> std::result::Result<Self, String> {
        let Some(s) = s else { return Ok(Act::Identity) };
        match s.to_lowercase().as_str() {
            "silu" | "swish" => Ok(Act::Silu),
            "relu" => Ok(Act::Relu),
            "gelu" => Ok(Act::Gelu),
            "mish" => Ok(Act::Mish),
            _ => Err(format!(
                "activation {s:?} is not supported (silu, swish, relu, gelu, mish)"
            )),
        }
    }

    fn forward(self, xs: &Tensor) -> Tensor {
        match self {
            Act::Silu => xs.silu(),
            Act::Relu => xs.relu(),
            Act::Gelu => xs.gelu("none"),
            Act::Mish => xs.mish(),
            Act::Identity => xs.shallow_clone(),
        }
    }
}

/// Per-stage settings, parsed once from a validated config.
struct Stage {
    block: BlockType,
    channels: i64,
    layers: i64,
    qkv_multiscales: Vec<i64>,
    norm: NormType,
    act: Act,
}

type Check = std::result::Result<(), (String, String)>;

fn positive(key: &str, v: i64) -> Check {
    if v <= 0 {
        return Err((key.into(), format!("must be positive, got {v}")));
    }
    Ok(())
}

fn key_err(key: &str) -> impl Fn(String) -> (String, String) + '_ {
    move |msg| (key.to_string(), msg)
}

impl AutoencoderDCConfig {
    fn encoder_plan(&self) -> std::result::Result<Vec<Stage>, (String, String)> {
        let n = self.encoder_stages();
        let types = self
            .encoder_block_types
            .per_stage(n)
            .map_err(key_err("encoder_block_types"))?;
        plan(
            "encoder",
            &self.encoder_block_out_channels,
            &self.encoder_layers_per_block,
            &self.encoder_qkv_multiscales,
            &types,
            // diffusers' encoder always uses RMSNorm and SiLU.
            &vec![Some("rms_norm".to_string()); n],
            &vec![Some("silu".to_string()); n],
            self.attention_head_dim,
        )
    }

    fn decoder_plan(&self) -> std::result::Result<Vec<Stage>, (String, String)> {
        let n = self.decoder_stages();
        let types = self
            .decoder_block_types
            .per_stage(n)
            .map_err(key_err("decoder_block_types"))?;
        let norms = self
            .decoder_norm_types
            .per_stage(n)
            .map_err(key_err("decoder_norm_types"))?;
        let acts = match &self.decoder_act_fns {
            // diffusers indexes a bare null and fails.
            OneOrMany::One(None) => {
                return Err((
                    "decoder_act_fns".into(),
                    "must be a string or a list".into(),
                ))
            }
            a => a.per_stage(n).map_err(key_err("decoder_act_fns"))?,
        };
        plan(
            "decoder",
            &self.decoder_block_out_channels,
            &self.decoder_layers_per_block,
            &self.decoder_qkv_multiscales,
            &types,
            &norms.into_iter().map(Some).collect::<Vec<_>>(),
            &acts,
            self.attention_head_dim,
        )
    }
}

/// Checks one side's per-stage lists and returns the parsed stages.
#[allow(clippy::too_many_arguments)]
fn plan(
    side: &str,
    channels: &[i64],
    layers: &[i64],
    multiscales: &[Vec<i64>],
    types: &[String],
    norms: &[Option<String>],
    acts: &[Option<String>],
    head_dim: i64,
) -> std::result::Result<Vec<Stage>, (String, String)> {
    let n = channels.len();
    let ch_key = format!("{side}_block_out_channels");
    let layers_key = format!("{side}_layers_per_block");
    let ms_key = format!("{side}_qkv_multiscales");
    if n == 0 {
        return Err((ch_key, "must list at least one stage".into()));
    }
    if layers.len() != n {
        return Err((
            layers_key,
            format!("has {} entries for {n} stages", layers.len()),
        ));
    }
    if multiscales.len() != n {
        return Err((
            ms_key,
            format!("has {} entries for {n} stages", multiscales.len()),
        ));
    }
    let mut stages = Vec::with_capacity(n);
    for i in 0..n {
        positive(&ch_key, channels[i])?;
        let l = layers[i];
        if l < 0 {
            return Err((layers_key, format!("must not be negative, got {l}")));
        }
        // A stage without layers also drops its down/up-sampling block; diffusers
        // only builds a consistent model when that stage is the first or the last.
        if l == 0 && i != 0 && i != n - 1 {
            return Err((
                layers_key,
                format!("stage {i} has no layers; only the first or last stage may"),
            ));
        }
        if l == 0 && i == 0 && n < 2 {
            return Err((
                layers_key,
                "a first stage without layers needs a second stage".into(),
            ));
        }
        let block = parse_block_type(&types[i]).map_err(key_err(&format!("{side}_block_types")))?;
        let norm = parse_norm_type(norms[i].as_deref().unwrap_or_default())
            .map_err(key_err(&format!("{side}_norm_types")))?;
        let act = Act::parse(acts[i].as_deref()).map_err(key_err(&format!("{side}_act_fns")))?;
        for &k in &multiscales[i] {
            if k <= 0 || k % 2 == 0 {
                return Err((
                    ms_key,
                    format!("kernel sizes must be positive and odd, got {k}"),
                ));
            }
        }
        if block == BlockType::EfficientViT && l > 0 && channels[i] / head_dim == 0 {
            return Err((
                "attention_head_dim".into(),
                format!(
                    "{side} stage {i} has {} channels, fewer than attention_head_dim {head_dim}",
                    channels[i]
                ),
            ));
        }
        stages.push(Stage {
            block,
            channels: channels[i],
            layers: l,
            qkv_multiscales: multiscales[i].clone(),
            norm,
            act,
        });
    }
    Ok(stages)
}

impl ModelConfig for AutoencoderDCConfig {
    const CLASS_NAME: &'static str = "AutoencoderDC";
    const KNOWN_KEYS: &'static [&'static str] = &[
        "in_channels",
        "latent_channels",
        "attention_head_dim",
        "encoder_block_types",
        "decoder_block_types",
        "encoder_block_out_channels",
        "decoder_block_out_channels",
        "encoder_layers_per_block",
        "decoder_layers_per_block",
        "encoder_qkv_multiscales",
        "decoder_qkv_multiscales",
        "upsample_block_type",
        "downsample_block_type",
        "decoder_norm_types",
        "decoder_act_fns",
        "encoder_out_shortcut",
        "decoder_in_shortcut",
        "decoder_conv_act_fn",
        "scaling_factor",
    ];

    /// Checks what diffusers would reject, or would build but fail to run on
    /// (channel counts its shortcuts cannot divide), naming the key.
    fn validate(&self) -> Check {
        positive("in_channels", self.in_channels)?;
        positive("latent_channels", self.latent_channels)?;
        positive("attention_head_dim", self.attention_head_dim)?;
        let enc = self.encoder_plan()?;
        let dec = self.decoder_plan()?;
        Act::parse(Some(&self.decoder_conv_act_fn)).map_err(key_err("decoder_conv_act_fn"))?;
        if !["pixel_unshuffle", "Conv", "conv"].contains(&self.downsample_block_type.as_str()) {
            tracing::warn!(value = %self.downsample_block_type, "downsample_block_type: not pixel_unshuffle, so a stride-2 conv (as diffusers does)");
        }
        if !["interpolate", "pixel_shuffle"].contains(&self.upsample_block_type.as_str()) {
            tracing::warn!(value = %self.upsample_block_type, "upsample_block_type: not interpolate, so pixel shuffle (as diffusers does)");
        }
        let unshuffle = self.downsample_block_type == "pixel_unshuffle";
        let (ec, dc) = (
            &self.encoder_block_out_channels,
            &self.decoder_block_out_channels,
        );
        let div = |key: &str, a: i64, b: i64, what: &str| -> Check {
            if a % b != 0 {
                return Err((key.into(), format!("{what}: {a} is not divisible by {b}")));
            }
            Ok(())
        };
        let eck = "encoder_block_out_channels";
        if enc[0].layers == 0 && unshuffle {
            div(eck, ec[1], 4, "the pixel-unshuffle input block")?;
        }
        for i in 0..enc.len() - 1 {
            if enc[i].layers > 0 {
                div(
                    eck,
                    4 * ec[i],
                    ec[i + 1],
                    &format!("the shortcut of down block {i}"),
                )?;
                if unshuffle {
                    div(
                        eck,
                        ec[i + 1],
                        4,
                        &format!("pixel-unshuffle down block {i}"),
                    )?;
                }
            }
        }
        if self.encoder_out_shortcut {
            div(
                eck,
                *ec.last().unwrap(),
                self.latent_channels,
                "the encoder's output shortcut",
            )?;
        }
        let dck = "decoder_block_out_channels";
        for i in 0..dec.len() - 1 {
            if dec[i].layers > 0 {
                div(
                    dck,
                    4 * dc[i],
                    dc[i + 1],
                    &format!("the shortcut of up block {i}"),
                )?;
            }
        }
        if self.decoder_in_shortcut {
            div(
                dck,
                *dc.last().unwrap(),
                self.latent_channels,
                "the decoder's input shortcut",
            )?;
        }
        Ok(())
    }
}

/// A normalisation over the channels of an NCHW tensor.
#[derive(Debug)]
enum ChannelNorm {
    Rms(RMSNorm),
    Batch(BatchNorm2d),
}

impl ChannelNorm {
    /// diffusers' `get_normalization(norm_type, channels)` (eps 1e-5, affine, bias).
    fn new(vs: nn::Path, norm: NormType, channels: i64) -> Self {
        match norm {
            NormType::Rms => ChannelNorm::Rms(RMSNorm::new(vs, channels, 1e-5, true, true)),
            NormType::Batch => ChannelNorm::Batch(BatchNorm2d::new(vs, channels, 1e-5, true)),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        match self {
            // RMSNorm normalises the last axis: move channels there and back.
            ChannelNorm::Rms(n) => n.forward(&xs.movedim_int(1, -1)).movedim_int(-1, 1),
            ChannelNorm::Batch(n) => n.forward(xs),
        }
    }
}

fn conv(vs: nn::Path, in_ch: i64, out_ch: i64, kernel: i64, stride: i64, bias: bool) -> Conv2d {
    Conv2d::new(
        vs,
        in_ch,
        out_ch,
        kernel,
        Conv2dConfig {
            stride,
            padding: kernel / 2,
            groups: 1,
            bias,
        },
    )
}

/// `ResBlock`: conv → act → conv → norm, plus the input.
#[derive(Debug)]
struct ResBlock {
    conv1: Conv2d,
    conv2: Conv2d,
    act: Act,
    norm: ChannelNorm,
}

impl ResBlock {
    fn new(vs: nn::Path, channels: i64, norm: NormType, act: Act) -> Self {
        Self {
            conv1: conv(&vs / "conv1", channels, channels, 3, 1, true),
            conv2: conv(&vs / "conv2", channels, channels, 3, 1, false),
            act,
            norm: ChannelNorm::new(&vs / "norm", norm, channels),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let hs = self.act.forward(&self.conv1.forward(xs));
        self.norm.forward(&self.conv2.forward(&hs)) + xs
    }
}

/// `SanaMultiscaleAttentionProjection`: depth-wise k×k conv, then a grouped 1×1 conv per head.
#[derive(Debug)]
struct MultiscaleProjection {
    proj_in: Conv2d,
    proj_out: Conv2d,
}

impl MultiscaleProjection {
    fn new(vs: nn::Path, inner_dim: i64, heads: i64, kernel: i64) -> Self {
        let channels = 3 * inner_dim;
        let cfg = |padding, groups| Conv2dConfig {
            stride: 1,
            padding,
            groups,
            bias: false,
        };
        Self {
            proj_in: Conv2d::new(
                &vs / "proj_in",
                channels,
                channels,
                kernel,
                cfg(kernel / 2, channels),
            ),
            proj_out: Conv2d::new(&vs / "proj_out", channels, channels, 1, cfg(0, 3 * heads)),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        self.proj_out.forward(&self.proj_in.forward(xs))
    }
}

/// `SanaMultiscaleLinearAttention` with `SanaMultiscaleAttnProcessor2_0` and a
/// residual connection (as `EfficientViTBlock` builds it).
#[derive(Debug)]
struct MultiscaleLinearAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_qkv_multiscale: Vec<MultiscaleProjection>,
    to_out: Linear,
    norm_out: ChannelNorm,
    head_dim: i64,
}

impl MultiscaleLinearAttention {
    const EPS: f64 = 1e-15;

    fn new(
        vs: nn::Path,
        channels: i64,
        head_dim: i64,
        kernel_sizes: &[i64],
        norm: NormType,
    ) -> Self {
        // diffusers: int(in_channels // attention_head_dim * mult) with mult = 1.
        let heads = channels / head_dim;
        let inner = heads * head_dim;
        let ms = &vs / "to_qkv_multiscale";
        Self {
            to_q: Linear::new(&vs / "to_q", channels, inner, false),
            to_k: Linear::new(&vs / "to_k", channels, inner, false),
            to_v: Linear::new(&vs / "to_v", channels, inner, false),
            to_qkv_multiscale: kernel_sizes
                .iter()
                .enumerate()
                .map(|(i, &k)| MultiscaleProjection::new(&ms / i, inner, heads, k))
                .collect(),
            to_out: Linear::new(
                &vs / "to_out",
                inner * (1 + kernel_sizes.len() as i64),
                channels,
                false,
            ),
            norm_out: ChannelNorm::new(&vs / "norm_out", norm, channels),
            head_dim,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let size = xs.size();
        let (b, h, w) = (size[0], size[2], size[3]);
        // diffusers switches to quadratic attention on maps no larger than a head.
        let linear = h * w > self.head_dim;
        let kind = xs.kind();

        let hs = xs.movedim_int(1, -1);
        let qkv = Tensor::cat(
            &[
                self.to_q.forward(&hs),
                self.to_k.forward(&hs),
                self.to_v.forward(&hs),
            ],
            3,
        )
        .movedim_int(-1, 1);
        let mut scales = vec![qkv.shallow_clone()];
        scales.extend(self.to_qkv_multiscale.iter().map(|p| p.forward(&qkv)));
        let mut hs = Tensor::cat(&scales, 1);
        if linear {
            hs = hs.to_kind(Kind::Float);
        }
        let hs = hs.reshape([b, -1, 3 * self.head_dim, h * w]);
        let parts = hs.chunk(3, 2);
        let (q, k, v) = (parts[0].relu(), parts[1].relu(), &parts[2]);

        let out = if linear {
            // A row of ones appended to v yields the normaliser in the same matmuls.
            let v = v.pad([0, 0, 0, 1], "constant", 1.0);
            let hs = v
                .matmul(&k.transpose(-1, -2))
                .matmul(&q)
                .to_kind(Kind::Float);
            let d = hs.size()[2];
            let hs = hs.narrow(2, 0, d - 1) / (hs.narrow(2, d - 1, 1) + Self::EPS);
            hs.to_kind(kind)
        } else {
            let scores = k.transpose(-1, -2).matmul(&q).to_kind(Kind::Float);
            let scores = &scores / (scores.sum_dim_intlist(2, true, None) + Self::EPS);
            v.matmul(&scores.to_kind(v.kind()))
        };
        let hs = out.reshape([b, -1, h, w]);
        let hs = self
            .to_out
            .forward(&hs.movedim_int(1, -1))
            .movedim_int(-1, 1);
        self.norm_out.forward(&hs) + xs
    }
}

/// `EfficientViTBlock`: multiscale linear attention, then a GLUMBConv with
/// RMSNorm and a residual connection.
#[derive(Debug)]
struct EfficientViTBlock {
    attn: MultiscaleLinearAttention,
    conv_out: GLUMBConv,
    conv_out_norm: RMSNorm,
}

impl EfficientViTBlock {
    fn new(
        vs: nn::Path,
        channels: i64,
        head_dim: i64,
        kernel_sizes: &[i64],
        norm: NormType,
    ) -> Self {
        // diffusers' `GLUMBConv(norm_type="rms_norm")`: the transformer's GLUMBConv
        // (expand ratio 4) with its RMSNorm at `conv_out.norm`.
        Self {
            attn: MultiscaleLinearAttention::new(
                &vs / "attn",
                channels,
                head_dim,
                kernel_sizes,
                norm,
            ),
            conv_out: GLUMBConv::new(&vs / "conv_out", channels, channels, 4.0),
            conv_out_norm: RMSNorm::new(&vs / "conv_out" / "norm", channels, 1e-5, true, true),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let xs = self.attn.forward(xs);
        let hs = self.conv_out.forward(&xs);
        let hs = self
            .conv_out_norm
            .forward(&hs.movedim_int(1, -1))
            .movedim_int(-1, 1);
        hs + xs
    }
}

/// `DCDownBlock2d`: conv (stride 2, or stride 1 then pixel unshuffle) plus an
/// optional pixel-unshuffle/channel-average shortcut.
#[derive(Debug)]
struct DCDownBlock2d {
    conv: Conv2d,
    pixel_unshuffle: bool,
    /// `Some(group_size)` when the block has its shortcut.
    shortcut: Option<i64>,
}

impl DCDownBlock2d {
    fn new(vs: nn::Path, in_ch: i64, out_ch: i64, pixel_unshuffle: bool, shortcut: bool) -> Self {
        let (stride, conv_out) = if pixel_unshuffle {
            (1, out_ch / 4)
        } else {
            (2, out_ch)
        };
        Self {
            conv: conv(&vs / "conv", in_ch, conv_out, 3, stride, true),
            pixel_unshuffle,
            shortcut: shortcut.then_some(in_ch * 4 / out_ch),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut x = self.conv.forward(xs);
        if self.pixel_unshuffle {
            x = x.pixel_unshuffle(2);
        }
        match self.shortcut {
            Some(group) => {
                let y = xs
                    .pixel_unshuffle(2)
                    .unflatten(1, [-1, group])
                    .mean_dim(2, false, None);
                x + y
            }
            None => x,
        }
    }
}

/// `DCUpBlock2d`: nearest ×2 then conv, or conv then pixel shuffle, plus an
/// optional channel-repeat/pixel-shuffle shortcut.
#[derive(Debug)]
struct DCUpBlock2d {
    conv: Conv2d,
    interpolate: bool,
    /// `Some(repeats)` when the block has its shortcut.
    shortcut: Option<i64>,
}

impl DCUpBlock2d {
    fn new(vs: nn::Path, in_ch: i64, out_ch: i64, interpolate: bool, shortcut: bool) -> Self {
        let conv_out = if interpolate { out_ch } else { out_ch * 4 };
        Self {
            conv: conv(&vs / "conv", in_ch, conv_out, 3, 1, true),
            interpolate,
            shortcut: shortcut.then_some(out_ch * 4 / in_ch),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let x = if self.interpolate {
            // What `F.interpolate(scale_factor=2, mode="nearest")` calls.
            self.conv
                .forward(&xs.upsample_nearest2d_vec(None::<&[i64]>, [2.0, 2.0].as_slice()))
        } else {
            self.conv.forward(xs).pixel_shuffle(2)
        };
        match self.shortcut {
            Some(repeats) => {
                let c = xs.size()[1];
                x + xs
                    .repeat_interleave_self_int(repeats, 1, c * repeats)
                    .pixel_shuffle(2)
            }
            None => x,
        }
    }
}

/// One entry of an encoder/decoder `nn.Sequential` (the large blocks boxed).
#[derive(Debug)]
enum Block {
    Conv(Conv2d),
    Res(Box<ResBlock>),
    EfficientViT(Box<EfficientViTBlock>),
    Down(DCDownBlock2d),
    Up(DCUpBlock2d),
}

impl Block {
    fn forward(&self, xs: &Tensor) -> Tensor {
        match self {
            Block::Conv(b) => b.forward(xs),
            Block::Res(b) => b.forward(xs),
            Block::EfficientViT(b) => b.forward(xs),
            Block::Down(b) => b.forward(xs),
            Block::Up(b) => b.forward(xs),
        }
    }

    /// diffusers' `get_block`.
    fn stage_block(vs: nn::Path, stage: &Stage, head_dim: i64) -> Self {
        match stage.block {
            BlockType::Res => Block::Res(Box::new(ResBlock::new(
                vs,
                stage.channels,
                stage.norm,
                stage.act,
            ))),
            BlockType::EfficientViT => Block::EfficientViT(Box::new(EfficientViTBlock::new(
                vs,
                stage.channels,
                head_dim,
                &stage.qkv_multiscales,
                stage.norm,
            ))),
        }
    }
}

fn run(blocks: &[Block], xs: &Tensor) -> Tensor {
    blocks
        .iter()
        .fold(xs.shallow_clone(), |hs, b| b.forward(&hs))
}

#[derive(Debug)]
struct Encoder {
    conv_in: Block,
    down_blocks: Vec<Vec<Block>>,
    conv_out: Conv2d,
    /// `Some(group size)` with `encoder_out_shortcut`.
    out_shortcut: Option<i64>,
}

impl Encoder {
    fn new(vs: nn::Path, cfg: &AutoencoderDCConfig) -> Self {
        let stages = cfg.encoder_plan().expect("validated config");
        let ch = &cfg.encoder_block_out_channels;
        let unshuffle = cfg.downsample_block_type == "pixel_unshuffle";
        let conv_in = if stages[0].layers > 0 {
            Block::Conv(conv(&vs / "conv_in", cfg.in_channels, ch[0], 3, 1, true))
        } else {
            Block::Down(DCDownBlock2d::new(
                &vs / "conv_in",
                cfg.in_channels,
                ch[1],
                unshuffle,
                false,
            ))
        };
        let db = &vs / "down_blocks";
        let down_blocks = stages
            .iter()
            .enumerate()
            .map(|(i, stage)| {
                let p = &db / i;
                let mut blocks: Vec<Block> = (0..stage.layers)
                    .map(|j| Block::stage_block(&p / j, stage, cfg.attention_head_dim))
                    .collect();
                if i < stages.len() - 1 && stage.layers > 0 {
                    let j = blocks.len();
                    blocks.push(Block::Down(DCDownBlock2d::new(
                        &p / j,
                        ch[i],
                        ch[i + 1],
                        unshuffle,
                        true,
                    )));
                }
                blocks
            })
            .collect();
        let last = *ch.last().expect("validated config");
        Self {
            conv_in,
            down_blocks,
            conv_out: conv(&vs / "conv_out", last, cfg.latent_channels, 3, 1, true),
            out_shortcut: cfg
                .encoder_out_shortcut
                .then_some(last / cfg.latent_channels),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut hs = self.conv_in.forward(xs);
        for blocks in &self.down_blocks {
            hs = run(blocks, &hs);
        }
        match self.out_shortcut {
            Some(group) => {
                let x = hs.unflatten(1, [-1, group]).mean_dim(2, false, None);
                self.conv_out.forward(&hs) + x
            }
            None => self.conv_out.forward(&hs),
        }
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    /// `Some(repeats)` with `decoder_in_shortcut`.
    in_shortcut: Option<i64>,
    /// Indexed by stage; run from the last stage to the first.
    up_blocks: Vec<Vec<Block>>,
    norm_out: RMSNorm,
    conv_act: Act,
    conv_out: Block,
}

impl Decoder {
    fn new(vs: nn::Path, cfg: &AutoencoderDCConfig) -> Self {
        let stages = cfg.decoder_plan().expect("validated config");
        let ch = &cfg.decoder_block_out_channels;
        let n = stages.len();
        let interpolate = cfg.upsample_block_type == "interpolate";
        let last = ch[n - 1];
        let ub = &vs / "up_blocks";
        let up_blocks = stages
            .iter()
            .enumerate()
            .map(|(i, stage)| {
                let p = &ub / i;
                let mut blocks = Vec::new();
                if i < n - 1 && stage.layers > 0 {
                    blocks.push(Block::Up(DCUpBlock2d::new(
                        &p / 0,
                        ch[i + 1],
                        ch[i],
                        interpolate,
                        true,
                    )));
                }
                for _ in 0..stage.layers {
                    let j = blocks.len();
                    blocks.push(Block::stage_block(&p / j, stage, cfg.attention_head_dim));
                }
                blocks
            })
            .collect();
        let channels = if stages[0].layers > 0 { ch[0] } else { ch[1] };
        let conv_out = if stages[0].layers > 0 {
            Block::Conv(conv(
                &vs / "conv_out",
                channels,
                cfg.in_channels,
                3,
                1,
                true,
            ))
        } else {
            Block::Up(DCUpBlock2d::new(
                &vs / "conv_out",
                channels,
                cfg.in_channels,
                interpolate,
                false,
            ))
        };
        Self {
            conv_in: conv(&vs / "conv_in", cfg.latent_channels, last, 3, 1, true),
            in_shortcut: cfg
                .decoder_in_shortcut
                .then_some(last / cfg.latent_channels),
            up_blocks,
            norm_out: RMSNorm::new(&vs / "norm_out", channels, 1e-5, true, true),
            conv_act: Act::parse(Some(&cfg.decoder_conv_act_fn)).expect("validated config"),
            conv_out,
        }
    }

    fn forward(&self, zs: &Tensor) -> Tensor {
        let mut hs = match self.in_shortcut {
            Some(repeats) => {
                let c = zs.size()[1];
                self.conv_in.forward(zs) + zs.repeat_interleave_self_int(repeats, 1, c * repeats)
            }
            None => self.conv_in.forward(zs),
        };
        for blocks in self.up_blocks.iter().rev() {
            hs = run(blocks, &hs);
        }
        let hs = self
            .norm_out
            .forward(&hs.movedim_int(1, -1))
            .movedim_int(-1, 1);
        self.conv_out.forward(&self.conv_act.forward(&hs))
    }
}

/// Tile sizes of diffusers' `enable_tiling`, in pixels (the defaults are diffusers').
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TilingConfig {
    pub tile_sample_min_height: i64,
    pub tile_sample_min_width: i64,
    pub tile_sample_stride_height: i64,
    pub tile_sample_stride_width: i64,
}

impl Default for TilingConfig {
    fn default() -> Self {
        Self {
            tile_sample_min_height: 512,
            tile_sample_min_width: 512,
            tile_sample_stride_height: 448,
            tile_sample_stride_width: 448,
        }
    }
}

/// diffusers' `AutoencoderDC`. Parameters (and batch-norm buffers) live in `vs`
/// under diffusers' names, so checkpoints load and save by name.
///
/// Gradients flow through `encode`/`decode` as usual; wrap calls in
/// `tch::no_grad` for inference.
pub struct AutoencoderDC {
    pub config: AutoencoderDCConfig,
    pub vs: nn::VarStore,
    encoder: Encoder,
    decoder: Decoder,
    tiling: TilingConfig,
    use_tiling: bool,
    use_slicing: bool,
}

impl std::fmt::Debug for AutoencoderDC {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutoencoderDC")
            .field("config", &self.config)
            .field("use_tiling", &self.use_tiling)
            .field("use_slicing", &self.use_slicing)
            .finish_non_exhaustive()
    }
}

impl AutoencoderDC {
    /// Builds a randomly initialised model (PyTorch's init distributions) in fp32
    /// on `device`. Validates the config first.
    pub fn new(config: AutoencoderDCConfig, device: Device) -> Result<Self> {
        modeling_utils::check_config(&config)?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let encoder = Encoder::new(&root / "encoder", &config);
        let decoder = Decoder::new(&root / "decoder", &config);
        Ok(Self {
            config,
            vs,
            encoder,
            decoder,
            tiling: TilingConfig::default(),
            use_tiling: false,
            use_slicing: false,
        })
    }

    /// Loads a diffusers model directory (`config.json` plus
    /// `diffusion_pytorch_model.safetensors` or a sharded index), then casts to `kind`.
    pub fn from_pretrained(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config: AutoencoderDCConfig = modeling_utils::read_config(dir)?;
        let mut model = Self::new(config, device)?;
        modeling_utils::load_weights(&mut model.vs, dir)?;
        model.set_kind(kind)?;
        Ok(model)
    }

    /// Writes `config.json` and `diffusion_pytorch_model.safetensors` as diffusers'
    /// `save_pretrained` does (batch-norm buffers included).
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        modeling_utils::save_pretrained(&self.vs, &self.config, dir)
    }

    /// Casts the floating-point parameters and buffers (fp32 / bf16 / fp16 / fp64);
    /// `num_batches_tracked` stays int64 as in PyTorch.
    pub fn set_kind(&mut self, kind: Kind) -> Result<()> {
        match kind {
            Kind::Float => self.vs.float(),
            Kind::BFloat16 => self.vs.bfloat16(),
            Kind::Half => self.vs.half(),
            Kind::Double => self.vs.double(),
            k => {
                return Err(SanaError::input(
                    "kind",
                    format!("{k:?} is not a floating-point kind"),
                ))
            }
        }
        Ok(())
    }

    pub fn kind(&self) -> Kind {
        self.decoder.conv_in.weight.kind()
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The pipeline's latent scale: `latents = encode(x) * s`, `decode(latents / s)`.
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// Pixels per latent along each axis: `2^(stages - 1)` (32 for SANA's DC-AE).
    pub fn spatial_compression_ratio(&self) -> i64 {
        1 << (self.config.encoder_block_out_channels.len() - 1)
    }

    /// diffusers' `enable_tiling`: encode/decode inputs larger than one tile in
    /// overlapping tiles blended linearly, which bounds memory. Tile sizes and
    /// strides must be positive multiples of the compression ratio, stride ≤ size.
    pub fn enable_tiling(&mut self, tiling: TilingConfig) -> Result<()> {
        let r = self.spatial_compression_ratio();
        let t = tiling;
        for (name, size, stride) in [
            (
                "height",
                t.tile_sample_min_height,
                t.tile_sample_stride_height,
            ),
            ("width", t.tile_sample_min_width, t.tile_sample_stride_width),
        ] {
            if size <= 0 || stride <= 0 || size % r != 0 || stride % r != 0 || stride > size {
                return Err(SanaError::input(
                    "tiling",
                    format!(
                        "tile {name} {size} and stride {stride} must be positive multiples of the compression ratio {r}, stride <= tile"
                    ),
                ));
            }
        }
        self.tiling = tiling;
        self.use_tiling = true;
        Ok(())
    }

    pub fn disable_tiling(&mut self) {
        self.use_tiling = false;
    }

    /// The tile sizes when tiling is on.
    pub fn tiling(&self) -> Option<TilingConfig> {
        self.use_tiling.then_some(self.tiling)
    }

    /// diffusers' `enable_slicing`: encode/decode one batch element at a time.
    pub fn enable_slicing(&mut self) {
        self.use_slicing = true;
    }

    pub fn disable_slicing(&mut self) {
        self.use_slicing = false;
    }

    fn check_4d(&self, name: &str, xs: &Tensor, channels: i64, what: &str) -> Result<(i64, i64)> {
        let s = xs.size();
        if s.len() != 4 || s[1] != channels || s[0] == 0 || s[2] == 0 || s[3] == 0 {
            return Err(SanaError::input(
                name,
                format!("expected {what} [B, {channels}, H, W], got {s:?}"),
            ));
        }
        Ok((s[2], s[3]))
    }

    fn prepare(&self, xs: &Tensor) -> Tensor {
        xs.to_device(self.device()).to_kind(self.kind())
    }

    fn sliced(&self, xs: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
        if self.use_slicing && xs.size()[0] > 1 {
            let parts: Vec<Tensor> = xs.split(1, 0).iter().map(&f).collect();
            Tensor::cat(&parts, 0)
        } else {
            f(xs)
        }
    }

    /// Images `[B, in_channels, H, W]` in [-1, 1] → raw latents
    /// `[B, latent_channels, H/r, W/r]` (diffusers' `encode(x).latent`, before
    /// `scaling_factor`), in the model's kind. H and W must be multiples of
    /// [`Self::spatial_compression_ratio`] unless the tiled path pads them.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let (h, w) = self.check_4d("image", x, self.config.in_channels, "an image")?;
        let t = self.tiling;
        let tiled =
            self.use_tiling && (w > t.tile_sample_min_width || h > t.tile_sample_min_height);
        if !tiled {
            self.check_multiple(h, w)?;
        }
        let x = self.prepare(x);
        Ok(self.sliced(&x, |x| {
            if tiled {
                self.tiled_encode_inner(x)
            } else {
                self.encoder.forward(x)
            }
        }))
    }

    /// Raw latents `[B, latent_channels, h, w]` (already divided by
    /// `scaling_factor`) → images `[B, in_channels, h·r, w·r]`, roughly in
    /// [-1, 1] (diffusers' `decode(z).sample`), in the model's kind.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let (h, w) = self.check_4d("latents", z, self.config.latent_channels, "latents")?;
        let r = self.spatial_compression_ratio();
        let t = self.tiling;
        let tiled = self.use_tiling
            && (w > t.tile_sample_min_width / r || h > t.tile_sample_min_height / r);
        let z = self.prepare(z);
        Ok(self.sliced(&z, |z| {
            if tiled {
                self.tiled_decode_inner(z)
            } else {
                self.decoder.forward(z)
            }
        }))
    }

    fn check_multiple(&self, h: i64, w: i64) -> Result<()> {
        let r = self.spatial_compression_ratio();
        if h % r != 0 || w % r != 0 {
            return Err(SanaError::input(
                "image",
                format!("height and width must be multiples of the VAE's compression ratio {r}, got {h}x{w}"),
            ));
        }
        Ok(())
    }

    /// diffusers' `tiled_encode` with the current tile sizes (the defaults unless
    /// [`Self::enable_tiling`] set others), whether or not tiling is on.
    pub fn tiled_encode(&self, x: &Tensor) -> Result<Tensor> {
        self.check_4d("image", x, self.config.in_channels, "an image")?;
        Ok(self.tiled_encode_inner(&self.prepare(x)))
    }

    /// diffusers' `tiled_decode` with the current tile sizes.
    pub fn tiled_decode(&self, z: &Tensor) -> Result<Tensor> {
        self.check_4d("latents", z, self.config.latent_channels, "latents")?;
        Ok(self.tiled_decode_inner(&self.prepare(z)))
    }

    fn tiled_encode_inner(&self, x: &Tensor) -> Tensor {
        let r = self.spatial_compression_ratio();
        let t = self.tiling;
        let s = x.size();
        let (height, width) = (s[2], s[3]);
        let (min_h, min_w) = (t.tile_sample_min_height, t.tile_sample_min_width);
        let (stride_h, stride_w) = (t.tile_sample_stride_height, t.tile_sample_stride_width);
        let (lat_min_h, lat_min_w) = (min_h / r, min_w / r);
        let (lat_stride_h, lat_stride_w) = (stride_h / r, stride_w / r);

        let mut rows = Vec::new();
        for i in (0..height).step_by(stride_h as usize) {
            let mut row = Vec::new();
            for j in (0..width).step_by(stride_w as usize) {
                let tile = crop(x, i, min_h, j, min_w);
                let ts = tile.size();
                // Edge tiles are zero-padded up to a multiple of the ratio.
                let (pad_h, pad_w) = ((r - ts[2] % r) % r, (r - ts[3] % r) % r);
                let tile = if pad_h != 0 || pad_w != 0 {
                    tile.constant_pad_nd([0, pad_w, 0, pad_h])
                } else {
                    tile
                };
                row.push(self.encoder.forward(&tile));
            }
            rows.push(row);
        }
        let out = blend_tiles(
            rows,
            (lat_min_h - lat_stride_h, lat_min_w - lat_stride_w),
            (lat_stride_h, lat_stride_w),
        );
        out.narrow(2, 0, height / r).narrow(3, 0, width / r)
    }

    fn tiled_decode_inner(&self, z: &Tensor) -> Tensor {
        let r = self.spatial_compression_ratio();
        let t = self.tiling;
        let s = z.size();
        let (height, width) = (s[2], s[3]);
        let (lat_min_h, lat_min_w) = (t.tile_sample_min_height / r, t.tile_sample_min_width / r);
        let (lat_stride_h, lat_stride_w) = (
            t.tile_sample_stride_height / r,
            t.tile_sample_stride_width / r,
        );

        let mut rows = Vec::new();
        for i in (0..height).step_by(lat_stride_h as usize) {
            let mut row = Vec::new();
            for j in (0..width).step_by(lat_stride_w as usize) {
                row.push(self.decoder.forward(&crop(z, i, lat_min_h, j, lat_min_w)));
            }
            rows.push(row);
        }
        blend_tiles(
            rows,
            (
                t.tile_sample_min_height - t.tile_sample_stride_height,
                t.tile_sample_min_width - t.tile_sample_stride_width,
            ),
            (t.tile_sample_stride_height, t.tile_sample_stride_width),
        )
    }
}

/// `x[:, :, i:i+h, j:j+w]`, clipped at the edges as Python slicing is.
fn crop(x: &Tensor, i: i64, h: i64, j: i64, w: i64) -> Tensor {
    let s = x.size();
    x.narrow(2, i, h.min(s[2] - i))
        .narrow(3, j, w.min(s[3] - j))
}

/// diffusers' tile stitching: each tile is blended with the (already blended)
/// tile above and to its left, cropped to the stride, and the crops concatenated.
fn blend_tiles(mut rows: Vec<Vec<Tensor>>, blend: (i64, i64), stride: (i64, i64)) -> Tensor {
    let mut result_rows = Vec::with_capacity(rows.len());
    for i in 0..rows.len() {
        let mut result_row = Vec::with_capacity(rows[i].len());
        for j in 0..rows[i].len() {
            // diffusers blends in place; later tiles read the blended neighbours.
            let tile = rows[i][j].copy();
            if i > 0 {
                blend_axis(&rows[i - 1][j], &tile, blend.0, 2);
            }
            if j > 0 {
                blend_axis(&rows[i][j - 1], &tile, blend.1, 3);
            }
            let ts = tile.size();
            result_row.push(tile.narrow(2, 0, stride.0.min(ts[2])).narrow(
                3,
                0,
                stride.1.min(ts[3]),
            ));
            rows[i][j] = tile;
        }
        result_rows.push(Tensor::cat(&result_row, 3));
    }
    Tensor::cat(&result_rows, 2)
}

/// `blend_v` (axis 2) / `blend_h` (axis 3): the first `extent` lines of `b` fade
/// in from the last lines of `a`, one line at a time with Python-float weights
/// exactly as diffusers computes them. Writes into `b`.
fn blend_axis(a: &Tensor, b: &Tensor, extent: i64, axis: i64) {
    let (na, nb) = (a.size()[axis as usize], b.size()[axis as usize]);
    let extent = extent.min(na).min(nb);
    for y in 0..extent.max(0) {
        let wb = y as f64 / extent as f64;
        let line = a.select(axis, na - extent + y) * (1.0 - wb) + b.select(axis, y) * wb;
        b.select(axis, y).copy_(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{load_named, max_abs_diff, parity_case};

    struct Case {
        model: AutoencoderDC,
        inputs: std::collections::HashMap<String, Tensor>,
        outputs: std::collections::HashMap<String, Tensor>,
    }

    fn load_case(case: &str) -> Case {
        let dir = parity_case(&format!("dc_ae_{case}"));
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let kind = match meta["dtype"].as_str().unwrap() {
            "float32" => Kind::Float,
            "bfloat16" => Kind::BFloat16,
            d => panic!("unknown dtype {d}"),
        };
        let mut model =
            AutoencoderDC::from_pretrained(&dir.join("model"), Device::Cpu, kind).unwrap();
        if let Some(t) = meta.get("tiling") {
            let g = |k: &str| t[k].as_i64().unwrap();
            model
                .enable_tiling(TilingConfig {
                    tile_sample_min_height: g("tile_sample_min_height"),
                    tile_sample_min_width: g("tile_sample_min_width"),
                    tile_sample_stride_height: g("tile_sample_stride_height"),
                    tile_sample_stride_width: g("tile_sample_stride_width"),
                })
                .unwrap();
        }
        Case {
            model,
            inputs: load_named(&dir.join("inputs.safetensors")),
            outputs: load_named(&dir.join("outputs.safetensors")),
        }
    }

    /// Max abs errors of (encode, decode) against diffusers.
    fn errors(c: &Case) -> (f64, f64) {
        let (latent, sample) = tch::no_grad(|| {
            (
                c.model.encode(&c.inputs["image"]).unwrap(),
                c.model.decode(&c.inputs["latents"]).unwrap(),
            )
        });
        assert_eq!(latent.kind(), c.outputs["latent"].kind());
        assert_eq!(sample.kind(), c.outputs["sample"].kind());
        (
            max_abs_diff(&latent, &c.outputs["latent"]),
            max_abs_diff(&sample, &c.outputs["sample"]),
        )
    }

    fn check(case: &str, tol: f64) {
        let c = load_case(case);
        let (enc, dec) = errors(&c);
        let scale = |k: &str| c.outputs[k].abs().max().double_value(&[]);
        eprintln!(
            "dc_ae {case}: encode max abs err {enc:.3e} (max {:.3}), decode {dec:.3e} (max {:.3})",
            scale("latent"),
            scale("sample")
        );
        assert!(enc <= tol, "{case}: encode max abs error {enc:e} > {tol:e}");
        assert!(dec <= tol, "{case}: decode max abs error {dec:e} > {tol:e}");
    }

    #[test]
    fn parity_dc_ae_sana() {
        check("sana", 1e-4);
    }

    #[test]
    fn parity_dc_ae_mix_batch_norm_pixel_shuffle() {
        check("mix", 1e-4);
    }

    #[test]
    fn parity_dc_ae_plain_no_shortcuts() {
        check("plain", 1e-4);
    }

    #[test]
    fn parity_dc_ae_tiled() {
        check("tiled", 1e-4);
    }

    #[test]
    fn parity_dc_ae_bf16() {
        // Same kernels as diffusers in bf16; allow a few bf16 ulps of the output scale.
        check("bf16", 3e-2);
    }

    /// The full-size SANA DC-AE: its diffusers config.json parses to
    /// [`AutoencoderDCConfig::sana`] and the model has diffusers' state-dict keys,
    /// shapes and dtypes exactly (allocates the ~1.25 GB of fp32 weights).
    #[test]
    fn full_size_sana_layout_matches_diffusers() {
        let dir = parity_case("dc_ae_sana_layout");
        let config: AutoencoderDCConfig = modeling_utils::read_config(&dir).unwrap();
        assert_eq!(config, AutoencoderDCConfig::sana());
        let keys: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("keys.json")).unwrap()).unwrap();
        let model = tch::no_grad(|| AutoencoderDC::new(config, Device::Cpu)).unwrap();
        assert_eq!(model.spatial_compression_ratio(), 32);
        let vars = model.vs.variables();
        let mut missing: Vec<&String> = keys.keys().filter(|k| !vars.contains_key(*k)).collect();
        let mut extra: Vec<&String> = vars.keys().filter(|k| !keys.contains_key(*k)).collect();
        missing.sort();
        extra.sort();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "missing {missing:?}, extra {extra:?}"
        );
        for (k, v) in &keys {
            let shape: Vec<i64> = serde_json::from_value(v["shape"].clone()).unwrap();
            assert_eq!(vars[k].size(), shape, "{k}");
            let kind = if v["dtype"] == "int64" {
                Kind::Int64
            } else {
                Kind::Float
            };
            assert_eq!(vars[k].kind(), kind, "{k}");
        }
    }

    /// Slicing runs batch elements one at a time; the result must not change.
    #[test]
    fn slicing_matches_batched() {
        let mut c = load_case("sana");
        c.model.enable_slicing();
        let (enc, dec) = errors(&c);
        assert!(
            enc <= 1e-4 && dec <= 1e-4,
            "sliced: encode {enc:e}, decode {dec:e}"
        );
    }

    /// The parity check must notice a single wrong weight or batch-norm statistic.
    #[test]
    fn parity_fails_when_a_weight_is_perturbed() {
        // One scalar each; the conv tap is the kernel centre, since corner taps of a
        // 5x5 kernel only ever see zero padding on these tiny maps.
        for (case, name, index) in [
            (
                "sana",
                "decoder.up_blocks.3.0.attn.to_qkv_multiscale.1.proj_in.weight",
                &[0, 0, 2, 2][..],
            ),
            (
                "sana",
                "encoder.down_blocks.2.0.conv_out.norm.bias",
                &[0][..],
            ),
            ("mix", "decoder.up_blocks.1.1.norm.running_var", &[0][..]),
        ] {
            let c = load_case(case);
            let vars = c.model.vs.variables();
            tch::no_grad(|| {
                let mut t = vars[name].shallow_clone();
                for &i in index {
                    t = t.get(i);
                }
                let _ = t.g_add_scalar_(1e-2);
            });
            let (enc, dec) = errors(&c);
            eprintln!(
                "{case}: perturbed {name}{index:?}: encode err {enc:.3e}, decode err {dec:.3e}"
            );
            assert!(enc.max(dec) > 1e-4, "perturbing {name} went unnoticed");
        }
    }

    fn tiny_config() -> AutoencoderDCConfig {
        AutoencoderDCConfig {
            latent_channels: 4,
            attention_head_dim: 4,
            encoder_block_types: OneOrMany::Many(vec![
                "ResBlock".into(),
                "EfficientViTBlock".into(),
            ]),
            decoder_block_types: OneOrMany::Many(vec![
                "ResBlock".into(),
                "EfficientViTBlock".into(),
            ]),
            encoder_block_out_channels: vec![8, 8],
            decoder_block_out_channels: vec![8, 8],
            encoder_layers_per_block: vec![1, 1],
            decoder_layers_per_block: vec![1, 1],
            encoder_qkv_multiscales: vec![vec![], vec![5]],
            decoder_qkv_multiscales: vec![vec![], vec![5]],
            decoder_norm_types: OneOrMany::Many(vec!["batch_norm".into(), "rms_norm".into()]),
            decoder_act_fns: OneOrMany::Many(vec![Some("relu".into()), Some("silu".into())]),
            downsample_block_type: "Conv".into(),
            upsample_block_type: "interpolate".into(),
            scaling_factor: 0.41407,
            ..Default::default()
        }
    }

    fn config_err(cfg: AutoencoderDCConfig) -> String {
        let msg = AutoencoderDC::new(cfg, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(!msg.contains('\n'), "error is one line: {msg}");
        msg
    }

    #[test]
    fn image_not_multiple_of_ratio_is_an_input_error() {
        let model = AutoencoderDC::new(tiny_config(), Device::Cpu).unwrap();
        assert_eq!(model.spatial_compression_ratio(), 2);
        let x = Tensor::zeros([1, 3, 6, 5], (Kind::Float, Device::Cpu));
        let err = model.encode(&x).unwrap_err();
        assert!(matches!(err, SanaError::Input { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("multiples") && msg.contains("6x5"), "{msg}");
    }

    #[test]
    fn wrong_channels_are_input_errors() {
        let model = AutoencoderDC::new(tiny_config(), Device::Cpu).unwrap();
        let f = (Kind::Float, Device::Cpu);
        let err = model.encode(&Tensor::zeros([1, 4, 4, 4], f)).unwrap_err();
        assert!(err.to_string().contains("image"), "{err}");
        let err = model.decode(&Tensor::zeros([1, 3, 2, 2], f)).unwrap_err();
        assert!(err.to_string().contains("latents"), "{err}");
        let err = model.decode(&Tensor::zeros([4, 2, 2], f)).unwrap_err();
        assert!(matches!(err, SanaError::Input { .. }), "{err:?}");
    }

    #[test]
    fn shapes_and_defaults() {
        let model = AutoencoderDC::new(tiny_config(), Device::Cpu).unwrap();
        let f = (Kind::Float, Device::Cpu);
        let z = tch::no_grad(|| model.encode(&Tensor::zeros([2, 3, 6, 10], f))).unwrap();
        assert_eq!(z.size(), [2, 4, 3, 5]);
        let x = tch::no_grad(|| model.decode(&z)).unwrap();
        assert_eq!(x.size(), [2, 3, 6, 10]);
        assert_eq!(model.scaling_factor(), 0.41407);
        let sana = AutoencoderDCConfig::sana();
        sana.validate().unwrap();
        assert_eq!(1 << (sana.encoder_block_out_channels.len() - 1), 32);
    }

    #[test]
    fn bad_config_values_name_the_key() {
        let mut c = tiny_config();
        c.decoder_norm_types = OneOrMany::One("layer_norm".into());
        assert!(config_err(c).contains("decoder_norm_types"));
        let mut c = tiny_config();
        c.encoder_layers_per_block = vec![1, 1, 1];
        assert!(config_err(c).contains("encoder_layers_per_block"));
        let mut c = tiny_config();
        c.decoder_block_types = OneOrMany::One("AttnBlock".into());
        assert!(config_err(c).contains("decoder_block_types"));
        let mut c = tiny_config();
        c.decoder_act_fns = OneOrMany::One(Some("relu6".into()));
        assert!(config_err(c).contains("decoder_act_fns"));
        let mut c = tiny_config();
        c.latent_channels = 3;
        assert!(config_err(c).contains("encoder_block_out_channels"));
        let mut c = tiny_config();
        c.encoder_qkv_multiscales = vec![vec![], vec![4]];
        assert!(config_err(c).contains("encoder_qkv_multiscales"));
    }

    #[test]
    fn config_json_forms_parse() {
        // diffusers writes tuples as lists; a single string applies to every stage.
        let text = r#"{"decoder_act_fns": ["relu", null], "decoder_norm_types": "batch_norm",
            "encoder_block_out_channels": [8, 8], "decoder_block_out_channels": [8, 8],
            "encoder_layers_per_block": [1, 1], "decoder_layers_per_block": [1, 1],
            "encoder_qkv_multiscales": [[], []], "decoder_qkv_multiscales": [[], []],
            "latent_channels": 4, "attention_head_dim": 4}"#;
        let c: AutoencoderDCConfig = modeling_utils::parse_json(Path::new("c.json"), text).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.decoder_act_fns,
            OneOrMany::Many(vec![Some("relu".into()), None])
        );
        let round: AutoencoderDCConfig =
            serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(round, c);
    }

    #[test]
    fn bad_tiling_is_an_input_error() {
        let mut model = AutoencoderDC::new(tiny_config(), Device::Cpu).unwrap();
        let bad = TilingConfig {
            tile_sample_stride_height: 513,
            ..Default::default()
        };
        assert!(matches!(
            model.enable_tiling(bad),
            Err(SanaError::Input { .. })
        ));
        assert!(model.tiling().is_none());
        model.enable_tiling(TilingConfig::default()).unwrap();
        assert_eq!(model.tiling(), Some(TilingConfig::default()));
    }

    #[test]
    fn save_then_load_round_trips_with_batch_norm_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let model = AutoencoderDC::new(tiny_config(), Device::Cpu).unwrap();
        let vars = model.vs.variables();
        let stats = "decoder.up_blocks.0.1.norm.running_var";
        assert!(vars.contains_key(stats), "{:?}", vars.keys());
        // Buffers are not trained.
        assert!(!vars[stats].requires_grad());
        tch::no_grad(|| {
            let _ = vars[stats].shallow_clone().fill_(2.5);
        });
        model.save_pretrained(dir.path()).unwrap();
        let loaded =
            AutoencoderDC::from_pretrained(dir.path(), Device::Cpu, Kind::BFloat16).unwrap();
        assert_eq!(loaded.config, tiny_config());
        assert_eq!(loaded.kind(), Kind::BFloat16);
        let lv = loaded.vs.variables();
        assert_eq!(lv.len(), vars.len());
        assert_eq!(lv[stats].double_value(&[0]), 2.5);
        assert_eq!(
            lv["decoder.up_blocks.0.1.norm.num_batches_tracked"].kind(),
            Kind::Int64
        );
        let mut model = model;
        assert!(model.set_kind(Kind::Int64).is_err());
    }

    #[test]
    fn missing_buffer_is_named() {
        let dir = tempfile::tempdir().unwrap();
        AutoencoderDC::new(tiny_config(), Device::Cpu)
            .unwrap()
            .save_pretrained(dir.path())
            .unwrap();
        let path = dir.path().join("diffusion_pytorch_model.safetensors");
        let mut named = Tensor::read_safetensors(&path).unwrap();
        named.retain(|(k, _)| k != "decoder.up_blocks.0.1.norm.running_mean");
        Tensor::write_safetensors(&named, &path).unwrap();
        let err = AutoencoderDC::from_pretrained(dir.path(), Device::Cpu, Kind::Float).unwrap_err();
        assert!(err.to_string().contains("running_mean"), "{err}");
    }
}
