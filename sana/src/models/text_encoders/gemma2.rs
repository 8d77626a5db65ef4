//! `transformers/models/gemma2/modeling_gemma2.py`: `Gemma2Model`, the decoder-only
//! LM whose last hidden state SANA conditions on (`text_encoder/` of every SANA
//! diffusers checkpoint; Gemma-2-2B-IT there).
//!
//! Numerics follow transformers' eager attention path (the one Gemma-2 uses:
//! transformers does not allow SDPA with soft-capping), op for op.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::models::layers::Linear;
use crate::models::modeling_utils::{self, ModelConfig, TRANSFORMERS_WEIGHTS};
use crate::{Result, SanaError};

/// The `rope_parameters` of a transformers-5 config (`rope_theta` at the top level in 4.x).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RopeParameters {
    pub rope_type: String,
    pub rope_theta: Option<f64>,
}

impl Default for RopeParameters {
    fn default() -> Self {
        Self {
            rope_type: "default".into(),
            rope_theta: None,
        }
    }
}

/// `config.json` of a Gemma-2 text encoder, with transformers' `Gemma2Config` defaults.
/// Reads both the transformers-4.x spelling of the published SANA checkpoints
/// (top-level `rope_theta`, no `layer_types`) and the 5.x one (`rope_parameters`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gemma2Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    /// `null` falls back to `hidden_size / num_attention_heads`.
    pub head_dim: Option<i64>,
    pub hidden_activation: String,
    pub max_position_embeddings: i64,
    pub initializer_range: f64,
    pub rms_norm_eps: f64,
    pub pad_token_id: Option<i64>,
    pub bos_token_id: Option<i64>,
    /// An id or a list of ids; unused by the base model.
    pub eos_token_id: Option<serde_json::Value>,
    pub tie_word_embeddings: bool,
    pub rope_parameters: Option<RopeParameters>,
    /// transformers 4.x: the RoPE base at the top level.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    pub attention_bias: bool,
    pub attention_dropout: f64,
    pub query_pre_attn_scalar: f64,
    pub sliding_window: Option<i64>,
    /// `"sliding_attention"` / `"full_attention"` per layer; absent: sliding on even layers.
    pub layer_types: Option<Vec<String>>,
    /// Only `Gemma2ForCausalLM` applies it; kept so configs round-trip.
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub use_bidirectional_attention: Option<bool>,
    pub architectures: Option<Vec<String>>,
    pub model_type: Option<String>,
}

impl Default for Gemma2Config {
    fn default() -> Self {
        Self {
            vocab_size: 256000,
            hidden_size: 2304,
            intermediate_size: 9216,
            num_hidden_layers: 26,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            head_dim: Some(256),
            hidden_activation: "gelu_pytorch_tanh".into(),
            max_position_embeddings: 8192,
            initializer_range: 0.02,
            rms_norm_eps: 1e-6,
            pad_token_id: Some(0),
            bos_token_id: Some(2),
            eos_token_id: Some(1.into()),
            tie_word_embeddings: true,
            rope_parameters: None,
            rope_theta: None,
            attention_bias: false,
            attention_dropout: 0.0,
            query_pre_attn_scalar: 256.0,
            sliding_window: Some(4096),
            layer_types: None,
            final_logit_softcapping: Some(30.0),
            attn_logit_softcapping: Some(50.0),
            use_bidirectional_attention: None,
            architectures: None,
            model_type: None,
        }
    }
}

/// The checkpoint classes whose weights hold a `Gemma2Model` (bare, or under `model.`).
const ARCHITECTURES: &[&str] = &["Gemma2Model", "Gemma2ForCausalLM"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    Sliding,
    Full,
}

impl ModelConfig for Gemma2Config {
    const CLASS_NAME: &'static str = "Gemma2Model";
    const KNOWN_KEYS: &'static [&'static str] = &[
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_activation",
        "max_position_embeddings",
        "initializer_range",
        "rms_norm_eps",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "rope_parameters",
        "rope_theta",
        "attention_bias",
        "attention_dropout",
        "query_pre_attn_scalar",
        "sliding_window",
        "layer_types",
        "final_logit_softcapping",
        "attn_logit_softcapping",
        "use_bidirectional_attention",
        "architectures",
        "model_type",
        // Bookkeeping that transformers writes and the forward pass does not read.
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "cache_implementation",
        "hidden_act",
    ];

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        if let Some(t) = &self.model_type {
            if t != "gemma2" {
                return Err((
                    "model_type".into(),
                    format!("is {t:?}, expected \"gemma2\" (SANA's text encoder is Gemma-2)"),
                ));
            }
        }
        if let Some(archs) = &self.architectures {
            if !archs.iter().any(|a| ARCHITECTURES.contains(&a.as_str())) {
                return Err((
                    "architectures".into(),
                    format!("is {archs:?}, expected one of {ARCHITECTURES:?}"),
                ));
            }
        }
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
        ] {
            if v <= 0 {
                return Err((key.into(), format!("must be positive, got {v}")));
            }
        }
        if self.num_hidden_layers < 0 {
            return Err(("num_hidden_layers".into(), "must not be negative".into()));
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err((
                "hidden_size".into(),
                format!(
                    "{} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err((
                "num_key_value_heads".into(),
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if self.head_dim() <= 0 || self.head_dim() % 2 != 0 {
            return Err((
                "head_dim".into(),
                format!("must be positive and even (RoPE), got {}", self.head_dim()),
            ));
        }
        if self.query_pre_attn_scalar <= 0.0 {
            return Err(("query_pre_attn_scalar".into(), "must be positive".into()));
        }
        if let Some(cap) = self.attn_logit_softcapping {
            if cap <= 0.0 {
                return Err((
                    "attn_logit_softcapping".into(),
                    "must be positive or null".into(),
                ));
            }
        }
        Activation::parse(&self.hidden_activation)
            .map_err(|m| ("hidden_activation".to_string(), m))?;
        if let Some(rope) = &self.rope_parameters {
            if rope.rope_type != "default" {
                return Err((
                    "rope_parameters.rope_type".into(),
                    format!(
                        "{:?} is not supported (Gemma-2 uses \"default\")",
                        rope.rope_type
                    ),
                ));
            }
        }
        if self.use_bidirectional_attention == Some(true) {
            return Err((
                "use_bidirectional_attention".into(),
                "bidirectional Gemma-2 is not supported (SANA's text encoder is causal)".into(),
            ));
        }
        let types = self.layer_types()?;
        if types.contains(&LayerType::Sliding) && self.sliding_window.is_none_or(|w| w <= 0) {
            return Err((
                "sliding_window".into(),
                "must be a positive number: layer_types has sliding_attention layers".into(),
            ));
        }
        Ok(())
    }
}

impl Gemma2Config {
    pub fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// transformers 5 reads `rope_parameters.rope_theta`, then a 4.x top-level `rope_theta`,
    /// then its default 10000.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }

    /// Each layer's attention kind: `layer_types`, or Gemma-2's default (sliding on even layers).
    pub fn layer_types(&self) -> std::result::Result<Vec<LayerType>, (String, String)> {
        let Some(types) = &self.layer_types else {
            return Ok((0..self.num_hidden_layers)
                .map(|i| {
                    if i % 2 == 0 {
                        LayerType::Sliding
                    } else {
                        LayerType::Full
                    }
                })
                .collect());
        };
        if types.len() as i64 != self.num_hidden_layers {
            return Err((
                "layer_types".into(),
                format!(
                    "has {} entries, num_hidden_layers is {}",
                    types.len(),
                    self.num_hidden_layers
                ),
            ));
        }
        types
            .iter()
            .map(|t| match t.as_str() {
                "sliding_attention" => Ok(LayerType::Sliding),
                "full_attention" => Ok(LayerType::Full),
                other => Err((
                    "layer_types".into(),
                    format!("unknown layer type {other:?} (expected sliding_attention or full_attention)"),
                )),
            })
            .collect()
    }
}

/// `ACT2FN[hidden_activation]` for the activations Gemma checkpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    /// `gelu_pytorch_tanh`: `F.gelu(x, approximate="tanh")`.
    GeluTanh,
    /// `gelu`: exact erf GELU.
    Gelu,
}

impl Activation {
    fn parse(name: &str) -> std::result::Result<Self, String> {
        match name {
            "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            "gelu" => Ok(Self::Gelu),
            other => Err(format!(
                "unsupported activation {other:?} (expected \"gelu_pytorch_tanh\" or \"gelu\")"
            )),
        }
    }

    fn forward(self, xs: &Tensor) -> Tensor {
        match self {
            Self::GeluTanh => xs.gelu("tanh"),
            Self::Gelu => xs.gelu("none"),
        }
    }
}

/// `Gemma2RMSNorm`: statistics and the `(1 + weight)` scale in fp32, cast back to the
/// input dtype at the end (unlike Llama, which casts before scaling).
#[derive(Debug)]
struct Gemma2RMSNorm {
    weight: Tensor,
    eps: f64,
}

impl Gemma2RMSNorm {
    fn new(vs: nn::Path, dim: i64, eps: f64) -> Self {
        // transformers initialises to zeros: (1 + w) starts at identity.
        Self {
            weight: vs.var("weight", &[dim], nn::Init::Const(0.0)),
            eps,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let x = xs.to_kind(Kind::Float);
        let normed = &x * (x.pow_tensor_scalar(2).mean_dim(-1, true, None) + self.eps).rsqrt();
        let out = normed * (self.weight.to_kind(Kind::Float) + 1.0);
        out.to_kind(xs.kind())
    }
}

#[derive(Debug)]
struct Gemma2MLP {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl Gemma2MLP {
    fn new(vs: nn::Path, cfg: &Gemma2Config) -> Self {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Self {
            gate_proj: Linear::new(&vs / "gate_proj", h, i, false),
            up_proj: Linear::new(&vs / "up_proj", h, i, false),
            down_proj: Linear::new(&vs / "down_proj", i, h, false),
            act: Activation::parse(&cfg.hidden_activation).expect("validated config"),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let gated = self.act.forward(&self.gate_proj.forward(xs)) * self.up_proj.forward(xs);
        self.down_proj.forward(&gated)
    }
}

fn rotate_half(xs: &Tensor) -> Tensor {
    let half = xs.size().last().copied().unwrap_or(0) / 2;
    let x1 = xs.narrow(-1, 0, half);
    let x2 = xs.narrow(-1, half, half);
    Tensor::cat(&[-x2, x1], -1)
}

/// `repeat_kv`: [B, kv_heads, L, D] → [B, kv_heads·n_rep, L, D], each kv head repeated
/// for its group of query heads.
fn repeat_kv(xs: &Tensor, n_rep: i64) -> Tensor {
    if n_rep == 1 {
        return xs.shallow_clone();
    }
    let (b, kv, l, d) = xs.size4().expect("4-D key/value states");
    xs.unsqueeze(2)
        .expand([b, kv, n_rep, l, d], false)
        .reshape([b, kv * n_rep, l, d])
}

#[derive(Debug)]
struct Gemma2Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    head_dim: i64,
    n_rep: i64,
    scaling: f64,
    softcap: Option<f64>,
}

impl Gemma2Attention {
    fn new(vs: nn::Path, cfg: &Gemma2Config) -> Self {
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.attention_bias;
        Self {
            q_proj: Linear::new(&vs / "q_proj", h, heads * d, bias),
            k_proj: Linear::new(&vs / "k_proj", h, kv * d, bias),
            v_proj: Linear::new(&vs / "v_proj", h, kv * d, bias),
            o_proj: Linear::new(&vs / "o_proj", heads * d, h, bias),
            head_dim: d,
            n_rep: heads / kv,
            // Gemma-2 scales by query_pre_attn_scalar, not head_dim.
            scaling: cfg.query_pre_attn_scalar.powf(-0.5),
            softcap: cfg.attn_logit_softcapping,
        }
    }

    /// `eager_attention_forward` with `bias` the additive mask `[B, 1, L, L]`.
    fn forward(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor, bias: &Tensor) -> Tensor {
        let (b, l, _) = xs.size3().expect("[B, L, D] hidden states");
        let shape = [b, l, -1, self.head_dim];
        let q = self.q_proj.forward(xs).view(shape).transpose(1, 2);
        let k = self.k_proj.forward(xs).view(shape).transpose(1, 2);
        let v = self.v_proj.forward(xs).view(shape).transpose(1, 2);
        let q = &q * cos + rotate_half(&q) * sin;
        let k = &k * cos + rotate_half(&k) * sin;
        let k = repeat_kv(&k, self.n_rep);
        let v = repeat_kv(&v, self.n_rep);

        let mut w = q.matmul(&k.transpose(2, 3)) * self.scaling;
        if let Some(cap) = self.softcap {
            w = (w / cap).tanh() * cap;
        }
        let w = (w + bias).softmax(-1, Kind::Float).to_kind(q.kind());
        let out = w
            .matmul(&v)
            .transpose(1, 2)
            .contiguous()
            .reshape([b, l, -1]);
        self.o_proj.forward(&out)
    }
}

#[derive(Debug)]
struct Gemma2DecoderLayer {
    self_attn: Gemma2Attention,
    mlp: Gemma2MLP,
    input_layernorm: Gemma2RMSNorm,
    post_attention_layernorm: Gemma2RMSNorm,
    pre_feedforward_layernorm: Gemma2RMSNorm,
    post_feedforward_layernorm: Gemma2RMSNorm,
    layer_type: LayerType,
}

impl Gemma2DecoderLayer {
    fn new(vs: nn::Path, cfg: &Gemma2Config, layer_type: LayerType) -> Self {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Self {
            self_attn: Gemma2Attention::new(&vs / "self_attn", cfg),
            mlp: Gemma2MLP::new(&vs / "mlp", cfg),
            input_layernorm: Gemma2RMSNorm::new(&vs / "input_layernorm", h, eps),
            post_attention_layernorm: Gemma2RMSNorm::new(&vs / "post_attention_layernorm", h, eps),
            pre_feedforward_layernorm: Gemma2RMSNorm::new(
                &vs / "pre_feedforward_layernorm",
                h,
                eps,
            ),
            post_feedforward_layernorm: Gemma2RMSNorm::new(
                &vs / "post_feedforward_layernorm",
                h,
                eps,
            ),
            layer_type,
        }
    }

    fn forward(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor, bias: &Tensor) -> Tensor {
        let attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(xs), cos, sin, bias);
        let xs = xs + self.post_attention_layernorm.forward(&attn);
        let ff = self
            .mlp
            .forward(&self.pre_feedforward_layernorm.forward(&xs));
        &xs + self.post_feedforward_layernorm.forward(&ff)
    }
}

/// `torch.finfo(kind).min`: transformers' eager masks use it, not -inf, so a query row
/// with every key masked (a padding position outside the sliding window of every real
/// token) softmaxes to a uniform average instead of NaN. We must do the same.
fn finfo_min(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 => -3.389_531_389_251_535_5e38,
        Kind::Half => -65504.0,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// transformers' `Gemma2Model`: token embeddings → decoder layers → final RMSNorm.
/// Parameters live in `vs` under transformers' names (`layers.0.self_attn.q_proj.weight`).
pub struct Gemma2Model {
    pub config: Gemma2Config,
    pub vs: nn::VarStore,
    embed_tokens: Tensor,
    layers: Vec<Gemma2DecoderLayer>,
    norm: Gemma2RMSNorm,
    /// RoPE inverse frequencies, fp32 whatever the model dtype (a non-persistent buffer
    /// in transformers, which `from_pretrained(dtype=...)` leaves in fp32).
    inv_freq: Tensor,
}

impl std::fmt::Debug for Gemma2Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gemma2Model")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Gemma2Model {
    /// A randomly initialised fp32 model on `device`. Validates the config first.
    pub fn new(config: Gemma2Config, device: Device) -> Result<Self> {
        modeling_utils::check_config(&config)?;
        let types = config.layer_types().expect("validated config");
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let embed_tokens = (&root / "embed_tokens").var(
            "weight",
            &[config.vocab_size, config.hidden_size],
            nn::Init::Randn {
                mean: 0.0,
                stdev: config.initializer_range,
            },
        );
        let layers_path = &root / "layers";
        let layers = types
            .iter()
            .enumerate()
            .map(|(i, &t)| Gemma2DecoderLayer::new(&layers_path / i, &config, t))
            .collect();
        let norm = Gemma2RMSNorm::new(&root / "norm", config.hidden_size, config.rms_norm_eps);
        // inv_freq = 1 / theta^(arange(0, dim, 2) / dim), in fp32 as transformers computes it.
        let dim = config.head_dim();
        let exponents =
            Tensor::arange_start_step(0, dim, 2, (Kind::Float, Device::Cpu)) / dim as f64;
        let inv_freq = Tensor::pow_scalar(config.rope_theta(), &exponents)
            .reciprocal()
            .to_device(device);
        Ok(Self {
            config,
            vs,
            embed_tokens,
            layers,
            norm,
            inv_freq,
        })
    }

    /// Loads a transformers directory (`config.json` + `model.safetensors` or a sharded
    /// index) saved from `Gemma2Model` or `Gemma2ForCausalLM` (its `model.` prefix is
    /// stripped and `lm_head` skipped), then casts to `kind`.
    pub fn from_pretrained(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config: Gemma2Config = modeling_utils::read_config(dir)?;
        let mut model = Self::new(config, device)?;
        modeling_utils::load_weights_renamed(&mut model.vs, dir, TRANSFORMERS_WEIGHTS, |key| {
            if key == "lm_head.weight" {
                return None;
            }
            Some(key.strip_prefix("model.").unwrap_or(key).to_string())
        })?;
        model.set_kind(kind);
        Ok(model)
    }

    /// Writes `config.json` and `model.safetensors` as transformers' `save_pretrained`
    /// does for a `Gemma2Model` (single file, tensors in their own dtype).
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| SanaError::io(dir, e))?;
        let mut config = self.config.clone();
        config.architectures = Some(vec!["Gemma2Model".into()]);
        config.model_type = Some("gemma2".into());
        let path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&config).expect("config serialises");
        std::fs::write(&path, text + "\n").map_err(|e| SanaError::io(&path, e))?;
        let mut named: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.contiguous()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let path = dir.join(TRANSFORMERS_WEIGHTS.single);
        Tensor::write_safetensors(&named, &path).map_err(|e| SanaError::Weights {
            path: path.clone(),
            msg: format!("cannot write safetensors: {e}"),
        })
    }

    /// Casts all parameters (fp32 / bf16 / fp16); RoPE frequencies stay fp32.
    pub fn set_kind(&mut self, kind: Kind) {
        self.vs.set_kind(kind);
    }

    pub fn kind(&self) -> Kind {
        self.embed_tokens.kind()
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The additive attention masks `(full, sliding)`, `[B, 1, L, L]` in the model dtype:
    /// causal, keys restricted to `attention_mask` (padding queries are not masked, as in
    /// transformers), and for sliding layers to the last `sliding_window` positions.
    fn attention_biases(&self, attention_mask: &Tensor, l: i64) -> (Tensor, Tensor) {
        let dev = self.device();
        let pos = Tensor::arange(l, (Kind::Int64, dev));
        let q = pos.view([l, 1]);
        let kv = pos.view([1, l]);
        let keys = attention_mask.ne(0).unsqueeze(1).unsqueeze(1);
        let full = kv
            .le_tensor(&q)
            .unsqueeze(0)
            .unsqueeze(0)
            .logical_and(&keys);
        let window = self.config.sliding_window.unwrap_or(l.max(1));
        let sliding = full.logical_and(&kv.gt_tensor(&(&q - window)));
        let kind = self.kind();
        let min = finfo_min(kind);
        let to_bias = |allowed: &Tensor| {
            Tensor::zeros(allowed.size(), (kind, dev)).masked_fill(&allowed.logical_not(), min)
        };
        (to_bias(&full), to_bias(&sliding))
    }

    fn check_inputs(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<()> {
        let size = input_ids.size();
        if size.len() != 2 || size[1] == 0 {
            return Err(SanaError::input(
                "input_ids",
                format!("expected [B, L] with L > 0, got {size:?}"),
            ));
        }
        if !matches!(input_ids.kind(), Kind::Int64 | Kind::Int) {
            return Err(SanaError::input(
                "input_ids",
                format!("expected integer token ids, got {:?}", input_ids.kind()),
            ));
        }
        if input_ids.numel() > 0 {
            let (lo, hi) = (
                input_ids.min().int64_value(&[]),
                input_ids.max().int64_value(&[]),
            );
            if lo < 0 || hi >= self.config.vocab_size {
                return Err(SanaError::input(
                    "input_ids",
                    format!(
                        "token ids span [{lo}, {hi}], outside the vocabulary [0, {})",
                        self.config.vocab_size
                    ),
                ));
            }
        }
        if let Some(m) = attention_mask {
            if m.size() != size {
                return Err(SanaError::input(
                    "attention_mask",
                    format!("expected {size:?} like input_ids, got {:?}", m.size()),
                ));
            }
        }
        Ok(())
    }

    /// `last_hidden_state` `[B, L, hidden_size]` in the model dtype. `attention_mask`
    /// `[B, L]`: 1 real token, 0 padding (any integer or bool kind); `None` attends to all.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.check_inputs(input_ids, attention_mask)?;
        let dev = self.device();
        let kind = self.kind();
        let ids = input_ids.to_device(dev).to_kind(Kind::Int64);
        let (_, l) = ids.size2()?;
        let mask = match attention_mask {
            Some(m) => m.to_device(dev),
            None => Tensor::ones_like(&ids),
        };

        let padding_idx = self.config.pad_token_id.unwrap_or(-1);
        let embeds = Tensor::embedding(&self.embed_tokens, &ids, padding_idx, false, false);
        // transformers keeps sqrt(hidden) in an fp32 buffer and casts it to the weight
        // dtype before multiplying (so bf16 uses the bf16-rounded scale).
        let scale = Tensor::from((self.config.hidden_size as f64).sqrt() as f32)
            .to_kind(kind)
            .to_device(dev);
        let mut hs = embeds * scale;

        // RoPE tables: fp32 products, cos/sin cast to the hidden dtype.
        let positions = Tensor::arange(l, (Kind::Float, dev));
        let freqs = positions.unsqueeze(-1) * self.inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let cos = emb.cos().to_kind(kind).unsqueeze(0).unsqueeze(0);
        let sin = emb.sin().to_kind(kind).unsqueeze(0).unsqueeze(0);

        let (full, sliding) = self.attention_biases(&mask, l);
        for layer in &self.layers {
            let bias = match layer.layer_type {
                LayerType::Full => &full,
                LayerType::Sliding => &sliding,
            };
            hs = layer.forward(&hs, &cos, &sin, bias);
        }
        Ok(self.norm.forward(&hs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{load_named, max_abs_diff, parity_case};

    /// `last_hidden_state` of every encoder call the reference recorded, against ours.
    fn check(case: &str, kind: Kind, tol: f64) {
        let dir = parity_case(&format!("text_encoder_{case}"));
        let model =
            Gemma2Model::from_pretrained(&dir.join("text_encoder"), Device::Cpu, kind).unwrap();
        let mut worst = 0.0f64;
        for name in encode_names(&dir) {
            let t = load_named(&dir.join(format!("encode_{name}.safetensors")));
            let expected = &t["prompt_last_hidden_state"];
            let got = tch::no_grad(|| {
                model.forward(&t["prompt_input_ids"], Some(&t["prompt_tokenizer_mask"]))
            })
            .unwrap();
            assert_eq!(got.kind(), expected.kind());
            let err = max_abs_diff(&got, expected);
            let scale = expected.abs().max().double_value(&[]);
            eprintln!("gemma2 {case}/{name}: max abs err {err:.3e} (output max {scale:.3})");
            assert!(err <= tol, "{case}/{name}: max abs error {err:e} > {tol:e}");
            worst = worst.max(err);
        }
        eprintln!("gemma2 {case}: worst {worst:.3e}");
    }

    fn encode_names(dir: &Path) -> Vec<String> {
        let case: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        case["encode"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn parity_gemma2_fp32() {
        check("fp32", Kind::Float, 1e-4);
    }

    #[test]
    fn parity_gemma2_bf16() {
        // Same op sequence as transformers in bf16; a few bf16 ulps of the output scale.
        check("bf16", Kind::BFloat16, 3e-2);
    }

    #[test]
    fn parity_gemma2_causal_lm_checkpoint_legacy_config() {
        check("causal_lm", Kind::Float, 1e-4);
    }

    /// The parity check must notice a single wrong weight, and a wrong sliding window.
    #[test]
    fn parity_fails_when_a_weight_or_the_window_is_perturbed() {
        let dir = parity_case("text_encoder_fp32");
        let t = load_named(&dir.join("encode_chi_default.safetensors"));
        let expected = &t["prompt_last_hidden_state"];
        let run = |model: &Gemma2Model| {
            let got = tch::no_grad(|| {
                model.forward(&t["prompt_input_ids"], Some(&t["prompt_tokenizer_mask"]))
            })
            .unwrap();
            max_abs_diff(&got, expected)
        };
        let model =
            Gemma2Model::from_pretrained(&dir.join("text_encoder"), Device::Cpu, Kind::Float)
                .unwrap();
        assert!(run(&model) <= 1e-4);
        let w = &model.vs.variables()["layers.2.self_attn.k_proj.weight"];
        tch::no_grad(|| {
            let _ = w.get(0).get(0).g_add_scalar_(1e-2);
        });
        let err = run(&model);
        eprintln!("perturbed weight: max abs err {err:.3e}");
        assert!(
            err > 1e-4,
            "perturbing a weight went unnoticed (err {err:e})"
        );

        let mut model =
            Gemma2Model::from_pretrained(&dir.join("text_encoder"), Device::Cpu, Kind::Float)
                .unwrap();
        model.config.sliding_window = model.config.sliding_window.map(|w| w + 1);
        let err = run(&model);
        eprintln!("sliding window + 1: max abs err {err:.3e}");
        assert!(
            err > 1e-4,
            "changing the sliding window went unnoticed (err {err:e})"
        );
    }

    fn tiny_config() -> Gemma2Config {
        Gemma2Config {
            vocab_size: 50,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: Some(8),
            query_pre_attn_scalar: 8.0,
            sliding_window: Some(3),
            ..Default::default()
        }
    }

    fn saved_tiny() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        Gemma2Model::new(tiny_config(), Device::Cpu)
            .unwrap()
            .save_pretrained(dir.path())
            .unwrap();
        dir
    }

    fn load_err(dir: &Path) -> String {
        let msg = Gemma2Model::from_pretrained(dir, Device::Cpu, Kind::Float)
            .unwrap_err()
            .to_string();
        assert!(!msg.contains('\n'), "error is one line: {msg}");
        msg
    }

    fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
        let path = dir.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(v.as_object_mut().unwrap());
        std::fs::write(&path, v.to_string()).unwrap();
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = saved_tiny();
        let a = Gemma2Model::from_pretrained(dir.path(), Device::Cpu, Kind::Float).unwrap();
        let b = Gemma2Model::from_pretrained(dir.path(), Device::Cpu, Kind::Float).unwrap();
        let ids = Tensor::from_slice(&[2i64, 5, 7, 0, 0, 2, 9, 9, 9, 9]).view([2, 5]);
        let mask = ids.ne(0).to_kind(Kind::Int64);
        let ya = a.forward(&ids, Some(&mask)).unwrap();
        let yb = b.forward(&ids, Some(&mask)).unwrap();
        assert_eq!(ya.size(), [2, 5, 16]);
        assert_eq!(max_abs_diff(&ya, &yb), 0.0);
        assert_eq!(ya.isfinite().all().int64_value(&[]), 1);
    }

    #[test]
    fn causal_lm_prefix_is_stripped_and_lm_head_skipped() {
        let dir = saved_tiny();
        let path = dir.path().join("model.safetensors");
        let mut named: Vec<(String, Tensor)> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (format!("model.{k}"), t))
            .collect();
        named.push((
            "lm_head.weight".into(),
            Tensor::zeros([50, 16], (Kind::Float, Device::Cpu)),
        ));
        Tensor::write_safetensors(&named, &path).unwrap();
        Gemma2Model::from_pretrained(dir.path(), Device::Cpu, Kind::Float).unwrap();
    }

    #[test]
    fn missing_and_unexpected_keys_are_named() {
        let dir = saved_tiny();
        let path = dir.path().join("model.safetensors");
        let mut named = Tensor::read_safetensors(&path).unwrap();
        named.retain(|(k, _)| k != "layers.1.pre_feedforward_layernorm.weight");
        Tensor::write_safetensors(&named, &path).unwrap();
        let msg = load_err(dir.path());
        assert!(
            msg.contains("missing key `layers.1.pre_feedforward_layernorm.weight`"),
            "{msg}"
        );

        named.push((
            "layers.1.pre_feedforward_layernorm.weight".into(),
            Tensor::zeros([16], (Kind::Float, Device::Cpu)),
        ));
        named.push((
            "score.weight".into(),
            Tensor::zeros([2, 16], (Kind::Float, Device::Cpu)),
        ));
        Tensor::write_safetensors(&named, &path).unwrap();
        let msg = load_err(dir.path());
        assert!(
            msg.contains("unexpected key `score.weight`") && msg.contains("model.safetensors"),
            "{msg}"
        );
    }

    #[test]
    fn config_of_another_model_is_rejected_naming_the_key() {
        let dir = saved_tiny();
        edit_config(dir.path(), |c| {
            c.insert("model_type".into(), "t5".into());
        });
        let msg = load_err(dir.path());
        assert!(
            msg.contains("config.json") && msg.contains("model_type") && msg.contains("gemma2"),
            "{msg}"
        );

        let dir = saved_tiny();
        edit_config(dir.path(), |c| {
            c.insert(
                "architectures".into(),
                serde_json::json!(["LlamaForCausalLM"]),
            );
        });
        assert!(load_err(dir.path()).contains("architectures"));

        let dir = saved_tiny();
        edit_config(dir.path(), |c| {
            c.insert("layer_types".into(), serde_json::json!(["full_attention"]));
        });
        assert!(load_err(dir.path()).contains("layer_types"));

        let dir = saved_tiny();
        edit_config(dir.path(), |c| {
            c.insert("num_key_value_heads".into(), "one".into());
        });
        assert!(load_err(dir.path()).contains("num_key_value_heads"));

        let dir = saved_tiny();
        edit_config(dir.path(), |c| {
            c.insert(
                "rope_parameters".into(),
                serde_json::json!({"rope_type": "yarn", "factor": 2.0}),
            );
        });
        assert!(load_err(dir.path()).contains("rope_type"));
    }

    #[test]
    fn legacy_rope_theta_is_read() {
        let cfg: Gemma2Config = serde_json::from_str(r#"{"rope_theta": 123.0}"#).unwrap();
        assert_eq!(cfg.rope_theta(), 123.0);
        let cfg: Gemma2Config =
            serde_json::from_str(r#"{"rope_theta": 123.0, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}"#)
                .unwrap();
        assert_eq!(cfg.rope_theta(), 7.0);
        assert_eq!(Gemma2Config::default().rope_theta(), 10_000.0);
        let types = Gemma2Config::default().layer_types().unwrap();
        assert_eq!(
            &types[..3],
            &[LayerType::Sliding, LayerType::Full, LayerType::Sliding]
        );
    }

    #[test]
    fn bad_inputs_are_named() {
        let model = Gemma2Model::new(tiny_config(), Device::Cpu).unwrap();
        let ids = Tensor::from_slice(&[2i64, 50]).view([1, 2]);
        let err = model.forward(&ids, None).unwrap_err().to_string();
        assert!(
            err.contains("input_ids") && err.contains("vocabulary"),
            "{err}"
        );
        let ids = Tensor::from_slice(&[2i64, 3]).view([1, 2]);
        let mask = Tensor::ones([1, 3], (Kind::Int64, Device::Cpu));
        let err = model.forward(&ids, Some(&mask)).unwrap_err().to_string();
        assert!(err.contains("attention_mask"), "{err}");
        let err = model
            .forward(&ids.to_kind(Kind::Float), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("input_ids"), "{err}");
    }
}
