//! `diffusers/models/transformers/transformer_sana_video.py`:
//! `SanaVideoTransformer3DModel`, SANA with a time axis. It is the image model's
//! blocks (`sana_transformer.rs`) with four changes: a Conv3d patch embedding
//! (`patch_size = (1, 2, 2)`), Wan's rotary position embedding over
//! (frame, row, column) inside the linear self-attention, a temporal 3-tap
//! convolution after the feed-forward (`GLUMBTempConv`), and no `timestep_scale`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::sana_transformer::{
    modulated_output, BlockAttention, BlockAttentionConfig, BlockContext, GLUMBConv, TimeEmbed,
    TransformerInputs,
};
use crate::lora::LoraAdapters;
use crate::models::attention_processor::{mask_to_bias, Attention, QkNorm};
use crate::models::embeddings::PixArtAlphaTextProjection;
use crate::models::layers::{LayerNorm, Linear};
use crate::models::modeling_utils::{self, ModelConfig};
use crate::models::normalization::RMSNorm;
use crate::{Result, SanaError};

/// `config.json` of a `SanaVideoTransformer3DModel`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SanaVideoTransformerConfig {
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
    /// Used by the pipeline (resolution bins), not by the model.
    pub sample_size: i64,
    /// `(frames, rows, columns)` per token.
    pub patch_size: [i64; 3],
    pub norm_elementwise_affine: bool,
    pub norm_eps: f64,
    /// Stored by diffusers, unused.
    pub interpolation_scale: Option<f64>,
    pub guidance_embeds: bool,
    /// Stored by diffusers, unused by the model and the video pipeline.
    pub guidance_embeds_scale: f64,
    pub qk_norm: Option<String>,
    /// Length of the rotary tables: frames, rows and columns of the token grid
    /// must each be at most this.
    pub rope_max_seq_len: i64,
}

impl Default for SanaVideoTransformerConfig {
    fn default() -> Self {
        Self {
            in_channels: 16,
            out_channels: Some(16),
            num_attention_heads: 20,
            attention_head_dim: 112,
            num_layers: 20,
            num_cross_attention_heads: Some(20),
            cross_attention_head_dim: Some(112),
            cross_attention_dim: Some(2240),
            caption_channels: 2304,
            mlp_ratio: 2.5,
            dropout: 0.0,
            attention_bias: false,
            sample_size: 30,
            patch_size: [1, 2, 2],
            norm_elementwise_affine: false,
            norm_eps: 1e-6,
            interpolation_scale: None,
            guidance_embeds: false,
            guidance_embeds_scale: 0.1,
            qk_norm: Some("rms_norm_across_heads".into()),
            rope_max_seq_len: 1024,
        }
    }
}

impl ModelConfig for SanaVideoTransformerConfig {
    const CLASS_NAME: &'static str = "SanaVideoTransformer3DModel";
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
        "rope_max_seq_len",
    ];

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        for (key, v) in [
            ("in_channels", self.in_channels),
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("caption_channels", self.caption_channels),
            ("rope_max_seq_len", self.rope_max_seq_len),
        ] {
            if v <= 0 {
                return Err((key.into(), format!("must be positive, got {v}")));
            }
        }
        if self.patch_size.iter().any(|&p| p <= 0) {
            return Err((
                "patch_size".into(),
                format!("must be positive, got {:?}", self.patch_size),
            ));
        }
        if self.num_layers < 0 {
            return Err(("num_layers".into(), "must not be negative".into()));
        }
        let (t, hw) = rope_split(self.attention_head_dim);
        if t % 2 != 0 || hw % 2 != 0 {
            return Err((
                "attention_head_dim".into(),
                format!(
                    "{} splits into rotary parts {t}/{hw}/{hw}; each must be even",
                    self.attention_head_dim
                ),
            ));
        }
        QkNorm::parse(self.qk_norm.as_deref()).map_err(|m| ("qk_norm".to_string(), m))?;
        for (key, v) in [
            ("num_cross_attention_heads", self.num_cross_attention_heads),
            ("cross_attention_head_dim", self.cross_attention_head_dim),
        ] {
            if !matches!(v, Some(v) if v > 0) {
                return Err((
                    key.into(),
                    "SANA-Video needs cross-attention: set a positive value".into(),
                ));
            }
        }
        if self.cross_attention_dim != Some(self.inner_dim()) {
            return Err((
                "cross_attention_dim".into(),
                format!(
                    "must equal num_attention_heads × attention_head_dim = {} (the captions are \
                     projected to that width before the cross-attention)",
                    self.inner_dim()
                ),
            ));
        }
        Ok(())
    }
}

impl SanaVideoTransformerConfig {
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> i64 {
        self.out_channels.unwrap_or(self.in_channels)
    }
}

/// Wan's split of a head's channels over (frame, row, column): `(t, h = w)`.
fn rope_split(head_dim: i64) -> (i64, i64) {
    let hw = 2 * (head_dim / 6);
    (head_dim - 2 * hw, hw)
}

/// `WanRotaryPosEmbed`: cos/sin tables `[max_len, d]` (fp32, computed in fp64),
/// each angle repeated for an interleaved channel pair, parts [t | h | w].
#[derive(Debug)]
struct WanRotaryPosEmbed {
    cos: [Tensor; 3],
    sin: [Tensor; 3],
}

impl WanRotaryPosEmbed {
    fn new(head_dim: i64, max_len: i64, device: Device) -> Self {
        let (t, hw) = rope_split(head_dim);
        let table = |dim: i64| {
            let f64s = (Kind::Double, device);
            let inv = ((Tensor::arange_start_step(0, dim, 2, f64s) / dim as f64)
                * (-(10000f64.ln())))
            .exp();
            let ang = Tensor::arange(max_len, f64s).outer(&inv);
            let twice = |x: Tensor| {
                x.repeat_interleave_self_int(2, Some(1), None)
                    .to_kind(Kind::Float)
            };
            (twice(ang.cos()), twice(ang.sin()))
        };
        let (ct, st) = table(t);
        let (ch, sh) = table(hw);
        let (cw, sw) = table(hw);
        Self {
            cos: [ct, ch, cw],
            sin: [st, sh, sw],
        }
    }

    /// `(cos, sin)`, each `[1, f·h·w, 1, d]` for the token grid (frame-major).
    fn forward(&self, f: i64, h: i64, w: i64) -> (Tensor, Tensor) {
        let grid = |parts: &[Tensor; 3]| {
            let d: Vec<i64> = parts.iter().map(|p| p.size()[1]).collect();
            let pt = parts[0]
                .narrow(0, 0, f)
                .view([f, 1, 1, d[0]])
                .expand([f, h, w, d[0]], false);
            let ph = parts[1]
                .narrow(0, 0, h)
                .view([1, h, 1, d[1]])
                .expand([f, h, w, d[1]], false);
            let pw = parts[2]
                .narrow(0, 0, w)
                .view([1, 1, w, d[2]])
                .expand([f, h, w, d[2]], false);
            Tensor::cat(&[pt, ph, pw], -1).reshape([1, f * h * w, 1, -1])
        };
        (grid(&self.cos), grid(&self.sin))
    }
}

/// `GLUMBTempConv`: SANA's GLUMBConv per frame, then `x + conv_temp(x)`, a
/// dense 3-tap convolution across frames (zero-padded at both ends).
#[derive(Debug)]
struct GLUMBTempConv {
    glumb: GLUMBConv,
    /// `[D, D, 3, 1]`, no bias.
    conv_temp: Tensor,
}

impl GLUMBTempConv {
    fn new(vs: nn::Path, dim: i64, mlp_ratio: f64) -> Self {
        let bound = 1.0 / (3.0 * dim as f64).sqrt();
        let conv_temp = (&vs / "conv_temp").var(
            "weight",
            &[dim, dim, 3, 1],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        Self {
            glumb: GLUMBConv::new(vs, dim, dim, mlp_ratio),
            conv_temp,
        }
    }

    /// `[B, f, h, w, D]` → `[B, f·h·w, D]`.
    fn forward(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        let (b, f, h, w, d) = (s[0], s[1], s[2], s[3], s[4]);
        let y = x.view([b * f, h, w, d]).permute([0, 3, 1, 2]);
        let y = self.glumb.forward(&y); // [B·f, D, h, w]
        let yt = y.view([b, f, d, h * w]).permute([0, 2, 1, 3]); // [B, D, f, h·w]
        let t = yt.conv2d(&self.conv_temp, None::<Tensor>, [1, 1], [1, 0], [1, 1], 1);
        let y = yt + t;
        y.permute([0, 2, 3, 1]).reshape([b, f * h * w, d])
    }
}

/// One SANA-Video block.
#[derive(Debug)]
pub struct SanaVideoTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    ff: GLUMBTempConv,
    scale_shift_table: Tensor,
}

/// What every block takes besides the hidden states.
impl SanaVideoTransformerBlock {
    fn new(vs: nn::Path, cfg: &SanaVideoTransformerConfig) -> Self {
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
            ff: GLUMBTempConv::new(&vs / "ff", dim, cfg.mlp_ratio),
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

    fn forward(&self, x: &Tensor, ctx: &BlockContext) -> Tensor {
        let b = x.size()[0];
        let m = (self.scale_shift_table.unsqueeze(0) + ctx.temb.reshape([b, 6, -1])).chunk(6, 1);
        let (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) =
            (&m[0], &m[1], &m[2], &m[3], &m[4], &m[5]);
        let n = (self.norm1.forward(x) * (scale_msa + 1.0) + shift_msa).to_kind(x.kind());
        let (cos, sin) = ctx
            .rope
            .as_ref()
            .expect("the video prelude sets the rotary tables");
        let attn = self.attn1.linear_attention_rope(&n, cos, sin);
        let x = x + gate_msa * attn;
        let x = self
            .attn2
            .forward(&x, Some(&ctx.enc), ctx.encoder_bias.as_ref())
            + &x;
        let n = self.norm2.forward(&x) * (scale_mlp + 1.0) + shift_mlp;
        let ff = self.ff.forward(&n.unflatten(1, [ctx.f, ctx.h, ctx.w]));
        x + gate_mlp * ff
    }
}

pub struct SanaVideoTransformer3DModel {
    pub config: SanaVideoTransformerConfig,
    pub vs: nn::VarStore,
    pub lora: LoraAdapters,
    rope: WanRotaryPosEmbed,
    /// Conv3d `[D, C, pt, ph, pw]` and its bias.
    patch_weight: Tensor,
    patch_bias: Tensor,
    time_embed: TimeEmbed,
    caption_projection: PixArtAlphaTextProjection,
    caption_norm: RMSNorm,
    transformer_blocks: Vec<SanaVideoTransformerBlock>,
    scale_shift_table: Tensor,
    proj_out: Linear,
}

impl std::fmt::Debug for SanaVideoTransformer3DModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SanaVideoTransformer3DModel")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl SanaVideoTransformer3DModel {
    /// A randomly initialised model in fp32 on `device` (config validated first).
    pub fn new(config: SanaVideoTransformerConfig, device: Device) -> Result<Self> {
        modeling_utils::check_config(&config)?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let dim = config.inner_dim();
        let [pt, ph, pw] = config.patch_size;
        let pe = &root / "patch_embedding";
        let fan_in = (config.in_channels * pt * ph * pw) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let init = nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let patch_weight = pe.var("weight", &[dim, config.in_channels, pt, ph, pw], init);
        let patch_bias = pe.var("bias", &[dim], init);
        let time_embed = TimeEmbed::new(&root / "time_embed", dim, config.guidance_embeds);
        let caption_projection = PixArtAlphaTextProjection::new(
            &root / "caption_projection",
            config.caption_channels,
            dim,
        );
        let caption_norm = RMSNorm::new(&root / "caption_norm", dim, 1e-5, true, false);
        let blocks = &root / "transformer_blocks";
        let transformer_blocks: Vec<_> = (0..config.num_layers)
            .map(|i| SanaVideoTransformerBlock::new(&blocks / i, &config))
            .collect();
        let scale_shift_table = root.var(
            "scale_shift_table",
            &[2, dim],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0 / (dim as f64).sqrt(),
            },
        );
        let proj_out = Linear::new(
            &root / "proj_out",
            dim,
            pt * ph * pw * config.out_channels(),
            true,
        );
        // diffusers' `named_modules()` order, as the image model's (PEFT keys).
        let mut linears = time_embed.linears();
        linears.extend(caption_projection.linears());
        for b in &transformer_blocks {
            linears.extend(b.linears());
        }
        linears.push(&proj_out);
        let slots = linears.into_iter().map(|l| l.lora_slot().clone()).collect();
        let lora = LoraAdapters::new(slots, &vs);
        let rope =
            WanRotaryPosEmbed::new(config.attention_head_dim, config.rope_max_seq_len, device);
        Ok(Self {
            config,
            vs,
            lora,
            rope,
            patch_weight,
            patch_bias,
            time_embed,
            caption_projection,
            caption_norm,
            transformer_blocks,
            scale_shift_table,
            proj_out,
        })
    }

    /// Loads a diffusers model directory, then casts to `kind` (the rotary
    /// tables stay fp32, as `from_pretrained(torch_dtype=…)` keeps them).
    pub fn from_pretrained(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config: SanaVideoTransformerConfig = modeling_utils::read_config(dir)?;
        let mut model = Self::new(config, device)?;
        modeling_utils::load_weights(&mut model.vs, dir)?;
        model.set_kind(kind);
        Ok(model)
    }

    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        modeling_utils::save_pretrained(&self.vs, &self.config, dir)
    }

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

    fn check_inputs(&self, x: &TransformerInputs<'_>) -> Result<[i64; 3]> {
        let c = &self.config;
        let s = x.hidden_states.size();
        if s.len() != 5 || s[1] != c.in_channels {
            return Err(SanaError::input(
                "hidden_states",
                format!("expected [B, {}, T, H, W], got {s:?}", c.in_channels),
            ));
        }
        let mut grid = [0; 3];
        for (i, (axis, p)) in ["frames", "height", "width"]
            .iter()
            .zip(c.patch_size)
            .enumerate()
        {
            let n = s[2 + i];
            if n % p != 0 {
                return Err(SanaError::input(
                    "hidden_states",
                    format!("{n} latent {axis} is not a multiple of the patch size {p}"),
                ));
            }
            grid[i] = n / p;
            if grid[i] > c.rope_max_seq_len {
                return Err(SanaError::input(
                    "hidden_states",
                    format!(
                        "{} {axis} tokens exceed rope_max_seq_len = {}",
                        grid[i], c.rope_max_seq_len
                    ),
                ));
            }
        }
        let b = s[0];
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
                format!(
                    "expected [{b}] (one per video), got {:?}",
                    x.timestep.size()
                ),
            ));
        }
        if let Some(m) = x.encoder_attention_mask {
            if m.size() != [b, enc[1]] {
                return Err(SanaError::input(
                    "encoder_attention_mask",
                    format!("expected [{b}, {}], got {:?}", enc[1], m.size()),
                ));
            }
        }
        Ok(grid)
    }

    /// The velocity prediction `[B, out_channels, T, H, W]`.
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

    /// Everything before the blocks: patch, timestep and caption embeddings and
    /// the rotary tables. FSDP runs the model in these three stages (`training::fsdp`).
    pub fn prelude(&self, x: &TransformerInputs<'_>) -> Result<(Tensor, BlockContext)> {
        let [f, h, w] = self.check_inputs(x)?;
        let kind = self.kind();
        let dev = self.device();
        let hidden = x.hidden_states.to_device(dev).to_kind(kind);
        let b = hidden.size()[0];
        let [pt, ph, pw] = self.config.patch_size;
        let hs = hidden.conv3d(
            &self.patch_weight,
            Some(&self.patch_bias),
            [pt, ph, pw],
            [0, 0, 0],
            [1, 1, 1],
            1,
        );
        let hs = hs.flatten(2, -1).transpose(1, 2); // [B, N, D]
        let guidance = x.guidance.map(|g| g.to_device(dev));
        let (temb, embedded_timestep) =
            self.time_embed
                .forward(&x.timestep.to_device(dev), guidance.as_ref(), kind)?;
        let enc = x.encoder_hidden_states.to_device(dev).to_kind(kind);
        let enc = self
            .caption_projection
            .forward(&enc)
            .view([b, -1, hs.size()[2]]);
        let enc = self.caption_norm.forward(&enc);
        let encoder_bias = x
            .encoder_attention_mask
            .map(|m| mask_to_bias(&m.to_device(dev), kind))
            .transpose()?;
        let rope = Some(self.rope.forward(f, h, w));
        Ok((
            hs,
            BlockContext {
                enc,
                encoder_bias,
                temb,
                embedded_timestep,
                b,
                f,
                h,
                w,
                rope,
            },
        ))
    }

    /// Block `i` on the hidden states `[B, f·h·w, D]`.
    pub fn block_forward(&self, i: usize, hs: &Tensor, ctx: &BlockContext) -> Tensor {
        self.transformer_blocks[i].forward(hs, ctx)
    }

    /// After the blocks: modulated norm, output projection, unpatchify.
    pub fn finale(&self, hs: &Tensor, ctx: &BlockContext) -> Tensor {
        let (b, f, h, w) = (ctx.b, ctx.f, ctx.h, ctx.w);
        let [pt, ph, pw] = self.config.patch_size;
        let hs = modulated_output(hs, &self.scale_shift_table, ctx, &self.proj_out);
        // Unpatchify: [B, f, h, w, pt, ph, pw, C] → [B, C, f·pt, h·ph, w·pw].
        let hs = hs
            .reshape([b, f, h, w, pt, ph, pw, -1])
            .permute([0, 7, 1, 4, 2, 5, 3, 6]);
        hs.reshape([b, -1, f * pt, h * ph, w * pw])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{load_named, max_abs_diff, parity_case};

    fn check(case: &str, tol: f64) {
        let dir = parity_case(&format!("transformer_{case}"));
        let model = SanaVideoTransformer3DModel::from_pretrained(
            &dir.join("model"),
            Device::Cpu,
            Kind::Float,
        )
        .unwrap();
        let x = load_named(&dir.join("inputs.safetensors"));
        let want = &load_named(&dir.join("outputs.safetensors"))["sample"];
        let got = tch::no_grad(|| {
            model.forward(&TransformerInputs {
                hidden_states: &x["hidden_states"],
                encoder_hidden_states: &x["encoder_hidden_states"],
                timestep: &x["timestep"],
                guidance: None,
                encoder_attention_mask: x.get("encoder_attention_mask"),
            })
        })
        .unwrap();
        assert_eq!(got.size(), want.size());
        let err = max_abs_diff(&got, want);
        let scale = want.abs().max().double_value(&[]);
        eprintln!("video transformer {case}: max abs err {err:.3e} (output max {scale:.3})");
        assert!(err <= tol, "{case}: {err:e} > {tol:e}");
    }

    /// Against diffusers' SanaVideoTransformer3DModel (scripts/parity/video.py):
    /// patch (1, 2, 2), qk-norm, 3 latent frames, a padded caption.
    #[test]
    fn parity_video_transformer() {
        check("video", 1e-4);
    }

    /// Patch (1, 1, 1), no qk-norm, affine norm2, 5 frames on a 4×6 grid.
    #[test]
    fn parity_video_transformer_patch_111() {
        check("video_p111", 1e-4);
    }

    /// The video presets' LoRA targets (attn1/attn2 projections) attach as on
    /// the image model, under PEFT's names, and move the output.
    #[test]
    fn the_presets_lora_targets_attach() {
        use crate::lora::{InitLoraWeights, LoraConfig, TargetModules};
        let dir = parity_case("transformer_video");
        let mut model = SanaVideoTransformer3DModel::from_pretrained(
            &dir.join("model"),
            Device::Cpu,
            Kind::Float,
        )
        .unwrap();
        let targets = ["to_q", "to_k", "to_v", "to_out.0"]
            .iter()
            .flat_map(|t| [format!("attn1.{t}"), format!("attn2.{t}")])
            .collect();
        let mut cfg = LoraConfig::new(4, 4.0, TargetModules::Names(targets));
        cfg.init_lora_weights = InitLoraWeights::Gaussian;
        model.lora.add_adapter("default", &cfg).unwrap();
        let params = model.lora.adapter_parameters("default").unwrap();
        // 2 blocks × 8 projections × (A, B).
        assert_eq!(params.len(), 2 * 8 * 2);
        assert!(
            params[0]
                .0
                .starts_with("transformer_blocks.0.attn1.to_q.lora_A"),
            "{}",
            params[0].0
        );
        let x = load_named(&dir.join("inputs.safetensors"));
        let run = |m: &SanaVideoTransformer3DModel| {
            tch::no_grad(|| {
                m.forward(&TransformerInputs {
                    hidden_states: &x["hidden_states"],
                    encoder_hidden_states: &x["encoder_hidden_states"],
                    timestep: &x["timestep"],
                    guidance: None,
                    encoder_attention_mask: x.get("encoder_attention_mask"),
                })
            })
            .unwrap()
        };
        let base = run(&model);
        tch::no_grad(|| {
            for (_, p) in &params {
                let r = p.randn_like() * 0.1;
                p.shallow_clone().copy_(&r);
            }
        });
        model.lora.set_active("default").unwrap();
        assert!(max_abs_diff(&run(&model), &base) > 1e-3);
    }

    #[test]
    fn the_rotary_split_is_wans() {
        assert_eq!(rope_split(112), (40, 36));
        assert_eq!(rope_split(12), (4, 4));
        assert_eq!(rope_split(8), (4, 2));
    }

    #[test]
    fn bad_configs_and_inputs_are_named() {
        let cfg = SanaVideoTransformerConfig {
            cross_attention_dim: Some(7),
            ..Default::default()
        };
        let e = SanaVideoTransformer3DModel::new(cfg, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cross_attention_dim") && e.contains("2240"),
            "{e}"
        );
        let cfg = SanaVideoTransformerConfig {
            in_channels: 4,
            out_channels: Some(4),
            num_attention_heads: 2,
            attention_head_dim: 12,
            num_layers: 1,
            num_cross_attention_heads: Some(2),
            cross_attention_head_dim: Some(12),
            cross_attention_dim: Some(24),
            caption_channels: 8,
            rope_max_seq_len: 4,
            ..Default::default()
        };
        let model = SanaVideoTransformer3DModel::new(cfg, Device::Cpu).unwrap();
        let f = (Kind::Float, Device::Cpu);
        let enc = Tensor::zeros([1, 3, 8], f);
        let t = Tensor::zeros([1], f);
        let run = |x: &Tensor| {
            model
                .forward(&TransformerInputs {
                    hidden_states: x,
                    encoder_hidden_states: &enc,
                    timestep: &t,
                    guidance: None,
                    encoder_attention_mask: None,
                })
                .map(|o| o.size())
        };
        assert_eq!(
            run(&Tensor::zeros([1, 4, 2, 4, 6], f)).unwrap(),
            [1, 4, 2, 4, 6]
        );
        let odd = run(&Tensor::zeros([1, 4, 2, 5, 6], f))
            .unwrap_err()
            .to_string();
        assert!(
            odd.contains("5 latent height is not a multiple of the patch size 2"),
            "{odd}"
        );
        let long = run(&Tensor::zeros([1, 4, 6, 4, 4], f))
            .unwrap_err()
            .to_string();
        assert!(
            long.contains("6 frames tokens exceed rope_max_seq_len = 4"),
            "{long}"
        );
    }
}
