//! `diffusers/models/attention_processor.py`: the `Attention` module as SANA
//! uses it, with its two processors — `SanaLinearAttnProcessor2_0` (ReLU linear
//! self-attention) and `SanaAttnProcessor2_0` (softmax cross-attention with a
//! caption padding mask).

use tch::{nn, Kind, Tensor};

use super::layers::Linear;
use super::normalization::RMSNorm;
use crate::{Result, SanaError};

/// diffusers' `qk_norm` options that SANA checkpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// `"rms_norm_across_heads"` (SANA 1.5): RMSNorm over all heads' channels.
    RmsNormAcrossHeads,
}

impl QkNorm {
    pub fn parse(name: Option<&str>) -> std::result::Result<Option<QkNorm>, String> {
        match name {
            None => Ok(None),
            Some("rms_norm_across_heads") => Ok(Some(QkNorm::RmsNormAcrossHeads)),
            Some(other) => Err(format!(
                "unsupported qk_norm {other:?}; SANA checkpoints use null or \"rms_norm_across_heads\""
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processor {
    SanaLinear,
    Sana,
}

/// diffusers' `Attention` (the parts SANA exercises).
#[derive(Debug)]
pub struct Attention {
    pub heads: i64,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    norm_q: Option<RMSNorm>,
    norm_k: Option<RMSNorm>,
    processor: Processor,
}

pub struct AttentionConfig {
    pub query_dim: i64,
    pub cross_attention_dim: Option<i64>,
    pub heads: i64,
    pub dim_head: i64,
    pub kv_heads: Option<i64>,
    pub bias: bool,
    pub out_bias: bool,
    pub qk_norm: Option<QkNorm>,
    pub eps: f64,
    pub processor: Processor,
}

impl Attention {
    pub fn new(vs: nn::Path, cfg: AttentionConfig) -> Self {
        let inner_dim = cfg.dim_head * cfg.heads;
        let inner_kv_dim = cfg.kv_heads.map_or(inner_dim, |kv| cfg.dim_head * kv);
        let kv_in = cfg.cross_attention_dim.unwrap_or(cfg.query_dim);
        let (norm_q, norm_k) = match cfg.qk_norm {
            None => (None, None),
            Some(QkNorm::RmsNormAcrossHeads) => (
                Some(RMSNorm::new(
                    &vs / "norm_q",
                    inner_dim,
                    cfg.eps,
                    true,
                    false,
                )),
                Some(RMSNorm::new(
                    &vs / "norm_k",
                    inner_kv_dim,
                    cfg.eps,
                    true,
                    false,
                )),
            ),
        };
        Self {
            heads: cfg.heads,
            to_q: Linear::new(&vs / "to_q", cfg.query_dim, inner_dim, cfg.bias),
            to_k: Linear::new(&vs / "to_k", kv_in, inner_kv_dim, cfg.bias),
            to_v: Linear::new(&vs / "to_v", kv_in, inner_kv_dim, cfg.bias),
            to_out: Linear::new(&vs / "to_out" / 0, inner_dim, cfg.query_dim, cfg.out_bias),
            norm_q,
            norm_k,
            processor: cfg.processor,
        }
    }

    /// Its Linears in `named_modules()` order.
    pub(crate) fn linears(&self) -> Vec<&Linear> {
        vec![&self.to_q, &self.to_k, &self.to_v, &self.to_out]
    }

    fn qkv(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> (Tensor, Tensor, Tensor) {
        let mut q = self.to_q.forward(hidden_states);
        let mut k = self.to_k.forward(encoder_hidden_states);
        let v = self.to_v.forward(encoder_hidden_states);
        if let Some(n) = &self.norm_q {
            q = n.forward(&q);
        }
        if let Some(n) = &self.norm_k {
            k = n.forward(&k);
        }
        (q, k, v)
    }

    /// Self-attention (`encoder_hidden_states = None`) or cross-attention.
    /// `attention_bias`: additive `[B, 1, L]` bias over key tokens (cross-attention only).
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
        attention_bias: Option<&Tensor>,
    ) -> Tensor {
        match self.processor {
            Processor::SanaLinear => self.linear_attention(hidden_states, encoder_hidden_states),
            Processor::Sana => self.sdpa_attention(
                hidden_states,
                encoder_hidden_states.unwrap_or(hidden_states),
                attention_bias,
            ),
        }
    }

    /// `SanaLinearAttnProcessor2_0`: ReLU kernels, computed in fp32, with the
    /// normaliser carried as an extra row of ones appended to V.
    fn linear_attention(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
    ) -> Tensor {
        let original_kind = hidden_states.kind();
        let (q, k, v) = self.qkv(
            hidden_states,
            encoder_hidden_states.unwrap_or(hidden_states),
        );
        let q = q.transpose(1, 2).unflatten(1, [self.heads, -1]); // [B, h, d, N]
        let k = k
            .transpose(1, 2)
            .unflatten(1, [self.heads, -1])
            .transpose(2, 3); // [B, h, N, d]
        let v = v.transpose(1, 2).unflatten(1, [self.heads, -1]); // [B, h, d, N]
        let q = q.relu().to_kind(Kind::Float);
        let k = k.relu().to_kind(Kind::Float);
        let v = v.to_kind(Kind::Float).pad([0, 0, 0, 1], "constant", 1.0);
        let scores = v.matmul(&k); // [B, h, d+1, d]
        let hs = scores.matmul(&q); // [B, h, d+1, N]
        let d = hs.size()[2] - 1;
        let hs = hs.narrow(2, 0, d) / (hs.narrow(2, d, 1) + 1e-15);
        let hs = hs.flatten(1, 2).transpose(1, 2).to_kind(original_kind);
        let hs = self.to_out.forward(&hs);
        if original_kind == Kind::Half {
            hs.clamp(-65504.0, 65504.0)
        } else {
            hs
        }
    }

    /// `SanaLinearAttnProcessor3_0` (SANA-Video): ReLU kernels, then RoPE
    /// (`cos`/`sin`: `[1, N, 1, d]`, interleaved pairs) on q and k for the
    /// numerator only, in fp32; the normaliser uses the un-rotated q and k in
    /// the model dtype, as diffusers computes it.
    pub fn linear_attention_rope(
        &self,
        hidden_states: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Tensor {
        let dt = hidden_states.kind();
        let (q, k, v) = self.qkv(hidden_states, hidden_states);
        let heads = |t: &Tensor| t.unflatten(2, [self.heads, -1]); // [B, N, h, d]
        let (q, k, v) = (heads(&q).relu(), heads(&k).relu(), heads(&v));
        let rope = |x: &Tensor| {
            let (x1, x2) = (x.slice(-1, 0, None, 2), x.slice(-1, 1, None, 2));
            let (c, s) = (cos.slice(-1, 0, None, 2), sin.slice(-1, 1, None, 2));
            let even = &x1 * &c - &x2 * &s;
            let odd = &x1 * &s + &x2 * &c;
            Tensor::stack(&[even, odd], -1).flatten(-2, -1).to_kind(dt)
        };
        let (q_rot, k_rot) = (rope(&q), rope(&k));
        let to_hdn = |t: &Tensor| t.permute([0, 2, 3, 1]); // [B, h, d, N]
        let (q, k) = (to_hdn(&q), to_hdn(&k));
        let q_rot = to_hdn(&q_rot).to_kind(Kind::Float);
        let k_rot = to_hdn(&k_rot).to_kind(Kind::Float);
        let v = to_hdn(&v).to_kind(Kind::Float);
        let z = (k
            .sum_dim_intlist([-1i64].as_slice(), true, None)
            .transpose(-2, -1)
            .matmul(&q)
            + 1e-15)
            .reciprocal();
        let scores = v.matmul(&k_rot.transpose(-2, -1)); // [B, h, d, d]
        let hs = scores.matmul(&q_rot) * z; // [B, h, d, N]
        let hs = hs.flatten(1, 2).transpose(1, 2).to_kind(dt);
        self.to_out.forward(&hs)
    }

    /// `SanaAttnProcessor2_0`: scaled dot-product attention with an additive mask.
    fn sdpa_attention(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        attention_bias: Option<&Tensor>,
    ) -> Tensor {
        let b = encoder_hidden_states.size()[0];
        let (q, k, v) = self.qkv(hidden_states, encoder_hidden_states);
        let head_dim = k.size()[2] / self.heads;
        let split = |t: &Tensor| t.view([b, -1, self.heads, head_dim]).transpose(1, 2);
        let (q, k, v) = (split(&q), split(&k), split(&v));
        // diffusers repeats the [B, 1, L] bias per head: [B, h, 1, L].
        let mask = attention_bias.map(|m| {
            let l = m.size()[2];
            m.unsqueeze(1).expand([b, self.heads, 1, l], false)
        });
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, None, false);
        let out = out
            .transpose(1, 2)
            .reshape([b, -1, self.heads * head_dim])
            .to_kind(q.kind());
        self.to_out.forward(&out)
    }
}

/// diffusers' conversion of a `[B, L]` keep(1)/discard(0) mask into an additive
/// `[B, 1, L]` bias of 0 / -10000 in `kind`.
pub fn mask_to_bias(mask: &Tensor, kind: Kind) -> Result<Tensor> {
    if mask.dim() != 2 {
        return Err(SanaError::input(
            "encoder_attention_mask",
            format!("expected [B, L], got {:?}", mask.size()),
        ));
    }
    Ok(((mask.to_kind(kind) * -1.0 + 1.0) * -10000.0).unsqueeze(1))
}
