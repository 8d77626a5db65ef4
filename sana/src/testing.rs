//! Helpers shared by the unit tests: locating the parity references that
//! `scripts/parity/make_reference.py` writes, and comparing tensors.

use std::path::PathBuf;

use tch::{Kind, Tensor};

/// The directory of one reference case (`$SANA_PARITY_DIR/<case>`, default
/// `target/parity/<case>`). A missing reference, or references written under
/// another `ATEN_CPU_CAPABILITY` than this test runs under, is a failure with
/// the command that writes them: a parity test never passes by skipping.
pub fn parity_case(case: &str) -> PathBuf {
    let root = parity_root();
    let dir = root.join(case);
    let make = format!(
        "run `scripts/parity/make_reference.py {}` with the same ATEN_CPU_CAPABILITY \
         (the README's test command does)",
        root.display()
    );
    if !dir.is_dir() {
        panic!("parity reference {} is missing: {make}", dir.display());
    }
    let stamp = root.join("capability.json");
    let written: serde_json::Value = std::fs::read_to_string(&stamp)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| panic!("{} is missing or unreadable: {make}", stamp.display()));
    let now = std::env::var("ATEN_CPU_CAPABILITY").unwrap_or_default();
    let then = written["ATEN_CPU_CAPABILITY"].as_str().unwrap_or_default();
    if now != then {
        panic!(
            "the references in {} were written with ATEN_CPU_CAPABILITY={then:?} but this test \
             runs with {now:?}: libtorch's CPU kernels (and randn streams) differ between them; {make}",
            root.display()
        );
    }
    dir
}

/// `$SANA_PARITY_DIR`, else `target/parity[-$ATEN_CPU_CAPABILITY]` as the test
/// command writes them (one set of references per CPU-kernel setting).
fn parity_root() -> PathBuf {
    std::env::var_os("SANA_PARITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cap = std::env::var("ATEN_CPU_CAPABILITY").unwrap_or_default();
            let name = if cap.is_empty() {
                "parity".to_string()
            } else {
                format!("parity-{cap}")
            };
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).join(name)
        })
}

/// Two prompts of very different lengths (the parity scripts' `UNEQUAL_PROMPTS`):
/// their caption masks differ, so a sample given the other prompt's mask shows.
pub fn unequal_prompts() -> Vec<String> {
    vec![
        "a cat".into(),
        "An old lighthouse keeper in a yellow raincoat climbs the spiral stairs at dusk, \
         carrying a brass lantern, while storm clouds gather over a grey sea and gulls circle \
         the tower, oil painting, warm and cold light, highly detailed"
            .into(),
    ]
}

/// Standard-normal fp32 noise on the CPU from its own seed.
pub fn seeded_randn(shape: &[i64], seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, (Kind::Float, tch::Device::Cpu))
}

/// Asserts `|got - want| <= rtol·|want| + atol` and prints both. The absolute
/// part is for values near zero, where a relative bound would demand more than
/// the arithmetic gives (a metric that is exactly 0 in the reference and 1e-15
/// in ours); set it from the size of the operands the value is computed from.
pub fn assert_close(what: &str, got: f64, want: f64, rtol: f64, atol: f64) {
    let bound = rtol * want.abs() + atol;
    let diff = (got - want).abs();
    eprintln!("{what}: ours {got:.9e} reference {want:.9e} diff {diff:.2e} (bound {bound:.2e})");
    assert!(
        diff <= bound,
        "{what}: {got} vs {want}: diff {diff:e} > {bound:e}"
    );
}

/// For a pipeline reference with several prompts × several samples (made per
/// prompt, see scripts/parity/pipeline.py): prints how far diffusers' own
/// batched call, with its tiled caption mask, departs from it, and fails when
/// it does not (the prompts' masks would then be equal and the case would test
/// nothing).
pub fn check_departure_from_batched(
    what: &str,
    reference: &std::collections::HashMap<String, Tensor>,
) {
    if let Some(batched) = reference.get("latents_diffusers_batched") {
        let departure = max_abs_diff(batched, &reference["latents"]);
        eprintln!("{what}: diffusers' batched call departs by {departure:.3e}");
        assert!(
            departure > 1e-2,
            "{what}: the prompts' caption masks do not differ"
        );
    }
}

/// Tensors of a safetensors file by name.
pub fn load_named(path: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    let cpu = |t: &Tensor| t.to_device(tch::Device::Cpu).to_kind(Kind::Double);
    (cpu(a) - cpu(b)).abs().max().double_value(&[])
}

/// A tiny random SANA 1.5-style transformer (4 latent channels, 2 blocks of
/// width 8, captions of width 6), seeded.
pub fn tiny_transformer(
    seed: i64,
) -> crate::models::transformers::sana_transformer::SanaTransformer2DModel {
    use crate::models::transformers::sana_transformer::{
        SanaTransformer2DModel, SanaTransformerConfig,
    };
    tch::manual_seed(seed);
    let cfg = SanaTransformerConfig {
        in_channels: 4,
        out_channels: Some(4),
        num_attention_heads: 2,
        attention_head_dim: 4,
        num_layers: 2,
        num_cross_attention_heads: Some(2),
        cross_attention_head_dim: Some(4),
        cross_attention_dim: Some(8),
        caption_channels: 6,
        qk_norm: Some("rms_norm_across_heads".into()),
        ..Default::default()
    };
    SanaTransformer2DModel::new(cfg, tch::Device::Cpu).unwrap()
}

/// A tiny random SanaVideoTransformer3DModel (fixed seed): patch (1, 2, 2),
/// qk-norm, 6 caption channels like [`tiny_transformer`], rotary split 4/4/4.
pub fn tiny_video_transformer(seed: i64) -> crate::models::SanaVideoTransformer3DModel {
    use crate::models::{SanaVideoTransformer3DModel, SanaVideoTransformerConfig};
    tch::manual_seed(seed);
    let cfg = SanaVideoTransformerConfig {
        in_channels: 4,
        out_channels: Some(4),
        num_attention_heads: 2,
        attention_head_dim: 12,
        num_layers: 2,
        num_cross_attention_heads: Some(2),
        cross_attention_head_dim: Some(12),
        cross_attention_dim: Some(24),
        caption_channels: 6,
        rope_max_seq_len: 32,
        ..Default::default()
    };
    SanaVideoTransformer3DModel::new(cfg, tch::Device::Cpu).unwrap()
}

/// A tiny random SANA 1.5-style transformer (fixed seed) with Cosmos-RL's LoRA
/// targets as adapters "default" (B randomised, so it moves the output) and "old",
/// and a 6-sample NFT batch for it: for tests that need no reference files.
pub fn tiny_nft_model_and_batch(
    seed: i64,
) -> (
    crate::models::transformers::sana_transformer::SanaTransformer2DModel,
    crate::training::nft_trainer::NftBatch,
) {
    use crate::lora::{InitLoraWeights, LoraConfig, TargetModules};
    use tch::Device;
    let mut model = tiny_transformer(seed);
    let targets = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"]
        .into_iter()
        .chain(["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"])
        .map(String::from)
        .collect();
    let mut lora = LoraConfig::new(4, 4.0, TargetModules::Names(targets));
    lora.init_lora_weights = InitLoraWeights::Gaussian;
    model.lora.add_adapter("default", &lora).unwrap();
    model.lora.add_adapter("old", &lora).unwrap();
    tch::no_grad(|| {
        for (_, p) in model.lora.adapter_parameters("default").unwrap() {
            let r = p.randn_like() * 0.1;
            p.shallow_clone().copy_(&r);
        }
    });
    let f = (Kind::Float, Device::Cpu);
    let timesteps = Tensor::from_slice(&[990.0f32, 750.0, 500.0, 250.0]).repeat([6, 1]);
    let mask = Tensor::ones([6, 5], (Kind::Int64, Device::Cpu));
    let _ = mask.narrow(0, 3, 3).narrow(1, 3, 2).fill_(0);
    let batch = crate::training::nft_trainer::NftBatch {
        latents_clean: Tensor::randn([6, 4, 4, 4], f),
        timesteps,
        prompt_embeds: Tensor::randn([3, 5, 6], f).repeat_interleave_self_int(2, 0, None),
        prompt_attention_mask: mask,
        advantages: Tensor::from_slice(&[1.0f32, -1.0, 0.5, -0.5, 2.0, -2.0]),
    };
    (model, batch)
}

/// The venv's python (for checks that load our outputs with diffusers/PEFT); a
/// failure naming the fix without `VIRTUAL_ENV`.
pub fn python() -> std::path::PathBuf {
    let py = std::env::var_os("VIRTUAL_ENV")
        .map(|v| std::path::PathBuf::from(v).join("bin").join("python"));
    py.filter(|p| p.exists()).unwrap_or_else(|| {
        panic!("VIRTUAL_ENV is not set: source scripts/env.sh to run the PEFT/diffusers check")
    })
}

/// Runs `scripts/parity/<script>` with the venv's python and `args`, echoing its
/// stdout; panics with `what`, stdout and stderr when it fails.
pub fn run_parity_check(script: &str, args: &[&std::ffi::OsStr], what: &str) {
    let py = python();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/parity")
        .join(script);
    let res = std::process::Command::new(py)
        .arg(&path)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    eprintln!("{script}:\n{stdout}");
    assert!(
        res.status.success(),
        "{what}:\n{stdout}\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

/// Starts `world` copies of this test binary running the ignored test `test`
/// as ranks of one Gloo group (see [`rank_env`]) and waits for them; returns
/// each rank's output path stem (`<dir>/w<world>_rank<r>`).
pub fn spawn_ranks(
    test: &str,
    world: usize,
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> Vec<std::path::PathBuf> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let outs: Vec<_> = (0..world)
        .map(|r| dir.join(format!("w{world}_rank{r}")))
        .collect();
    let children: Vec<_> = outs
        .iter()
        .enumerate()
        .map(|(rank, out)| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    test,
                    "--ignored",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env("SANA_TEST_RANK", rank.to_string())
                .env("SANA_TEST_WORLD", world.to_string())
                .env("SANA_TEST_PORT", port.to_string())
                .env("SANA_TEST_OUT", out)
                .envs(env.iter().copied())
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, mut c) in children.into_iter().enumerate() {
        let status = c.wait().unwrap();
        assert!(status.success(), "rank {rank} of {world}: {status}");
    }
    outs
}

/// In a rank process started by [`spawn_ranks`]: its data-parallel group and
/// output path stem; None when run directly (the test then does nothing).
pub fn rank_env() -> Option<(crate::training::parallel::DataParallel, std::path::PathBuf)> {
    let var = |k: &str| std::env::var(k).ok();
    let (rank, world, port, out) = (
        var("SANA_TEST_RANK")?.parse().unwrap(),
        var("SANA_TEST_WORLD")?.parse().unwrap(),
        var("SANA_TEST_PORT")?.parse().unwrap(),
        var("SANA_TEST_OUT")?,
    );
    let rdv = c10d::Rendezvous {
        local_addr: Some("127.0.0.1".into()),
        timeout: std::time::Duration::from_secs(120),
        ..c10d::Rendezvous::new("127.0.0.1", port, rank, world)
    };
    let group = c10d::ProcessGroup::new(c10d::Backend::Gloo, &rdv).unwrap();
    Some((
        crate::training::parallel::DataParallel::new(group, tch::Kind::Float, tch::Device::Cpu),
        out.into(),
    ))
}

/// A transformer that records the timestep of every forward (and FSDP
/// prelude) and reports `scale` as its `timestep_scale`: for checking what
/// timesteps the sampling loop and the trainers feed the model.
pub struct TimestepSpy<M> {
    pub inner: M,
    pub scale: f64,
    pub seen: std::sync::Mutex<Vec<Tensor>>,
}

impl<M> TimestepSpy<M> {
    pub fn new(inner: M, scale: f64) -> Self {
        Self {
            inner,
            scale,
            seen: Default::default(),
        }
    }

    /// Every timestep value seen, in order.
    pub fn seen_values(&self) -> Vec<f64> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .flat_map(|t| Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap())
            .collect()
    }

    fn record(&self, t: &Tensor) {
        self.seen.lock().unwrap().push(t.detach().copy());
    }
}

impl<M: crate::models::DiffusionTransformer> crate::models::DiffusionTransformer
    for TimestepSpy<M>
{
    fn forward(
        &self,
        x: &crate::models::transformers::TransformerInputs<'_>,
    ) -> crate::Result<Tensor> {
        self.record(x.timestep);
        self.inner.forward(x)
    }
    fn lora(&self) -> &crate::lora::LoraAdapters {
        self.inner.lora()
    }
    fn lora_mut(&mut self) -> &mut crate::lora::LoraAdapters {
        self.inner.lora_mut()
    }
    fn var_store(&self) -> &tch::nn::VarStore {
        self.inner.var_store()
    }
    fn var_store_mut(&mut self) -> &mut tch::nn::VarStore {
        self.inner.var_store_mut()
    }
    fn in_channels(&self) -> i64 {
        self.inner.in_channels()
    }
    fn out_channels(&self) -> i64 {
        self.inner.out_channels()
    }
    fn timestep_scale(&self) -> f64 {
        self.scale
    }
    fn device(&self) -> tch::Device {
        self.inner.device()
    }
    fn kind(&self) -> Kind {
        self.inner.kind()
    }
    fn save_pretrained_with(
        &self,
        dir: &std::path::Path,
        opts: &crate::models::modeling_utils::SaveOptions,
    ) -> crate::Result<()> {
        self.inner.save_pretrained_with(dir, opts)
    }
    fn num_blocks(&self) -> usize {
        self.inner.num_blocks()
    }
    fn prelude(
        &self,
        x: &crate::models::transformers::TransformerInputs<'_>,
    ) -> crate::Result<(Tensor, crate::models::transformers::BlockContext)> {
        self.record(x.timestep);
        self.inner.prelude(x)
    }
    fn block_forward(
        &self,
        i: usize,
        hs: &Tensor,
        ctx: &crate::models::transformers::BlockContext,
    ) -> Tensor {
        self.inner.block_forward(i, hs, ctx)
    }
    fn finale(&self, hs: &Tensor, ctx: &crate::models::transformers::BlockContext) -> Tensor {
        self.inner.finale(hs, ctx)
    }
}
