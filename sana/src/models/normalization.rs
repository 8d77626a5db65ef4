//! `diffusers/models/normalization.py`: RMSNorm and AdaLayerNormSingle.

use tch::{nn, Kind, Tensor};

use super::embeddings::PixArtAlphaCombinedTimestepSizeEmbeddings;
use super::layers::Linear;

/// diffusers' `RMSNorm`: variance in fp32, the result cast to the weight's dtype
/// when that is half precision (and left in fp32 otherwise), exactly as diffusers does.
#[derive(Debug)]
pub struct RMSNorm {
    eps: f64,
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
}

impl RMSNorm {
    pub fn new(vs: nn::Path, dim: i64, eps: f64, elementwise_affine: bool, bias: bool) -> Self {
        let weight = elementwise_affine.then(|| vs.var("weight", &[dim], nn::Init::Const(1.0)));
        let bias =
            (elementwise_affine && bias).then(|| vs.var("bias", &[dim], nn::Init::Const(0.0)));
        Self { eps, weight, bias }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let input_kind = xs.kind();
        let variance = xs
            .to_kind(Kind::Float)
            .pow_tensor_scalar(2)
            .mean_dim(-1, true, None);
        let hs = xs * (variance + self.eps).rsqrt();
        match &self.weight {
            Some(w) => {
                let hs = if matches!(w.kind(), Kind::Half | Kind::BFloat16) {
                    hs.to_kind(w.kind())
                } else {
                    hs
                };
                let hs = hs * w;
                match &self.bias {
                    Some(b) => hs + b,
                    None => hs,
                }
            }
            None => hs.to_kind(input_kind),
        }
    }
}

/// diffusers' `AdaLayerNormSingle` (PixArt-α): timestep → (6·D modulation, D embedding).
#[derive(Debug)]
pub struct AdaLayerNormSingle {
    emb: PixArtAlphaCombinedTimestepSizeEmbeddings,
    linear: Linear,
}

impl AdaLayerNormSingle {
    pub fn new(vs: nn::Path, embedding_dim: i64) -> Self {
        Self {
            emb: PixArtAlphaCombinedTimestepSizeEmbeddings::new(&vs / "emb", embedding_dim),
            linear: Linear::new(&vs / "linear", embedding_dim, 6 * embedding_dim, true),
        }
    }

    /// Returns `(modulation [B, 6D], embedded_timestep [B, D])`.
    pub fn forward(&self, timestep: &Tensor, hidden_kind: Kind) -> (Tensor, Tensor) {
        let embedded = self.emb.forward(timestep, hidden_kind);
        (self.linear.forward(&embedded.silu()), embedded)
    }

    /// Its Linears in `named_modules()` order.
    pub(crate) fn linears(&self) -> Vec<&Linear> {
        let mut v = self.emb.linears();
        v.push(&self.linear);
        v
    }
}
