//! The `torch.nn` layers the models are built from, parameter names as PyTorch
//! names them (`weight`, `bias`). Our own `Linear` (rather than `tch::nn::Linear`)
//! so that adapters (LoRA, `crate::lora`) hook into every projection in one place.

use std::sync::Arc;

use tch::{nn, Tensor};

use crate::lora::LoraSlot;

/// `torch.nn.Linear`: `y = x W^T + b` through `at::linear`, the same kernel PyTorch uses,
/// plus whatever LoRA adapter is active on it (PEFT's `lora.Linear`).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// This layer's adapters; shared with the model's `LoraAdapters` registry.
    lora: Arc<LoraSlot>,
}

impl Linear {
    pub fn new(vs: nn::Path, in_features: i64, out_features: i64, bias: bool) -> Self {
        // PyTorch's default init (kaiming-uniform with a = sqrt(5)); only matters for
        // randomly initialised models, checkpoints overwrite it.
        let bound = 1.0 / (in_features as f64).sqrt();
        let weight = vs.var(
            "weight",
            &[out_features, in_features],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let bias = bias.then(|| {
            vs.var(
                "bias",
                &[out_features],
                nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )
        });
        // The module's qualified name as PyTorch's `named_modules` gives it
        // (`transformer_blocks.0.attn1.to_q`): what PEFT's target matching sees.
        let name = vs.components().collect::<Vec<_>>().join(".");
        let lora = Arc::new(LoraSlot::new(name, &weight, in_features, out_features));
        Self { weight, bias, lora }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let out = xs.linear(&self.weight, self.bias.as_ref());
        self.lora.apply(xs, out)
    }

    /// The qualified module name (`transformer_blocks.0.attn1.to_q`).
    pub fn name(&self) -> &str {
        self.lora.name()
    }

    pub(crate) fn lora_slot(&self) -> &Arc<LoraSlot> {
        &self.lora
    }
}

/// `torch.nn.Conv2d` with square kernel, stride and padding.
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    stride: i64,
    padding: i64,
    groups: i64,
}

pub struct Conv2dConfig {
    pub stride: i64,
    pub padding: i64,
    pub groups: i64,
    pub bias: bool,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            groups: 1,
            bias: true,
        }
    }
}

impl Conv2d {
    pub fn new(vs: nn::Path, in_ch: i64, out_ch: i64, kernel: i64, cfg: Conv2dConfig) -> Self {
        let fan_in = (in_ch / cfg.groups) * kernel * kernel;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let init = nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vs.var(
            "weight",
            &[out_ch, in_ch / cfg.groups, kernel, kernel],
            init,
        );
        let bias = cfg.bias.then(|| vs.var("bias", &[out_ch], init));
        Self {
            weight,
            bias,
            stride: cfg.stride,
            padding: cfg.padding,
            groups: cfg.groups,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            self.groups,
        )
    }
}

/// `torch.nn.LayerNorm` over the last dimension, optionally with affine parameters.
#[derive(Debug)]
pub struct LayerNorm {
    dim: i64,
    eps: f64,
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
}

impl LayerNorm {
    pub fn new(vs: nn::Path, dim: i64, eps: f64, elementwise_affine: bool) -> Self {
        let (weight, bias) = if elementwise_affine {
            (
                Some(vs.var("weight", &[dim], nn::Init::Const(1.0))),
                Some(vs.var("bias", &[dim], nn::Init::Const(0.0))),
            )
        } else {
            (None, None)
        };
        Self {
            dim,
            eps,
            weight,
            bias,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.layer_norm(
            [self.dim],
            self.weight.as_ref(),
            self.bias.as_ref(),
            self.eps,
            true,
        )
    }
}

/// `torch.nn.BatchNorm2d` in eval mode: normalises with the running statistics,
/// which load and save by PyTorch's buffer names (`running_mean`, `running_var`,
/// `num_batches_tracked`). The buffers are registered as non-trainable variables
/// so that an optimiser over the store's trainable variables never touches them.
#[derive(Debug)]
pub struct BatchNorm2d {
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    /// Unused in eval mode; kept so checkpoints round-trip with PyTorch's keys.
    pub num_batches_tracked: Tensor,
    eps: f64,
}

impl BatchNorm2d {
    pub fn new(vs: nn::Path, num_features: i64, eps: f64, affine: bool) -> Self {
        let (weight, bias) = if affine {
            (
                Some(vs.var("weight", &[num_features], nn::Init::Const(1.0))),
                Some(vs.var("bias", &[num_features], nn::Init::Const(0.0))),
            )
        } else {
            (None, None)
        };
        let running_mean = vs.zeros_no_train("running_mean", &[num_features]);
        let running_var = vs.ones_no_train("running_var", &[num_features]);
        // PyTorch keeps this counter as an int64 scalar.
        let num_batches_tracked = vs.add(
            "num_batches_tracked",
            Tensor::zeros([], (tch::Kind::Int64, vs.device())),
            false,
        );
        Self {
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
            eps,
        }
    }

    /// `[B, C, H, W]` → `[B, C, H, W]` with the running statistics (eval mode).
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        // `cudnn_enabled = true` is what `F.batch_norm` passes by default.
        xs.batch_norm(
            self.weight.as_ref(),
            self.bias.as_ref(),
            Some(&self.running_mean),
            Some(&self.running_var),
            false,
            0.1,
            self.eps,
            true,
        )
    }
}
