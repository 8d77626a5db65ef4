//! `diffusers/models/transformers/sana_transformer.py`: `SanaTransformer2DModel`,
//! the linear-attention DiT of SANA 1.0, SANA 1.5 and SANA-Sprint.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::lora::LoraAdapters;
use crate::models::attention_processor::{
    mask_to_bias, Attention, AttentionConfig, Processor, QkNorm,
};
use crate::models::embeddings::{
    PatchEmbed, PixArtAlphaTextProjection, TimestepEmbedding, SANA_TIME_PROJ,
};
use crate::models::layers::{Conv2d, Conv2dConfig, LayerNorm, Linear};
use crate::models::modeling_utils::{self, ModelConfig};
use crate::models::normalization::{AdaLayerNormSingle, RMSNorm};
use crate::{Result, SanaError};

/// `config.json` of a `SanaTransformer2DModel`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SanaTransformerConfig {
    pub in_channels: i64,
    pub out_channels: Option<i64>,
    pub num_attention_heads: i64,
    pub attention_head_dim: i64,
    pub num_layers: i64,
    pub num_cross_attention_heads: Option<i64>,
    pub cross_attention_head_dim: Option<i64>,
    pub cross_attention_dim: Option<i64>,
    pub caption_channels: i64,
    pub mlp_ratio: f64,
    pub dropout: f64,
    pub attention_bias: bool,
    pub sample_size: i64,
    pub patch_size: i64,
    pub norm_elementwise_affine: bool,
    pub norm_eps: f64,
    pub interpolation_scale: Option<f64>,
    pub guidance_embeds: bool,
    /// Used by the Sprint pipeline (guidance is multiplied by it), not by the model.
    pub guidance_embeds_scale: f64,
    pub qk_norm: Option<String>,
    /// Used by the pipeline (timesteps are multiplied by it), not by the model.
    pub timestep_scale: f64,
}

impl Default for SanaTransformerConfig {
    fn default() -> Self {
        Self {
            in_channels: 32,
            out_channels: Some(32),
            num_attention_heads: 70,
            attention_head_dim: 32,
            num_layers: 20,
            num_cross_attention_heads: Some(20),
            cross_attention_head_dim: Some(112),
            cross_attention_dim: Some(2240),
            caption_channels: 2304,
            mlp_ratio: 2.5,
            dropout: 0.0,
            attention_bias: false,
            sample_size: 32,
            patch_size: 1,
            norm_elementwise_affine: false,
            norm_eps: 1e-6,
            interpolation_scale: None,
            guidance_embeds: false,
            guidance_embeds_scale: 0.1,
            qk_norm: None,
            timestep_scale: 1.0,
        }
    }
}

impl ModelConfig for SanaTransformerConfig {
    const CLASS_NAME: &'static str = "SanaTransformer2DModel";
    const KNOWN_KEYS: &'static [&'static str] = &[
        "in_channels",
        "out_channels",
        "num_attention_heads",
        "attention_head_dim",
        "num_layers",
        "num_cross_attention_heads",
        "cross_attention_head_dim",
        "cross_attention_dim",
        "caption_channels",
        "mlp_ratio",
        "dropout",
        "attention_bias",
        "sample_size",
        "patch_size",
        "norm_elementwise_affine",
        "norm_eps",
        "interpolation_scale",
        "guidance_embeds",
        "guidance_embeds_scale",
        "qk_norm",
        "timestep_scale",
    ];

    /// Checks what diffusers would reject at construction, naming the key.
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        let positive = [
            ("in_channels", self.in_channels),
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("caption_channels", self.caption_channels),
            ("patch_size", self.patch_size),
            ("sample_size", self.sample_size),
        ];
        for (key, v) in positive {
            if v <= 0 {
                return Err((key.into(), format!("must be positive, got {v}")));
            }
        }
        if self.num_layers < 0 {
            return Err(("num_layers".into(), "must not be negative".into()));
        }
        QkNorm::parse(self.qk_norm.as_deref()).map_err(|m| ("qk_norm".to_string(), m))?;
        // SANA's feed-forward reads norm2, which diffusers only builds with cross-attention.
        for (key, v) in [
            ("cross_attention_dim", self.cross_attention_dim),
            ("num_cross_attention_heads", self.num_cross_attention_heads),
            ("cross_attention_head_dim", self.cross_attention_head_dim),
        ] {
            match v {
                Some(v) if v > 0 => {}
                _ => {
                    return Err((
                        key.into(),
                        "SANA needs cross-attention: set a positive value".into(),
                    ))
                }
            }
        }
        if self.interpolation_scale.is_some() && (self.inner_dim() % 4) != 0 {
            return Err((
                "interpolation_scale".into(),
                "sin-cos position embedding needs num_attention_heads * attention_head_dim divisible by 4".into(),
            ));
        }
        Ok(())
    }
}

impl SanaTransformerConfig {
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }
    pub fn out_channels(&self) -> i64 {
        self.out_channels.unwrap_or(self.in_channels)
    }
}

/// The feed-forward of SANA: inverted-bottleneck conv with a gated depth-wise conv.
#[derive(Debug)]
pub struct GLUMBConv {
    conv_inverted: Conv2d,
    conv_depth: Conv2d,
    conv_point: Conv2d,
}

impl GLUMBConv {
    pub fn new(vs: nn::Path, in_channels: i64, out_channels: i64, expand_ratio: f64) -> Self {
        let hidden = (expand_ratio * in_channels as f64) as i64;
        Self {
            conv_inverted: Conv2d::new(
                &vs / "conv_inverted",
                in_channels,
                hidden * 2,
                1,
                Default::default(),
            ),
            conv_depth: Conv2d::new(
                &vs / "conv_depth",
                hidden * 2,
                hidden * 2,
                3,
                Conv2dConfig {
                    padding: 1,
                    groups: hidden * 2,
                    ..Default::default()
                },
            ),
            conv_point: Conv2d::new(
                &vs / "conv_point",
                hidden,
                out_channels,
                1,
                Conv2dConfig {
                    bias: false,
                    ..Default::default()
                },
            ),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let hs = self.conv_inverted.forward(xs).silu();
        let hs = self.conv_depth.forward(&hs);
        let parts = hs.chunk(2, 1);
        let hs = &parts[0] * parts[1].silu();
        self.conv_point.forward(&hs)
    }
}

/// The timestep (and, for Sprint, guidance) conditioning.
#[derive(Debug)]
pub(crate) enum TimeEmbed {
    Single(AdaLayerNormSingle),
    /// `SanaCombinedTimestepGuidanceEmbeddings`.
    Guidance {
        timestep_embedder: TimestepEmbedding,
        guidance_embedder: TimestepEmbedding,
        linear: Linear,
    },
}

impl TimeEmbed {
    /// `AdaLayerNormSingle`, or with `guidance` SANA-Sprint's combined embedding.
    pub(crate) fn new(vs: nn::Path, dim: i64, guidance: bool) -> Self {
        if guidance {
            TimeEmbed::Guidance {
                timestep_embedder: TimestepEmbedding::new(&vs / "timestep_embedder", 256, dim),
                guidance_embedder: TimestepEmbedding::new(&vs / "guidance_embedder", 256, dim),
                linear: Linear::new(&vs / "linear", dim, 6 * dim, true),
            }
        } else {
            TimeEmbed::Single(AdaLayerNormSingle::new(vs, dim))
        }
    }

    pub(crate) fn linears(&self) -> Vec<&Linear> {
        match self {
            TimeEmbed::Single(ada) => ada.linears(),
            TimeEmbed::Guidance {
                timestep_embedder,
                guidance_embedder,
                linear,
            } => {
                let mut v = timestep_embedder.linears();
                v.extend(guidance_embedder.linears());
                v.push(linear);
                v
            }
        }
    }

    /// `(temb [B, 6D], embedded_timestep [B, D])`.
    pub(crate) fn forward(
        &self,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        kind: Kind,
    ) -> Result<(Tensor, Tensor)> {
        match (self, guidance) {
            (TimeEmbed::Single(ada), None) => Ok(ada.forward(timestep, kind)),
            (TimeEmbed::Single(_), Some(_)) => Err(SanaError::input(
                "guidance",
                "this model has guidance_embeds = false; do not pass guidance",
            )),
            (TimeEmbed::Guidance { .. }, None) => Err(SanaError::input(
                "guidance",
                "this model has guidance_embeds = true (SANA-Sprint); a guidance tensor [B] is required",
            )),
            (
                TimeEmbed::Guidance {
                    timestep_embedder,
                    guidance_embedder,
                    linear,
                },
                Some(g),
            ) => {
                let t = timestep_embedder.forward(&SANA_TIME_PROJ.forward(timestep).to_kind(kind));
                let g = guidance_embedder.forward(&SANA_TIME_PROJ.forward(g).to_kind(kind));
                let cond = t + g;
                Ok((linear.forward(&cond.silu()), cond))
            }
        }
    }
}

/// The shape of a SANA block's two attentions (image and video blocks alike).
pub(crate) struct BlockAttentionConfig<'a> {
    pub dim: i64,
    pub heads: i64,
    pub head_dim: i64,
    pub cross_heads: i64,
    pub cross_head_dim: i64,
    pub cross_attention_dim: Option<i64>,
    pub attention_bias: bool,
    pub qk_norm: Option<&'a str>,
    pub norm_eps: f64,
    pub norm_elementwise_affine: bool,
}

/// A SANA block's linear self-attention and caption cross-attention with their
/// norms, under diffusers' names (`norm1`, `attn1`, `norm2`, `attn2`).
pub(crate) struct BlockAttention {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
}

impl BlockAttention {
    pub(crate) fn new(vs: &nn::Path, c: &BlockAttentionConfig<'_>) -> Self {
        let qk_norm = QkNorm::parse(c.qk_norm).expect("validated config");
        Self {
            norm1: LayerNorm::new(vs / "norm1", c.dim, c.norm_eps, false),
            attn1: Attention::new(
                vs / "attn1",
                AttentionConfig {
                    query_dim: c.dim,
                    cross_attention_dim: None,
                    heads: c.heads,
                    dim_head: c.head_dim,
                    kv_heads: qk_norm.map(|_| c.heads),
                    bias: c.attention_bias,
                    out_bias: true,
                    qk_norm,
                    eps: 1e-5,
                    processor: Processor::SanaLinear,
                },
            ),
            norm2: LayerNorm::new(vs / "norm2", c.dim, c.norm_eps, c.norm_elementwise_affine),
            attn2: Attention::new(
                vs / "attn2",
                AttentionConfig {
                    query_dim: c.dim,
                    cross_attention_dim: c.cross_attention_dim,
                    heads: c.cross_heads,
                    dim_head: c.cross_head_dim,
                    kv_heads: qk_norm.map(|_| c.cross_heads),
                    bias: true,
                    out_bias: true,
                    qk_norm,
                    eps: 1e-5,
                    processor: Processor::Sana,
                },
            ),
        }
    }
}

/// One SANA block: modulated linear self-attention, cross-attention, GLUMBConv.
#[derive(Debug)]
pub struct SanaTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    ff: GLUMBConv,
    scale_shift_table: Tensor,
}

impl SanaTransformerBlock {
    pub fn new(vs: nn::Path, cfg: &SanaTransformerConfig) -> Self {
        let dim = cfg.inner_dim();
        let BlockAttention {
            norm1,
            attn1,
            norm2,
            attn2,
        } = BlockAttention::new(
            &vs,
            &BlockAttentionConfig {
                dim,
                heads: cfg.num_attention_heads,
                head_dim: cfg.attention_head_dim,
                cross_heads: cfg.num_cross_attention_heads.expect("validated config"),
                cross_head_dim: cfg.cross_attention_head_dim.expect("validated config"),
                cross_attention_dim: cfg.cross_attention_dim,
                attention_bias: cfg.attention_bias,
                qk_norm: cfg.qk_norm.as_deref(),
                norm_eps: cfg.norm_eps,
                norm_elementwise_affine: cfg.norm_elementwise_affine,
            },
        );
        Self {
            norm1,
            attn1,
            norm2,
            attn2,
            ff: GLUMBConv::new(&vs / "ff", dim, dim, cfg.mlp_ratio),
            scale_shift_table: vs.var(
                "scale_shift_table",
                &[6, dim],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0 / (dim as f64).sqrt(),
                },
            ),
        }
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut v = self.attn1.linears();
        v.extend(self.attn2.linears());
        v
    }

    /// `timestep`: the `[B, 6D]` modulation; `height`/`width`: the token grid.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        encoder_bias: Option<&Tensor>,
        timestep: &Tensor,
        height: i64,
        width: i64,
    ) -> Tensor {
        let b = hidden_states.size()[0];
        let m = (self.scale_shift_table.unsqueeze(0) + timestep.reshape([b, 6, -1])).chunk(6, 1);
        let (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) =
            (&m[0], &m[1], &m[2], &m[3], &m[4], &m[5]);

        let norm_hs = self.norm1.forward(hidden_states);
        let norm_hs = (norm_hs * (scale_msa + 1.0) + shift_msa).to_kind(hidden_states.kind());
        let attn_out = self.attn1.forward(&norm_hs, None, None);
        let hidden_states = hidden_states + gate_msa * attn_out;

        let attn_out =
            self.attn2
                .forward(&hidden_states, Some(encoder_hidden_states), encoder_bias);
        let hidden_states = attn_out + hidden_states;

        let norm_hs = self.norm2.forward(&hidden_states);
        let norm_hs = norm_hs * (scale_mlp + 1.0) + shift_mlp;
        let norm_hs = norm_hs.unflatten(1, [height, width]).permute([0, 3, 1, 2]);
        let ff_out = self.ff.forward(&norm_hs).flatten(2, 3).permute([0, 2, 1]);
        hidden_states + gate_mlp * ff_out
    }
}

/// Inputs of one transformer forward, as diffusers' `forward` takes them.
#[derive(Debug)]
pub struct TransformerInputs<'a> {
    /// `[B, C, H, W]` latents (`[B, C, T, H, W]` for the video model).
    pub hidden_states: &'a Tensor,
    /// `[B, L, caption_channels]` text-encoder states.
    pub encoder_hidden_states: &'a Tensor,
    /// `[B]` timesteps (0..1000 scale, already multiplied by `timestep_scale`).
    pub timestep: &'a Tensor,
    /// `[B]` guidance (Sprint only, already multiplied by `guidance_embeds_scale`).
    pub guidance: Option<&'a Tensor>,
    /// `[B, L]` caption mask: 1 keep, 0 padding.
    pub encoder_attention_mask: Option<&'a Tensor>,
}

/// diffusers' `SanaTransformer2DModel`. Parameters live in `vs` under diffusers'
/// names, so checkpoints load and save by name. LoRA adapters (PEFT's, on any of
/// its Linears) live in `lora`, outside `vs`.
/// `SanaModulatedNorm` then the output projection: the end of both SANA
/// transformers, before they unpatchify.
pub(crate) fn modulated_output(
    hs: &Tensor,
    scale_shift_table: &Tensor,
    ctx: &BlockContext,
    proj_out: &Linear,
) -> Tensor {
    let hs = hs.layer_norm([hs.size()[2]], None::<Tensor>, None::<Tensor>, 1e-6, true);
    let m = (scale_shift_table.unsqueeze(0) + ctx.embedded_timestep.unsqueeze(1)).chunk(2, 1);
    let hs = hs * (&m[1] + 1.0) + &m[0];
    proj_out.forward(&hs)
}

/// What every block takes besides the hidden states, from
/// [`SanaTransformer2DModel::prelude`].
#[derive(Debug)]
pub struct BlockContext {
    /// `[B, L, D]` projected, normalised captions.
    pub enc: Tensor,
    /// The caption mask as an additive bias (None: no mask).
    pub encoder_bias: Option<Tensor>,
    /// `[B, 6·D]` the blocks' modulation.
    pub temb: Tensor,
    /// `[B, D]` the final norm's modulation.
    pub embedded_timestep: Tensor,
    pub b: i64,
    /// Latent frames after patching (1 for images).
    pub f: i64,
    pub h: i64,
    pub w: i64,
    /// The video model's rotary tables `(cos, sin)` (None for images).
    pub rope: Option<(Tensor, Tensor)>,
}

pub struct SanaTransformer2DModel {
    pub config: SanaTransformerConfig,
    pub vs: nn::VarStore,
    pub lora: LoraAdapters,
    patch_embed: PatchEmbed,
    time_embed: TimeEmbed,
    caption_projection: PixArtAlphaTextProjection,
    caption_norm: RMSNorm,
    transformer_blocks: Vec<SanaTransformerBlock>,
    scale_shift_table: Tensor,
    proj_out: Linear,
}

impl std::fmt::Debug for SanaTransformer2DModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SanaTransformer2DModel")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl SanaTransformer2DModel {
    /// Builds a randomly initialised model (diffusers' init distributions) in fp32
    /// on `device`. Validates the config first.
    pub fn new(config: SanaTransformerConfig, device: Device) -> Result<Self> {
        modeling_utils::check_config(&config)?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let dim = config.inner_dim();
        let patch_embed = PatchEmbed::new(
            &root / "patch_embed",
            config.sample_size,
            config.patch_size,
            config.in_channels,
            dim,
            config.interpolation_scale,
        );
        let time_embed = TimeEmbed::new(&root / "time_embed", dim, config.guidance_embeds);
        let caption_projection = PixArtAlphaTextProjection::new(
            &root / "caption_projection",
            config.caption_channels,
            dim,
        );
        let caption_norm = RMSNorm::new(&root / "caption_norm", dim, 1e-5, true, false);
        let blocks = &root / "transformer_blocks";
        let transformer_blocks: Vec<SanaTransformerBlock> = (0..config.num_layers)
            .map(|i| SanaTransformerBlock::new(&blocks / i, &config))
            .collect();
        let scale_shift_table = root.var(
            "scale_shift_table",
            &[2, dim],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0 / (dim as f64).sqrt(),
            },
        );
        let p = config.patch_size;
        let proj_out = Linear::new(&root / "proj_out", dim, p * p * config.out_channels(), true);
        // diffusers' `named_modules()` order: time_embed, caption_projection, blocks, proj_out.
        let mut linears = time_embed.linears();
        linears.extend(caption_projection.linears());
        for b in &transformer_blocks {
            linears.extend(SanaTransformerBlock::linears(b));
        }
        linears.push(&proj_out);
        let slots = linears.into_iter().map(|l| l.lora_slot().clone()).collect();
        let lora = LoraAdapters::new(slots, &vs);
        Ok(Self {
            config,
            vs,
            lora,
            patch_embed,
            time_embed,
            caption_projection,
            caption_norm,
            transformer_blocks,
            scale_shift_table,
            proj_out,
        })
    }

    /// Loads a diffusers model directory (`config.json` plus
    /// `diffusion_pytorch_model.safetensors` or a sharded index), then casts to `kind`.
    pub fn from_pretrained(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config: SanaTransformerConfig = modeling_utils::read_config(dir)?;
        let mut model = Self::new(config, device)?;
        modeling_utils::load_weights(&mut model.vs, dir)?;
        model.set_kind(kind);
        Ok(model)
    }

    /// Writes `config.json` and `diffusion_pytorch_model.safetensors` as diffusers'
    /// `save_pretrained` does.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        modeling_utils::save_pretrained(&self.vs, &self.config, dir)
    }

    /// `save_pretrained` in a chosen dtype, sharded past `max_shard_size`: the
    /// full-weight export users load with diffusers' `from_pretrained`.
    pub fn save_pretrained_with(
        &self,
        dir: &Path,
        opts: &modeling_utils::SaveOptions,
    ) -> Result<()> {
        modeling_utils::save_pretrained_with(&self.vs, &self.config, dir, opts)
    }

    /// Casts all parameters (fp32 / bf16 / fp16), LoRA adapters included.
    pub fn set_kind(&mut self, kind: Kind) {
        self.vs.set_kind(kind);
        self.lora.set_kind(kind);
    }

    pub fn kind(&self) -> Kind {
        self.scale_shift_table.kind()
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Checks shapes of the inputs against the config, naming the bad input.
    fn check_inputs(&self, x: &TransformerInputs<'_>) -> Result<()> {
        let c = &self.config;
        let hs = x.hidden_states.size();
        if hs.len() != 4 || hs[1] != c.in_channels {
            return Err(SanaError::input(
                "hidden_states",
                format!("expected [B, {}, H, W], got {hs:?}", c.in_channels),
            ));
        }
        if hs[2] % c.patch_size != 0 || hs[3] % c.patch_size != 0 {
            return Err(SanaError::input(
                "hidden_states",
                format!(
                    "H and W must be multiples of patch_size {}, got {hs:?}",
                    c.patch_size
                ),
            ));
        }
        let b = hs[0];
        let enc = x.encoder_hidden_states.size();
        if enc.len() != 3 || enc[0] != b || enc[2] != c.caption_channels {
            return Err(SanaError::input(
                "encoder_hidden_states",
                format!("expected [{b}, L, {}], got {enc:?}", c.caption_channels),
            ));
        }
        if x.timestep.size() != [b] {
            return Err(SanaError::input(
                "timestep",
                format!("expected [{b}], got {:?}", x.timestep.size()),
            ));
        }
        if let Some(g) = x.guidance {
            if g.size() != [b] {
                return Err(SanaError::input(
                    "guidance",
                    format!("expected [{b}], got {:?}", g.size()),
                ));
            }
        }
        if let Some(m) = x.encoder_attention_mask {
            if m.size() != [b, enc[1]] {
                return Err(SanaError::input(
                    "encoder_attention_mask",
                    format!("expected [{b}, {}], got {:?}", enc[1], m.size()),
                ));
            }
        }
        Ok(())
    }

    /// The velocity prediction `[B, out_channels, H, W]`.
    pub fn forward(&self, x: &TransformerInputs<'_>) -> Result<Tensor> {
        let (mut hs, ctx) = self.prelude(x)?;
        for i in 0..self.num_blocks() {
            hs = self.block_forward(i, &hs, &ctx);
        }
        Ok(self.finale(&hs, &ctx))
    }

    pub fn num_blocks(&self) -> usize {
        self.transformer_blocks.len()
    }

    /// Everything before the blocks: patch, timestep and caption embeddings.
    /// FSDP runs the model in these three stages (`training::fsdp`).
    pub fn prelude(&self, x: &TransformerInputs<'_>) -> Result<(Tensor, BlockContext)> {
        self.check_inputs(x)?;
        let kind = self.kind();
        let dev = self.device();
        let hidden_states = x.hidden_states.to_device(dev).to_kind(kind);
        let encoder_hidden_states = x.encoder_hidden_states.to_device(dev).to_kind(kind);
        let timestep = x.timestep.to_device(dev);
        let guidance = x.guidance.map(|g| g.to_device(dev));
        let encoder_bias = x
            .encoder_attention_mask
            .map(|m| mask_to_bias(&m.to_device(dev), kind))
            .transpose()?;

        let size = hidden_states.size();
        let (b, p) = (size[0], self.config.patch_size);
        let (h, w) = (size[2] / p, size[3] / p);

        let hs = self.patch_embed.forward(&hidden_states);
        let (temb, embedded_timestep) =
            self.time_embed
                .forward(&timestep, guidance.as_ref(), kind)?;
        let enc = self.caption_projection.forward(&encoder_hidden_states);
        let enc = enc.view([b, -1, hs.size()[2]]);
        let enc = self.caption_norm.forward(&enc);
        Ok((
            hs,
            BlockContext {
                enc,
                encoder_bias,
                temb,
                embedded_timestep,
                b,
                f: 1,
                h,
                w,
                rope: None,
            },
        ))
    }

    /// Block `i` on the hidden states `[B, h·w, D]`.
    pub fn block_forward(&self, i: usize, hs: &Tensor, ctx: &BlockContext) -> Tensor {
        self.transformer_blocks[i].forward(
            hs,
            &ctx.enc,
            ctx.encoder_bias.as_ref(),
            &ctx.temb,
            ctx.h,
            ctx.w,
        )
    }

    /// After the blocks: modulated norm, output projection, unpatchify.
    pub fn finale(&self, hs: &Tensor, ctx: &BlockContext) -> Tensor {
        let (b, h, w, p) = (ctx.b, ctx.h, ctx.w, self.config.patch_size);
        let hs = modulated_output(hs, &self.scale_shift_table, ctx, &self.proj_out);

        // Unpatchify: [B, h, w, p, p, C] → [B, C, h·p, w·p].
        let hs = hs.reshape([b, h, w, p, p, -1]).permute([0, 5, 1, 3, 2, 4]);
        hs.reshape([b, -1, h * p, w * p])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{load_named, max_abs_diff, parity_case};

    fn run_case(model: &SanaTransformer2DModel, dir: &Path) -> (Tensor, Tensor) {
        let inputs = load_named(&dir.join("inputs.safetensors"));
        let expected = load_named(&dir.join("outputs.safetensors"))["sample"].shallow_clone();
        let got = tch::no_grad(|| {
            model.forward(&TransformerInputs {
                hidden_states: &inputs["hidden_states"],
                encoder_hidden_states: &inputs["encoder_hidden_states"],
                timestep: &inputs["timestep"],
                guidance: inputs.get("guidance"),
                encoder_attention_mask: inputs.get("encoder_attention_mask"),
            })
        })
        .unwrap();
        (got, expected)
    }

    fn check(case: &str, kind: Kind, tol: f64) {
        let dir = parity_case(&format!("transformer_{case}"));
        let model =
            SanaTransformer2DModel::from_pretrained(&dir.join("model"), Device::Cpu, kind).unwrap();
        let (got, expected) = run_case(&model, &dir);
        assert_eq!(got.kind(), expected.kind());
        let err = max_abs_diff(&got, &expected);
        let scale = expected.abs().max().double_value(&[]);
        eprintln!("transformer {case}: max abs err {err:.3e} (output max {scale:.3})");
        assert!(err <= tol, "{case}: max abs error {err:e} > {tol:e}");
    }

    #[test]
    fn parity_sana10() {
        check("sana10", Kind::Float, 1e-4);
    }

    #[test]
    fn parity_sana10_position_embedding_patch2() {
        check("sana10_pe", Kind::Float, 1e-4);
    }

    #[test]
    fn parity_sana15_qk_norm() {
        check("sana15", Kind::Float, 1e-4);
    }

    #[test]
    fn parity_sprint_guidance() {
        check("sprint", Kind::Float, 1e-4);
    }

    #[test]
    fn parity_sana15_bf16() {
        // Same kernels as diffusers in bf16; allow a few bf16 ulps of the output scale.
        check("sana15_bf16", Kind::BFloat16, 3e-2);
    }

    /// The parity check must notice a single wrong weight.
    #[test]
    fn parity_fails_when_a_weight_is_perturbed() {
        let dir = parity_case("transformer_sana10");
        let model =
            SanaTransformer2DModel::from_pretrained(&dir.join("model"), Device::Cpu, Kind::Float)
                .unwrap();
        let vars = model.vs.variables();
        let w = &vars["transformer_blocks.1.attn2.to_v.weight"];
        tch::no_grad(|| {
            let _ = w.get(0).get(0).g_add_scalar_(1e-2);
        });
        let (got, expected) = run_case(&model, &dir);
        let err = max_abs_diff(&got, &expected);
        eprintln!("perturbed weight: max abs err {err:.3e}");
        assert!(
            err > 1e-4,
            "perturbing a weight went unnoticed (err {err:e})"
        );
    }

    fn tiny_config() -> SanaTransformerConfig {
        SanaTransformerConfig {
            in_channels: 4,
            out_channels: Some(4),
            num_attention_heads: 2,
            attention_head_dim: 4,
            num_layers: 1,
            num_cross_attention_heads: Some(2),
            cross_attention_head_dim: Some(4),
            cross_attention_dim: Some(8),
            caption_channels: 6,
            ..Default::default()
        }
    }

    fn saved_tiny() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let model = SanaTransformer2DModel::new(tiny_config(), Device::Cpu).unwrap();
        model.save_pretrained(dir.path()).unwrap();
        dir
    }

    fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
        let path = dir.join("diffusion_pytorch_model.safetensors");
        let mut named = Tensor::read_safetensors(&path).unwrap();
        edit(&mut named);
        Tensor::write_safetensors(&named, &path).unwrap();
    }

    fn load_err(dir: &Path) -> String {
        let err =
            SanaTransformer2DModel::from_pretrained(dir, Device::Cpu, Kind::Float).unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "error is one line: {msg}");
        msg
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = saved_tiny();
        let a =
            SanaTransformer2DModel::from_pretrained(dir.path(), Device::Cpu, Kind::Float).unwrap();
        let b =
            SanaTransformer2DModel::from_pretrained(dir.path(), Device::Cpu, Kind::Float).unwrap();
        assert_eq!(a.config, tiny_config());
        for (name, t) in a.vs.variables() {
            assert_eq!(max_abs_diff(&t, &b.vs.variables()[&name]), 0.0, "{name}");
        }
    }

    #[test]
    fn missing_key_is_named() {
        let dir = saved_tiny();
        rewrite_weights(dir.path(), |n| n.retain(|(k, _)| k != "proj_out.bias"));
        let msg = load_err(dir.path());
        assert!(msg.contains("missing key `proj_out.bias`"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    }

    #[test]
    fn unexpected_key_is_named() {
        let dir = saved_tiny();
        rewrite_weights(dir.path(), |n| {
            n.push((
                "transformer_blocks.7.ff.bias".into(),
                Tensor::zeros([3], (Kind::Float, Device::Cpu)),
            ))
        });
        let msg = load_err(dir.path());
        assert!(
            msg.contains("unexpected key `transformer_blocks.7.ff.bias`"),
            "{msg}"
        );
        assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
    }

    #[test]
    fn wrong_shape_is_named() {
        let dir = saved_tiny();
        rewrite_weights(dir.path(), |n| {
            for (k, t) in n.iter_mut() {
                if k == "caption_projection.linear_1.weight" {
                    *t = Tensor::zeros([8, 5], (Kind::Float, Device::Cpu));
                }
            }
        });
        let msg = load_err(dir.path());
        assert!(
            msg.contains("caption_projection.linear_1.weight") && msg.contains("[8, 5]"),
            "{msg}"
        );
    }

    #[test]
    fn bad_json_names_file_and_key() {
        let dir = saved_tiny();
        let cfg = dir.path().join("config.json");
        std::fs::write(&cfg, r#"{"num_layers": "two"}"#).unwrap();
        let msg = load_err(dir.path());
        assert!(
            msg.contains("config.json") && msg.contains("num_layers"),
            "{msg}"
        );
        std::fs::write(&cfg, "{not json").unwrap();
        let msg = load_err(dir.path());
        assert!(msg.contains("config.json"), "{msg}");
        std::fs::write(&cfg, r#"{"qk_norm": "l2"}"#).unwrap();
        let msg = load_err(dir.path());
        assert!(msg.contains("qk_norm"), "{msg}");
    }

    #[test]
    fn sharded_checkpoint_loads() {
        let dir = saved_tiny();
        let path = dir.path().join("diffusion_pytorch_model.safetensors");
        let named = Tensor::read_safetensors(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let (a, b) = named.split_at(named.len() / 2);
        let mut map = serde_json::Map::new();
        for (i, part) in [a, b].iter().enumerate() {
            let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
            Tensor::write_safetensors(part, dir.path().join(&file)).unwrap();
            for (k, _) in part.iter() {
                map.insert(k.clone(), file.clone().into());
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(
            dir.path()
                .join("diffusion_pytorch_model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        SanaTransformer2DModel::from_pretrained(dir.path(), Device::Cpu, Kind::Float).unwrap();
    }

    /// The full-weight export: fp32 and bf16, sharded past a small limit, loads
    /// back in sana-rl and in diffusers' `from_pretrained` with the same output.
    #[test]
    fn full_weight_export_loads_in_diffusers() {
        use crate::models::modeling_utils::{SaveOptions, WEIGHTS_INDEX_NAME, WEIGHTS_NAME};
        let dir = parity_case("transformer_sana15");
        let model =
            SanaTransformer2DModel::from_pretrained(&dir.join("model"), Device::Cpu, Kind::Float)
                .unwrap();
        let inputs = dir.join("inputs.safetensors");
        for (kind, shard, tol) in [(Kind::Float, 20_000, 1e-5), (Kind::BFloat16, 10_000, 1e-4)] {
            let out = tempfile::tempdir().unwrap();
            let opts = SaveOptions {
                kind: Some(kind),
                max_shard_size: shard,
            };
            // A first unsharded save: the sharded one must replace its weight file.
            model.save_pretrained(out.path()).unwrap();
            model.save_pretrained_with(out.path(), &opts).unwrap();
            assert!(!out.path().join(WEIGHTS_NAME).exists());
            let index: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.path().join(WEIGHTS_INDEX_NAME)).unwrap(),
            )
            .unwrap();
            let files: std::collections::BTreeSet<&str> = index["weight_map"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert!(files.len() > 2, "{kind:?}: {files:?}");
            for f in &files {
                let size = std::fs::metadata(out.path().join(f)).unwrap().len();
                assert!(size < shard + 4096, "{f}: {size} bytes");
                let t = Tensor::read_safetensors(out.path().join(f)).unwrap();
                assert!(t.iter().all(|(_, t)| t.kind() == kind));
            }
            // Ours, computing in fp32 from the exported values.
            let again =
                SanaTransformer2DModel::from_pretrained(out.path(), Device::Cpu, Kind::Float)
                    .unwrap();
            let (ours, _) = run_case(&again, &dir);
            if kind == Kind::Float {
                let (orig, _) = run_case(&model, &dir);
                assert_eq!(max_abs_diff(&ours, &orig), 0.0);
            }
            let expected = out.path().join("expected.safetensors");
            Tensor::write_safetensors(&[("sample", &ours.contiguous())], &expected).unwrap();
            let tol = tol.to_string();
            crate::testing::run_parity_check(
                "check_transformer_export.py",
                &[
                    out.path().as_os_str(),
                    inputs.as_os_str(),
                    expected.as_os_str(),
                    tol.as_ref(),
                ],
                &format!("diffusers rejected our {kind:?} export"),
            );
        }
    }

    #[test]
    fn sizes_parse_as_diffusers_writes_them() {
        use crate::models::modeling_utils::parse_size;
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("5GiB"), Ok(5 << 30));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("1234"), Ok(1234));
        assert!(parse_size("ten").unwrap_err().contains("expected a size"));
        assert!(parse_size("3XB").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn bad_inputs_are_named() {
        let model = SanaTransformer2DModel::new(tiny_config(), Device::Cpu).unwrap();
        let f = (Kind::Float, Device::Cpu);
        let hs = Tensor::zeros([2, 4, 3, 5], f);
        let enc = Tensor::zeros([2, 7, 6], f);
        let t = Tensor::zeros([2], f);
        let bad_mask = Tensor::ones([2, 6], f);
        let err = model
            .forward(&TransformerInputs {
                hidden_states: &hs,
                encoder_hidden_states: &enc,
                timestep: &t,
                guidance: None,
                encoder_attention_mask: Some(&bad_mask),
            })
            .unwrap_err();
        assert!(err.to_string().contains("encoder_attention_mask"), "{err}");
        let err = model
            .forward(&TransformerInputs {
                hidden_states: &hs,
                encoder_hidden_states: &enc,
                timestep: &t,
                guidance: Some(&t),
                encoder_attention_mask: None,
            })
            .unwrap_err();
        assert!(err.to_string().contains("guidance"), "{err}");
    }
}
