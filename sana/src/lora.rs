//! LoRA exactly as PEFT 0.21.2 defines it (`peft/tuners/lora`), on every
//! [`Linear`](crate::models::layers::Linear) of a model:
//! `y = W x + b + scaling · B(A(dropout(x)))`, `scaling = lora_alpha / r`
//! (rsLoRA: `lora_alpha / √r`) times the per-call scale diffusers passes as
//! `attention_kwargs={"scale": s}`.
//!
//! Several named adapters can sit on the same layers (`"default"`, `"old"`); one
//! is active, or none ([`ActiveAdapter::Disabled`], PEFT's `disable_adapter`: the
//! base model). The active adapter, the scale and train/eval mode are atomics
//! shared by all layers of a model, so switching costs nothing and works through
//! `&self`. Adapter tensors are plain leaf tensors, never in the model's
//! `VarStore`, so the base checkpoint's save/load is unchanged; each adapter is
//! trainable or frozen on its own.
//!
//! Files: PEFT's `adapter_config.json` + `adapter_model.safetensors` and diffusers'
//! `pytorch_lora_weights.safetensors` (see [`io`]).

mod config;
pub mod io;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tch::{nn, Device, Kind, Tensor};

pub use config::{
    lora_scaling, InitLoraWeights, LayerIndexes, LoraConfig, PatternMap, StringOrList,
    TargetModules, PEFT_VERSION,
};
use config::{TargetMatch, TargetMatcher};
pub use io::{
    AdapterFormat, DIFFUSERS_LORA_WEIGHTS_NAME, LORA_ADAPTER_METADATA_KEY, PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
};

use crate::{Result, SanaError};

/// "No adapter": the value of the active/merged index when none is.
const NONE: usize = usize::MAX;

/// Which adapter the model's LoRA layers apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActiveAdapter {
    Named(String),
    /// No adapter: the base model (PEFT's `disable_adapter()`, the reference policy).
    Disabled,
}

impl From<&str> for ActiveAdapter {
    fn from(name: &str) -> Self {
        ActiveAdapter::Named(name.to_string())
    }
}

/// State every LoRA layer of one model reads on each forward.
#[derive(Debug)]
struct LoraControl {
    active: AtomicUsize,
    merged: AtomicUsize,
    /// `f64` bits of diffusers' per-call LoRA scale.
    scale: AtomicU64,
    training: AtomicBool,
}

impl LoraControl {
    fn scale(&self) -> f64 {
        f64::from_bits(self.scale.load(Ordering::Acquire))
    }
}

/// One adapter on one layer: PEFT's `lora_A[name]`, `lora_B[name]`, `scaling[name]`.
#[derive(Debug)]
struct LoraWeights {
    /// `[r, in_features]`.
    a: Tensor,
    /// `[out_features, r]`.
    b: Tensor,
    r: i64,
    scaling: f64,
    dropout: f64,
}

#[derive(Debug)]
struct SlotState {
    /// The base layer's weight (same storage as the `VarStore` variable), for merging.
    weight: Tensor,
    /// By adapter id.
    adapters: Vec<Option<LoraWeights>>,
}

/// The adapters of one `Linear` (PEFT's `lora.Linear` minus the base layer).
#[derive(Debug)]
pub struct LoraSlot {
    name: String,
    in_features: i64,
    out_features: i64,
    /// Fast path: false while no adapter sits on this layer.
    any: AtomicBool,
    control: OnceLock<Arc<LoraControl>>,
    state: Mutex<SlotState>,
}

impl LoraSlot {
    pub(crate) fn new(name: String, weight: &Tensor, in_features: i64, out_features: i64) -> Self {
        Self {
            name,
            in_features,
            out_features,
            any: AtomicBool::new(false),
            control: OnceLock::new(),
            state: Mutex::new(SlotState {
                weight: weight.shallow_clone(),
                adapters: Vec::new(),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A panic elsewhere cannot leave the adapter list half-written (every update is
        // one assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// PEFT's `lora.Linear.forward` after the base layer: `out` is `base(x)`.
    pub(crate) fn apply(&self, xs: &Tensor, out: Tensor) -> Tensor {
        if !self.any.load(Ordering::Acquire) {
            return out;
        }
        let Some(ctl) = self.control.get() else {
            return out;
        };
        let active = ctl.active.load(Ordering::Acquire);
        // A merged adapter is already in W.
        if active == NONE || active == ctl.merged.load(Ordering::Acquire) {
            return out;
        }
        let (a, b, scaling, dropout) = {
            let st = self.lock();
            match st.adapters.get(active) {
                Some(Some(w)) => (
                    w.a.shallow_clone(),
                    w.b.shallow_clone(),
                    w.scaling,
                    w.dropout,
                ),
                _ => return out,
            }
        };
        let scaling = scaling * ctl.scale();
        let out_kind = out.kind();
        // PEFT casts x to the adapter dtype, then the sum back to the base output dtype.
        let x = xs.to_kind(a.kind());
        let x = if dropout > 0.0 && ctl.training.load(Ordering::Acquire) {
            x.dropout(dropout, true)
        } else {
            x
        };
        let delta = x.linear(&a, None::<Tensor>).linear(&b, None::<Tensor>);
        let res = out + delta * scaling;
        if res.kind() == out_kind {
            res
        } else {
            res.to_kind(out_kind)
        }
    }
}

/// PEFT's `get_delta_weight`: `(B @ A) · scaling`, in fp32 for half types on the CPU.
fn delta_weight(a: &Tensor, b: &Tensor, scaling: f64) -> Tensor {
    let kind = a.kind();
    let upcast = a.device() == Device::Cpu && matches!(kind, Kind::Half | Kind::BFloat16);
    if upcast {
        (b.to_kind(Kind::Float).matmul(&a.to_kind(Kind::Float)) * scaling).to_kind(kind)
    } else {
        b.matmul(a) * scaling
    }
}

/// `torch.nn.init.kaiming_uniform_(w, a=sqrt(5))` bound, computed as torch does it.
fn kaiming_bound(fan_in: i64) -> f64 {
    let a = 5f64.sqrt();
    let gain = (2.0 / (1.0 + a.powi(2))).sqrt();
    let std = gain / (fan_in as f64).sqrt();
    3f64.sqrt() * std
}

/// One target of an adapter: its layer and PEFT's per-module rank and alpha.
#[derive(Debug, Clone)]
struct Target {
    slot: usize,
    r: i64,
    alpha: f64,
}

#[derive(Debug, Clone)]
struct AdapterInfo {
    name: String,
    config: LoraConfig,
    targets: Vec<Target>,
}

/// One module an adapter sits on, as PEFT sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModuleInfo {
    pub module: String,
    pub r: i64,
    pub lora_alpha: f64,
    /// `lora_alpha / r` (or `/ √r`), before the per-call scale.
    pub scaling: f64,
}

/// The LoRA adapters of one model: PEFT's `LoraModel` bookkeeping (`peft_config`,
/// `set_adapter`, `disable_adapter`, `merge`/`unmerge`) over the model's Linears.
pub struct LoraAdapters {
    control: Arc<LoraControl>,
    /// Every Linear of the model, in `named_modules()` order (PEFT's traversal order,
    /// which fixes the order random inits draw in).
    slots: Vec<Arc<LoraSlot>>,
    /// The model's other module names, for PEFT's error on a target that is not a Linear.
    other_modules: Vec<(String, &'static str)>,
    /// By adapter id; `None` after `delete_adapter`.
    adapters: Vec<Option<AdapterInfo>>,
    kind: Kind,
    device: Device,
}

impl std::fmt::Debug for LoraAdapters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraAdapters")
            .field("adapters", &self.adapter_names())
            .field("active", &self.active())
            .field("scale", &self.scale())
            .finish_non_exhaustive()
    }
}

/// Restores the previously active adapter when dropped (see [`LoraAdapters::with_active`]).
struct ActiveGuard<'a> {
    control: &'a LoraControl,
    previous: usize,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.control.active.store(self.previous, Ordering::Release);
    }
}

fn lora_err(msg: impl Into<String>) -> SanaError {
    SanaError::Lora(msg.into())
}

impl LoraAdapters {
    /// `linears`: every Linear of the model in `named_modules()` order; `vs`: the model's
    /// parameters (their names give the non-Linear modules).
    pub(crate) fn new(linears: Vec<Arc<LoraSlot>>, vs: &nn::VarStore) -> Self {
        let control = Arc::new(LoraControl {
            active: AtomicUsize::new(NONE),
            merged: AtomicUsize::new(NONE),
            scale: AtomicU64::new(1f64.to_bits()),
            training: AtomicBool::new(false),
        });
        for s in &linears {
            s.control
                .set(control.clone())
                .expect("a Linear belongs to one model");
        }
        let vars = vs.variables();
        let linear_names: std::collections::HashSet<&str> =
            linears.iter().map(|s| s.name.as_str()).collect();
        let mut others: BTreeMap<String, &'static str> = BTreeMap::new();
        for (var, t) in &vars {
            let parts: Vec<&str> = var.split('.').collect();
            for n in 1..parts.len() {
                let module = parts[..n].join(".");
                if !linear_names.contains(module.as_str()) {
                    let is_conv = n == parts.len() - 1 && parts[n] == "weight" && t.dim() == 4;
                    let kind = if is_conv { "Conv2d" } else { "not a Linear" };
                    let e = others.entry(module).or_insert(kind);
                    if is_conv {
                        *e = kind;
                    }
                }
            }
        }
        debug_assert!(linears
            .iter()
            .all(|s| vars.contains_key(&format!("{}.weight", s.name))));
        Self {
            control,
            slots: linears,
            other_modules: others.into_iter().collect(),
            adapters: Vec::new(),
            kind: vs.kind(),
            device: vs.device(),
        }
    }

    /// Every module name we know of: the Linears and the modules holding parameters.
    pub(crate) fn module_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.slots.iter().map(|s| s.name.clone()).collect();
        v.extend(self.other_modules.iter().map(|(n, _)| n.clone()));
        v
    }

    /// Names of every Linear (the modules `"all-linear"` targets).
    pub fn linear_names(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.name.as_str()).collect()
    }

    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters
            .iter()
            .flatten()
            .map(|a| a.name.clone())
            .collect()
    }

    pub fn has_adapter(&self, name: &str) -> bool {
        self.id(name).is_ok()
    }

    fn id(&self, name: &str) -> Result<usize> {
        self.adapters
            .iter()
            .position(|a| a.as_ref().is_some_and(|a| a.name == name))
            .ok_or_else(|| {
                lora_err(format!(
                    "no adapter named `{name}` (have: {:?})",
                    self.adapter_names()
                ))
            })
    }

    fn info(&self, id: usize) -> &AdapterInfo {
        self.adapters[id].as_ref().expect("live adapter id")
    }

    /// The config an adapter was created or loaded with.
    pub fn config(&self, name: &str) -> Result<&LoraConfig> {
        Ok(&self.info(self.id(name)?).config)
    }

    /// The modules an adapter sits on with their rank, alpha and scaling, in model order.
    pub fn modules(&self, name: &str) -> Result<Vec<LoraModuleInfo>> {
        let info = self.info(self.id(name)?);
        Ok(info
            .targets
            .iter()
            .map(|t| LoraModuleInfo {
                module: self.slots[t.slot].name.clone(),
                r: t.r,
                lora_alpha: t.alpha,
                scaling: lora_scaling(t.r, t.alpha, info.config.use_rslora),
            })
            .collect())
    }

    /// PEFT's target resolution: which Linears `config` selects, with their rank and alpha.
    fn resolve(&self, name: &str, config: &LoraConfig) -> Result<Vec<Target>> {
        let source = format!("LoRA adapter `{name}`");
        config
            .validate()
            .map_err(|(k, m)| SanaError::config(&source, k, m))?;
        let names: Vec<String> = self.slots.iter().map(|s| s.name.clone()).collect();
        let m = TargetMatcher::new(config, &names)
            .map_err(|(k, msg)| SanaError::config(&source, k, msg))?;
        let tm = serde_json::to_string(config.target_modules.as_ref().expect("validated"))
            .expect("JSON serialises");
        for (module, kind) in &self.other_modules {
            if m.check(module) == TargetMatch::Target {
                return Err(lora_err(format!(
                    "adapter `{name}`: target_modules {tm} selects `{module}` ({kind}); \
                     sana-rl puts LoRA on Linear layers only"
                )));
            }
        }
        let targets: Vec<Target> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| m.check(&s.name) == TargetMatch::Target)
            .map(|(i, s)| Target {
                slot: i,
                r: m.rank(&s.name),
                alpha: m.alpha(&s.name),
            })
            .collect();
        if targets.is_empty() {
            return Err(lora_err(format!(
                "adapter `{name}`: target modules {tm} not found in the base model \
                 (its Linears are named like `{}`)",
                names.get(names.len() / 2).map_or("", String::as_str)
            )));
        }
        let targeted: Vec<&str> = targets.iter().map(|t| names[t.slot].as_str()).collect();
        for p in m.unused_patterns(config, &targeted) {
            tracing::warn!(adapter = name, pattern = %p, "LoRA pattern matches no targeted module; ignored");
        }
        Ok(targets)
    }

    /// PEFT's `add_adapter`: new adapter `name` on the Linears `config` targets,
    /// initialised per `init_lora_weights` from the global torch RNG (drawn on the CPU
    /// in PEFT's order, so `tch::manual_seed(s)` gives PEFT's init under
    /// `torch.manual_seed(s)`), trainable, in [`adapter_kind`](Self::adapter_kind).
    /// The first adapter added becomes active.
    pub fn add_adapter(&mut self, name: &str, config: &LoraConfig) -> Result<()> {
        self.insert(name, config, Some(config.init_lora_weights), true)
    }

    /// `init`: `None` for zeros (weights about to be loaded; draws no random numbers).
    fn insert(
        &mut self,
        name: &str,
        config: &LoraConfig,
        init: Option<InitLoraWeights>,
        trainable: bool,
    ) -> Result<()> {
        if name.is_empty() || name.contains('.') {
            return Err(lora_err(format!(
                "adapter name {name:?} must be non-empty and contain no `.`"
            )));
        }
        if self.has_adapter(name) {
            return Err(lora_err(format!("adapter `{name}` already exists")));
        }
        let targets = self.resolve(name, config)?;
        let id = self.adapters.len();
        for t in &targets {
            let slot = &self.slots[t.slot];
            let (inf, outf) = (slot.in_features, slot.out_features);
            let opts = (Kind::Float, Device::Cpu);
            let (a, b) = tch::no_grad(|| match init {
                None => (
                    Tensor::zeros([t.r, inf], opts),
                    Tensor::zeros([outf, t.r], opts),
                ),
                Some(init) => {
                    // PEFT builds lora_A/lora_B as nn.Linear (default init draws A, then B),
                    // then re-initialises them.
                    let mut a = Tensor::empty([t.r, inf], opts);
                    let mut b = Tensor::empty([outf, t.r], opts);
                    let (ba, bb) = (kaiming_bound(inf), kaiming_bound(t.r));
                    let _ = a.uniform_(-ba, ba);
                    let _ = b.uniform_(-bb, bb);
                    match init {
                        InitLoraWeights::Kaiming => {
                            let _ = a.uniform_(-ba, ba);
                        }
                        InitLoraWeights::Gaussian => {
                            let _ = a.normal_(0.0, 1.0 / t.r as f64);
                        }
                        InitLoraWeights::Random => {}
                    }
                    if init != InitLoraWeights::Random {
                        let _ = b.zero_();
                    }
                    (a, b)
                }
            });
            let kind = self.adapter_kind();
            let a = a
                .to_device(self.device)
                .to_kind(kind)
                .set_requires_grad(trainable);
            let b = b
                .to_device(self.device)
                .to_kind(kind)
                .set_requires_grad(trainable);
            let mut st = slot.lock();
            if st.adapters.len() <= id {
                st.adapters.resize_with(id + 1, || None);
            }
            st.adapters[id] = Some(LoraWeights {
                a,
                b,
                r: t.r,
                scaling: lora_scaling(t.r, t.alpha, config.use_rslora),
                dropout: config.lora_dropout,
            });
            slot.any.store(true, Ordering::Release);
        }
        tracing::debug!(
            adapter = name,
            modules = targets.len(),
            "LoRA adapter added"
        );
        self.adapters.push(Some(AdapterInfo {
            name: name.to_string(),
            config: config.clone(),
            targets,
        }));
        if self.control.active.load(Ordering::Acquire) == NONE && self.adapter_names().len() == 1 {
            self.control.active.store(id, Ordering::Release);
        }
        Ok(())
    }

    /// Removes an adapter (it must not be merged). If it was active, the model runs
    /// with adapters disabled.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        let id = self.id(name)?;
        if self.control.merged.load(Ordering::Acquire) == id {
            return Err(lora_err(format!(
                "adapter `{name}` is merged; unmerge it first"
            )));
        }
        for t in &self.info(id).targets {
            let slot = &self.slots[t.slot];
            let mut st = slot.lock();
            st.adapters[id] = None;
            let any = st.adapters.iter().any(Option::is_some);
            slot.any.store(any, Ordering::Release);
        }
        self.adapters[id] = None;
        let _ = self
            .control
            .active
            .compare_exchange(id, NONE, Ordering::AcqRel, Ordering::Acquire);
        Ok(())
    }

    fn merged_id(&self) -> usize {
        self.control.merged.load(Ordering::Acquire)
    }

    fn refuse_while_merged(&self, what: &str) -> Result<()> {
        match self.merged_id() {
            NONE => Ok(()),
            id => Err(lora_err(format!(
                "cannot {what} while adapter `{}` is merged into the base weights; unmerge first",
                self.info(id).name
            ))),
        }
    }

    fn resolve_active(&self, a: &ActiveAdapter) -> Result<usize> {
        match a {
            ActiveAdapter::Disabled => Ok(NONE),
            ActiveAdapter::Named(n) => self.id(n),
        }
    }

    /// PEFT's `set_adapter` / `disable_adapter`. Refused while an adapter is merged.
    pub fn set_active(&self, adapter: impl Into<ActiveAdapter>) -> Result<()> {
        let id = self.resolve_active(&adapter.into())?;
        if id != self.control.active.load(Ordering::Acquire) {
            self.refuse_while_merged("switch the active adapter")?;
        }
        self.control.active.store(id, Ordering::Release);
        Ok(())
    }

    pub fn active(&self) -> ActiveAdapter {
        match self.control.active.load(Ordering::Acquire) {
            NONE => ActiveAdapter::Disabled,
            id => ActiveAdapter::Named(self.info(id).name.clone()),
        }
    }

    /// Runs `f` with `adapter` active, then restores the previous one (also on panic).
    pub fn with_active<T>(
        &self,
        adapter: impl Into<ActiveAdapter>,
        f: impl FnOnce() -> T,
    ) -> Result<T> {
        let id = self.resolve_active(&adapter.into())?;
        let previous = self.control.active.load(Ordering::Acquire);
        if id != previous {
            self.refuse_while_merged("switch the active adapter")?;
        }
        let _guard = ActiveGuard {
            control: &self.control,
            previous,
        };
        self.control.active.store(id, Ordering::Release);
        Ok(f())
    }

    /// diffusers' per-call LoRA scale (`attention_kwargs={"scale": s}`, `--lora-scale`):
    /// multiplies every adapter's scaling. Refused while merged (the scale is baked in).
    pub fn set_scale(&self, scale: f64) -> Result<()> {
        if !scale.is_finite() {
            return Err(lora_err(format!("LoRA scale must be finite, got {scale}")));
        }
        if scale != self.scale() {
            self.refuse_while_merged("change the LoRA scale")?;
        }
        self.control.scale.store(scale.to_bits(), Ordering::Release);
        Ok(())
    }

    pub fn scale(&self) -> f64 {
        self.control.scale()
    }

    /// Training mode: LoRA dropout is applied only in it (PEFT's `nn.Dropout`).
    pub fn set_training(&self, training: bool) {
        self.control.training.store(training, Ordering::Release);
    }

    pub fn training(&self) -> bool {
        self.control.training.load(Ordering::Acquire)
    }

    /// PEFT's `merge_adapter`: adds the active adapter's `scale · scaling · B A` into the
    /// base weights, so sampling runs at the base model's cost. While merged, the
    /// active adapter and the scale cannot change.
    pub fn merge(&self) -> Result<()> {
        let id = self.control.active.load(Ordering::Acquire);
        if id == NONE {
            return Err(lora_err("no active adapter to merge"));
        }
        self.refuse_while_merged("merge again")?;
        let scale = self.scale();
        tch::no_grad(|| {
            for t in &self.info(id).targets {
                let st = self.slots[t.slot].lock();
                let w = st.adapters[id].as_ref().expect("target has weights");
                let delta = delta_weight(&w.a, &w.b, w.scaling * scale);
                let mut weight = st.weight.shallow_clone();
                let _ = weight.g_add_(&delta);
            }
        });
        self.control.merged.store(id, Ordering::Release);
        Ok(())
    }

    /// PEFT's `unmerge_adapter`: subtracts the merged adapter again (exact up to fp rounding).
    pub fn unmerge(&self) -> Result<()> {
        let id = self.merged_id();
        if id == NONE {
            return Err(lora_err("no adapter is merged"));
        }
        let scale = self.scale();
        tch::no_grad(|| {
            for t in &self.info(id).targets {
                let st = self.slots[t.slot].lock();
                let w = st.adapters[id].as_ref().expect("target has weights");
                let mut weight = st.weight.shallow_clone();
                let delta = delta_weight(&w.a, &w.b, w.scaling * scale).to_kind(weight.kind());
                let _ = weight.g_sub_(&delta);
            }
        });
        self.control.merged.store(NONE, Ordering::Release);
        Ok(())
    }

    /// The merged adapter, if any.
    pub fn merged(&self) -> Option<String> {
        match self.merged_id() {
            NONE => None,
            id => Some(self.info(id).name.clone()),
        }
    }

    /// Visits `(module, lora_A, lora_B)` of an adapter in model order.
    fn for_each(
        &self,
        id: usize,
        mut f: impl FnMut(&str, &LoraWeights) -> Result<()>,
    ) -> Result<()> {
        for t in &self.info(id).targets {
            let slot = &self.slots[t.slot];
            let st = slot.lock();
            f(
                &slot.name,
                st.adapters[id].as_ref().expect("target has weights"),
            )?;
        }
        Ok(())
    }

    /// The adapter's parameters under PEFT's in-model names
    /// (`transformer_blocks.0.attn1.to_q.lora_A.default.weight`), model order, A before
    /// B. The tensors share storage and autograd state with the layers' (an optimiser
    /// step on them is a step on the adapter).
    pub fn adapter_parameters(&self, name: &str) -> Result<Vec<(String, Tensor)>> {
        let id = self.id(name)?;
        let mut out = Vec::new();
        self.for_each(id, |m, w| {
            out.push((format!("{m}.lora_A.{name}.weight"), w.a.shallow_clone()));
            out.push((format!("{m}.lora_B.{name}.weight"), w.b.shallow_clone()));
            Ok(())
        })?;
        Ok(out)
    }

    /// Makes one adapter's tensors trainable (`requires_grad`) or frozen.
    pub fn set_trainable(&self, name: &str, trainable: bool) -> Result<()> {
        let id = self.id(name)?;
        self.for_each(id, |_, w| {
            let _ = w.a.set_requires_grad(trainable);
            let _ = w.b.set_requires_grad(trainable);
            Ok(())
        })
    }

    /// The adapter as PEFT's `get_peft_model_state_dict` gives it (adapter name dropped):
    /// `transformer_blocks.0.attn1.to_q.lora_A.weight` → tensor (shared storage).
    pub fn state_dict(&self, name: &str) -> Result<Vec<(String, Tensor)>> {
        let id = self.id(name)?;
        let mut out = Vec::new();
        self.for_each(id, |m, w| {
            out.push((format!("{m}.lora_A.weight"), w.a.shallow_clone()));
            out.push((format!("{m}.lora_B.weight"), w.b.shallow_clone()));
            Ok(())
        })?;
        Ok(out)
    }

    /// Copies `tensors` (keys as [`state_dict`](Self::state_dict) gives them) into an
    /// existing adapter. Every tensor must fit a module of the adapter with its exact
    /// shape, and every module must be covered; `source` names the file in errors.
    pub fn load_state_dict(
        &self,
        name: &str,
        tensors: &[(String, Tensor)],
        source: &Path,
    ) -> Result<()> {
        let id = self.id(name)?;
        if self.merged_id() == id {
            return Err(lora_err(format!(
                "adapter `{name}` is merged; unmerge it first"
            )));
        }
        let info = self.info(id);
        let bad = |msg: String| SanaError::Weights {
            path: source.to_path_buf(),
            msg,
        };
        let mut by_module: BTreeMap<&str, (usize, [Option<&Tensor>; 2])> = info
            .targets
            .iter()
            .map(|t| (self.slots[t.slot].name.as_str(), (t.slot, [None, None])))
            .collect();
        for (key, t) in tensors {
            let (module, which) = if let Some(m) = key.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = key.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else {
                let hint = if key.contains("lora_magnitude_vector") {
                    " (DoRA is not implemented)"
                } else if key.ends_with(".bias") {
                    " (lora_bias is not implemented)"
                } else if key.ends_with(".alpha") {
                    " (per-module alpha tensors are not read: give lora_alpha in the config)"
                } else {
                    ""
                };
                return Err(bad(format!(
                    "key `{key}` is not a LoRA weight: expected `<module>.lora_A.weight` or `<module>.lora_B.weight`{hint}"
                )));
            };
            let Some((slot, seen)) = by_module.get_mut(module) else {
                let why = if self.slots.iter().any(|s| s.name == module) {
                    "the adapter config does not target it"
                } else {
                    "the model has no Linear of that name"
                };
                return Err(bad(format!(
                    "key `{key}`: unknown module `{module}` ({why})"
                )));
            };
            if seen[which].replace(t).is_some() {
                return Err(bad(format!("key `{key}` appears twice")));
            }
            let slot = &self.slots[*slot];
            let st = slot.lock();
            let w = st.adapters[id].as_ref().expect("target has weights");
            let want = if which == 0 { w.a.size() } else { w.b.size() };
            if t.size() != want {
                let got = t.size();
                let rank_dim = if which == 0 { 0 } else { 1 };
                let msg = if got.len() == 2 && got[1 - rank_dim] == want[1 - rank_dim] {
                    format!(
                        "key `{key}` has rank {} but the adapter config gives module `{module}` r = {} \
                         (rank mismatch: shape {got:?}, expected {want:?})",
                        got[rank_dim], w.r
                    )
                } else {
                    format!(
                        "key `{key}` has shape {got:?}, but module `{module}` ([out, in] = [{}, {}]) needs {want:?}",
                        slot.out_features, slot.in_features
                    )
                };
                return Err(bad(msg));
            }
        }
        for (module, (_, seen)) in &by_module {
            for (i, ab) in ["lora_A", "lora_B"].iter().enumerate() {
                if seen[i].is_none() {
                    return Err(bad(format!(
                        "missing key `{module}.{ab}.weight`: the adapter config targets `{module}`"
                    )));
                }
            }
        }
        tch::no_grad(|| {
            for (_, (slot, seen)) in by_module {
                let st = self.slots[slot].lock();
                let w = st.adapters[id].as_ref().expect("target has weights");
                let src_a = seen[0].expect("checked");
                let src_b = seen[1].expect("checked");
                let mut a = w.a.shallow_clone();
                let mut b = w.b.shallow_clone();
                a.copy_(&src_a.to_device(a.device()).to_kind(a.kind()));
                b.copy_(&src_b.to_device(b.device()).to_kind(b.kind()));
            }
        });
        Ok(())
    }

    /// Pairs the weights of two adapters that sit on the same modules with the same shapes.
    fn paired(
        &self,
        dst: &str,
        src: &str,
        mut f: impl FnMut(&LoraWeights, &LoraWeights),
    ) -> Result<()> {
        let (d, s) = (self.id(dst)?, self.id(src)?);
        if self.merged_id() == d {
            return Err(lora_err(format!(
                "adapter `{dst}` is merged; unmerge it first"
            )));
        }
        let (di, si) = (self.info(d), self.info(s));
        let same = di.targets.len() == si.targets.len()
            && di
                .targets
                .iter()
                .zip(&si.targets)
                .all(|(x, y)| x.slot == y.slot && x.r == y.r);
        if !same {
            return Err(lora_err(format!(
                "adapters `{dst}` and `{src}` differ in target modules or ranks"
            )));
        }
        for t in &di.targets {
            let st = self.slots[t.slot].lock();
            let (wd, ws) = (
                st.adapters[d].as_ref().expect("target"),
                st.adapters[s].as_ref().expect("target"),
            );
            f(wd, ws);
        }
        Ok(())
    }

    /// `dst ← src` (weights only; no gradient).
    pub fn copy_adapter(&self, src: &str, dst: &str) -> Result<()> {
        tch::no_grad(|| {
            self.paired(dst, src, |d, s| {
                d.a.shallow_clone().copy_(&s.a);
                d.b.shallow_clone().copy_(&s.b);
            })
        })
    }

    /// `dst ← decay · dst + (1 − decay) · src` (the NFT "old" policy update; no gradient).
    pub fn blend_adapter(&self, dst: &str, src: &str, decay: f64) -> Result<()> {
        tch::no_grad(|| {
            self.paired(dst, src, |d, s| {
                for (x, y) in [(&d.a, &s.a), (&d.b, &s.b)] {
                    let new = x * decay + y * (1.0 - decay);
                    x.shallow_clone().copy_(&new);
                }
            })
        })
    }

    /// Casts every adapter's tensors to `kind`, as `model.to(dtype)` does in PyTorch (the
    /// model's `set_kind` calls this). Adapters added afterwards follow [`adapter_kind`](Self::adapter_kind).
    pub fn set_kind(&mut self, kind: Kind) {
        self.kind = kind;
        tch::no_grad(|| {
            for slot in &self.slots {
                let st = slot.lock();
                for w in st.adapters.iter().flatten() {
                    for t in [&w.a, &w.b] {
                        let mut t = t.shallow_clone();
                        let cast = t.to_kind(kind);
                        t.set_data(&cast);
                    }
                }
            }
        });
    }

    /// The dtype new (and loaded) adapters are created in: the model's, except fp32 on
    /// an fp16/bf16 model — PEFT's default `autocast_adapter_dtype=True`, which
    /// diffusers' `load_lora_weights` and `add_adapter` also use. The LoRA branch then
    /// runs in fp32 and its sum is cast back to the model dtype.
    pub fn adapter_kind(&self) -> Kind {
        match self.kind {
            Kind::Half | Kind::BFloat16 => Kind::Float,
            k => k,
        }
    }
}

#[cfg(test)]
mod tests;
