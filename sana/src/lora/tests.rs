//! LoRA tests: parity with PEFT / diffusers on the references of
//! `scripts/parity/lora.py`, the export loaded back by the real PEFT and diffusers
//! (`scripts/parity/check_lora_export.py`), and the API on a tiny model.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::io::{read_safetensors_with_metadata, write_safetensors_with_metadata};
use super::*;
use crate::models::transformers::sana_transformer::TransformerInputs;
use crate::models::{SanaTransformer2DModel, SanaTransformerConfig};
use crate::testing::{load_named, max_abs_diff, parity_case, run_parity_check};

const TOL: f64 = 1e-4;

fn forward(model: &SanaTransformer2DModel, inputs: &HashMap<String, Tensor>) -> Tensor {
    tch::no_grad(|| {
        model.forward(&TransformerInputs {
            hidden_states: &inputs["hidden_states"],
            encoder_hidden_states: &inputs["encoder_hidden_states"],
            timestep: &inputs["timestep"],
            guidance: inputs.get("guidance"),
            encoder_attention_mask: inputs.get("encoder_attention_mask"),
        })
    })
    .unwrap()
}

struct Case {
    dir: PathBuf,
    inputs: HashMap<String, Tensor>,
    outputs: HashMap<String, Tensor>,
    json: serde_json::Value,
}

impl Case {
    fn load(name: &str) -> Case {
        let dir = parity_case(&format!("lora_{name}"));
        let json =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        Case {
            inputs: load_named(&dir.join("inputs.safetensors")),
            outputs: load_named(&dir.join("outputs.safetensors")),
            dir,
            json,
        }
    }

    fn model(&self) -> SanaTransformer2DModel {
        SanaTransformer2DModel::from_pretrained(&self.dir.join("model"), Device::Cpu, Kind::Float)
            .unwrap()
    }

    fn check(&self, what: &str, got: &Tensor, key: &str) -> f64 {
        let err = max_abs_diff(got, &self.outputs[key]);
        eprintln!(
            "{}: {what}: max abs err {err:.3e} vs {key}",
            self.dir.display()
        );
        assert!(
            err <= TOL,
            "{what}: max abs error {err:e} > {TOL:e} (vs {key})"
        );
        err
    }

    /// PEFT's per-module (r, lora_alpha, scaling).
    fn modules(&self) -> BTreeMap<String, (i64, f64, f64)> {
        self.json["modules"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let f = |n: &str| v[n].as_f64().unwrap();
                (
                    k.clone(),
                    (v["r"].as_i64().unwrap(), f("lora_alpha"), f("scaling")),
                )
            })
            .collect()
    }
}

fn our_modules(model: &SanaTransformer2DModel, adapter: &str) -> BTreeMap<String, (i64, f64, f64)> {
    model
        .lora
        .modules(adapter)
        .unwrap()
        .into_iter()
        .map(|m| (m.module, (m.r, m.lora_alpha, m.scaling)))
        .collect()
}

/// The PEFT adapter, the diffusers file with and without metadata, all on one model
/// at once, each checked against PEFT / diffusers with the others present.
fn check_parity(name: &str) {
    let case = Case::load(name);
    let mut model = case.model();
    let fmt = model
        .lora
        .load_adapter("peft", &case.dir.join("adapter"))
        .unwrap();
    assert_eq!(fmt, AdapterFormat::Peft);
    let fmt = model
        .lora
        .load_adapter("diffusers", &case.dir.join("diffusers"))
        .unwrap();
    assert_eq!(fmt, AdapterFormat::Diffusers);
    let fmt = model
        .lora
        .load_adapter(
            "nometa",
            &case
                .dir
                .join("diffusers_nometa")
                .join(DIFFUSERS_LORA_WEIGHTS_NAME),
        )
        .unwrap();
    assert_eq!(fmt, AdapterFormat::DiffusersWithoutMetadata);

    let want = case.modules();
    let got = our_modules(&model, "peft");
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "targeted modules"
    );
    for (m, (r, a, s)) in &want {
        let (gr, ga, gs) = got[m];
        assert_eq!((gr, ga), (*r, *a), "{m}: (r, lora_alpha)");
        assert!(
            (gs - s).abs() <= 1e-12 * s.abs(),
            "{m}: scaling {gs} vs {s}"
        );
    }
    assert_eq!(our_modules(&model, "diffusers"), got);

    // The first adapter loaded is active.
    assert_eq!(model.lora.active(), ActiveAdapter::Named("peft".into()));
    case.check("PEFT adapter", &forward(&model, &case.inputs), "active");
    model
        .lora
        .set_scale(case.json["scale"].as_f64().unwrap())
        .unwrap();
    case.check(
        "PEFT adapter, scaled",
        &forward(&model, &case.inputs),
        "scaled",
    );
    model.lora.set_scale(1.0).unwrap();
    let out = model
        .lora
        .with_active("diffusers", || forward(&model, &case.inputs))
        .unwrap();
    case.check("diffusers file with metadata", &out, "active");
    let out = model
        .lora
        .with_active("nometa", || forward(&model, &case.inputs))
        .unwrap();
    case.check(
        "diffusers file without metadata (alpha = r)",
        &out,
        "nometa",
    );
    let out = model
        .lora
        .with_active(ActiveAdapter::Disabled, || forward(&model, &case.inputs))
        .unwrap();
    case.check("adapters disabled", &out, "disabled");
    assert_eq!(
        model.lora.active(),
        ActiveAdapter::Named("peft".into()),
        "with_active restores"
    );
}

#[test]
fn parity_list_targets_rank_alpha_patterns() {
    check_parity("list_patterns");
}

#[test]
fn parity_all_linear_rslora_sprint() {
    check_parity("all_linear_rslora");
}

#[test]
fn parity_regex_targets() {
    check_parity("regex");
}

#[test]
fn parity_layers_to_transform_exclude() {
    check_parity("layers");
}

/// `tch::manual_seed(s)` + `add_adapter` draws PEFT's init under `torch.manual_seed(s)`.
fn check_init(name: &str) {
    let case = Case::load(name);
    let mut model = case.model();
    let config =
        LoraConfig::from_json_file(&case.dir.join("adapter").join(PEFT_CONFIG_NAME)).unwrap();
    tch::manual_seed(case.json["init_seed"].as_i64().unwrap());
    model.lora.add_adapter("default", &config).unwrap();
    let want = load_named(&case.dir.join("init.safetensors"));
    let got = model.lora.state_dict("default").unwrap();
    assert_eq!(got.len(), want.len());
    let mut worst = 0f64;
    for (k, t) in &got {
        worst = worst.max(max_abs_diff(t, &want[k]));
    }
    eprintln!(
        "{name}: init max abs diff {worst:e} ({:?})",
        config.init_lora_weights
    );
    assert_eq!(worst, 0.0, "init differs from PEFT's");
}

#[test]
fn init_matches_peft_gaussian() {
    check_init("list_patterns");
}

#[test]
fn init_matches_peft_kaiming() {
    check_init("all_linear_rslora");
}

#[test]
fn init_matches_peft_random_false() {
    check_init("regex");
}

fn json_file(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// PEFT writes `target_modules` (a Python set) in arbitrary order: sort it.
fn sets(mut v: serde_json::Value) -> serde_json::Value {
    for (k, x) in v.as_object_mut().unwrap() {
        if k.ends_with("target_modules") {
            if let Some(a) = x.as_array_mut() {
                a.sort_by_key(|s| s.as_str().unwrap().to_string());
            }
        }
    }
    v
}

fn metadata_config(path: &Path) -> serde_json::Value {
    let (_, meta) = read_safetensors_with_metadata(path).unwrap();
    serde_json::from_str(&meta.unwrap()[LORA_ADAPTER_METADATA_KEY]).unwrap()
}

/// Our export: the same adapter_config.json and metadata PEFT/diffusers write, it
/// round-trips through our importer, and the real PEFT and diffusers load it and
/// give the reference output.
fn check_export(name: &str) {
    let case = Case::load(name);
    let mut model = case.model();
    model
        .lora
        .load_adapter("default", &case.dir.join("adapter"))
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    model.lora.export("default", out.path()).unwrap();

    let ours = json_file(&out.path().join(PEFT_CONFIG_NAME));
    let theirs = json_file(&case.dir.join("adapter").join(PEFT_CONFIG_NAME));
    assert_eq!(
        sets(ours),
        sets(theirs),
        "adapter_config.json differs from PEFT's"
    );
    let mut ours = sets(metadata_config(
        &out.path().join(DIFFUSERS_LORA_WEIGHTS_NAME),
    ));
    let theirs = sets(metadata_config(
        &case.dir.join("diffusers").join(DIFFUSERS_LORA_WEIGHTS_NAME),
    ));
    for key in ["transformer.auto_mapping", "transformer.inference_mode"] {
        // Set by PEFT's save_pretrained on the live config, which diffusers' scripts
        // serialise later; neither changes what gets loaded.
        ours[key] = theirs[key].clone();
    }
    assert_eq!(ours, theirs, "diffusers metadata differs");

    let reference = forward(&model, &case.inputs);
    for file in [
        out.path().to_path_buf(),
        out.path().join(DIFFUSERS_LORA_WEIGHTS_NAME),
    ] {
        let mut again = case.model();
        again.lora.load_adapter("default", &file).unwrap();
        let err = max_abs_diff(&forward(&again, &case.inputs), &reference);
        assert_eq!(err, 0.0, "{}: re-imported export differs", file.display());
    }

    let tol = TOL.to_string();
    run_parity_check(
        "check_lora_export.py",
        &[case.dir.as_os_str(), out.path().as_os_str(), tol.as_ref()],
        &format!("{name}: PEFT/diffusers rejected our export"),
    );
}

#[test]
fn export_loads_in_peft_and_diffusers_list_patterns() {
    check_export("list_patterns");
}

/// An adapter made and changed in sana-rl (not read from PEFT's files) loads in PEFT
/// and diffusers and gives sana-rl's output.
#[test]
fn own_adapter_export_loads_in_peft_and_diffusers() {
    let case = Case::load("list_patterns");
    let mut model = case.model();
    let config =
        LoraConfig::from_json_file(&case.dir.join("adapter").join(PEFT_CONFIG_NAME)).unwrap();
    tch::manual_seed(11);
    model.lora.add_adapter("default", &config).unwrap();
    randomize(&model, "default");
    let scale = case.json["scale"].as_f64().unwrap();
    let active = forward(&model, &case.inputs);
    model.lora.set_scale(scale).unwrap();
    let scaled = forward(&model, &case.inputs);
    let out = tempfile::tempdir().unwrap();
    model.lora.export("default", out.path()).unwrap();
    let expected = out.path().join("expected.safetensors");
    let (active, scaled) = (active.contiguous(), scaled.contiguous());
    Tensor::write_safetensors(&[("active", &active), ("scaled", &scaled)], &expected).unwrap();
    let tol = TOL.to_string();
    run_parity_check(
        "check_lora_export.py",
        &[
            case.dir.as_os_str(),
            out.path().as_os_str(),
            tol.as_ref(),
            expected.as_os_str(),
        ],
        "own adapter: PEFT/diffusers rejected our export",
    );
}

#[test]
fn export_loads_in_peft_and_diffusers_all_linear() {
    check_export("all_linear_rslora");
}

#[test]
fn export_loads_in_peft_and_diffusers_regex() {
    check_export("regex");
}

#[test]
fn export_loads_in_peft_and_diffusers_layers() {
    check_export("layers");
}

/// The parity check must notice one wrong LoRA weight.
#[test]
fn parity_fails_when_a_lora_weight_is_perturbed() {
    let case = Case::load("list_patterns");
    let mut model = case.model();
    model
        .lora
        .load_adapter("default", &case.dir.join("adapter"))
        .unwrap();
    let params: HashMap<String, Tensor> = model
        .lora
        .adapter_parameters("default")
        .unwrap()
        .into_iter()
        .collect();
    tch::no_grad(|| {
        let _ = params["transformer_blocks.1.attn2.to_k.lora_B.default.weight"]
            .get(0)
            .get(0)
            .g_add_scalar_(1e-2);
    });
    let err = max_abs_diff(&forward(&model, &case.inputs), &case.outputs["active"]);
    eprintln!("perturbed LoRA weight: max abs err {err:.3e}");
    assert!(
        err > TOL,
        "perturbing a LoRA weight went unnoticed (err {err:e})"
    );
}

#[test]
fn merge_matches_unmerged_and_unmerge_restores() {
    let case = Case::load("list_patterns");
    let mut model = case.model();
    let before: HashMap<String, Tensor> = model
        .vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.copy()))
        .collect();
    model
        .lora
        .load_adapter("default", &case.dir.join("adapter"))
        .unwrap();
    model.lora.merge().unwrap();
    assert_eq!(model.lora.merged().as_deref(), Some("default"));
    case.check("merged adapter", &forward(&model, &case.inputs), "active");
    let err = model
        .lora
        .set_active(ActiveAdapter::Disabled)
        .unwrap_err()
        .to_string();
    assert!(err.contains("merged"), "{err}");
    assert!(model.lora.set_scale(0.5).is_err());
    model.lora.unmerge().unwrap();
    let mut worst = 0f64;
    for (k, v) in model.vs.variables() {
        worst = worst.max(max_abs_diff(&v, &before[&k]));
    }
    eprintln!("merge/unmerge round trip: max abs weight change {worst:.3e}");
    assert!(worst <= 1e-6, "unmerge left {worst:e}");
    model.lora.set_active(ActiveAdapter::Disabled).unwrap();
    case.check(
        "after unmerge, disabled",
        &forward(&model, &case.inputs),
        "disabled",
    );
}

// ---- The API on a tiny model (no references needed). ----

fn tiny() -> SanaTransformer2DModel {
    // Fixed weights, so the numeric bounds of these tests never depend on the draw.
    tch::manual_seed(11);
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
        ..Default::default()
    };
    SanaTransformer2DModel::new(cfg, Device::Cpu).unwrap()
}

fn tiny_inputs() -> HashMap<String, Tensor> {
    let f = (Kind::Float, Device::Cpu);
    tch::manual_seed(3);
    HashMap::from([
        ("hidden_states".into(), Tensor::randn([2, 4, 3, 5], f)),
        ("encoder_hidden_states".into(), Tensor::randn([2, 7, 6], f)),
        ("timestep".into(), Tensor::from_slice(&[999.0f32, 10.0])),
    ])
}

fn attn_config(r: i64) -> LoraConfig {
    LoraConfig::new(
        r,
        2.0 * r as f64,
        TargetModules::Names(vec![
            "to_q".into(),
            "to_k".into(),
            "to_v".into(),
            "to_out.0".into(),
        ]),
    )
}

/// Gives an adapter non-zero B so it changes the output.
fn randomize(model: &SanaTransformer2DModel, name: &str) {
    tch::no_grad(|| {
        for (_, t) in model.lora.adapter_parameters(name).unwrap() {
            let mut t = t;
            let _ = t.normal_(0.0, 0.3);
        }
    });
}

#[test]
fn fresh_adapter_is_a_no_op_and_lives_outside_the_var_store() {
    let mut model = tiny();
    let inputs = tiny_inputs();
    let base = forward(&model, &inputs);
    model.lora.add_adapter("default", &attn_config(4)).unwrap();
    assert_eq!(model.lora.active(), ActiveAdapter::Named("default".into()));
    assert_eq!(
        max_abs_diff(&forward(&model, &inputs), &base),
        0.0,
        "B = 0 at init"
    );
    assert!(model.vs.variables().keys().all(|k| !k.contains("lora")));
    let names: Vec<String> = model
        .lora
        .adapter_parameters("default")
        .unwrap()
        .into_iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(
        names.len(),
        2 * 8 * 2,
        "2 blocks × 8 attention Linears × (A, B)"
    );
    assert_eq!(
        names[0],
        "transformer_blocks.0.attn1.to_q.lora_A.default.weight"
    );
    assert_eq!(
        names[1],
        "transformer_blocks.0.attn1.to_q.lora_B.default.weight"
    );
    // Saving the model writes the base weights only, and they load back.
    let dir = tempfile::tempdir().unwrap();
    randomize(&model, "default");
    model.save_pretrained(dir.path()).unwrap();
    let again =
        SanaTransformer2DModel::from_pretrained(dir.path(), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(max_abs_diff(&forward(&again, &inputs), &base), 0.0);
}

#[test]
fn named_adapters_switch_blend_and_train_independently() {
    let mut model = tiny();
    model.vs.freeze();
    let inputs = tiny_inputs();
    let base = forward(&model, &inputs);
    let cfg = attn_config(2);
    model.lora.add_adapter("default", &cfg).unwrap();
    model.lora.add_adapter("old", &cfg).unwrap();
    randomize(&model, "default");
    randomize(&model, "old");
    // Adding "old" did not change the active adapter.
    assert_eq!(model.lora.active(), ActiveAdapter::Named("default".into()));
    let v_default = forward(&model, &inputs);
    let v_old = model
        .lora
        .with_active("old", || forward(&model, &inputs))
        .unwrap();
    let v_ref = model
        .lora
        .with_active(ActiveAdapter::Disabled, || forward(&model, &inputs))
        .unwrap();
    assert_eq!(max_abs_diff(&v_ref, &base), 0.0);
    assert!(max_abs_diff(&v_default, &v_old) > 1e-3);
    assert!(max_abs_diff(&v_default, &base) > 1e-3);

    // old ← 0.25·old + 0.75·default, element by element.
    let old_before: Vec<Tensor> = model
        .lora
        .adapter_parameters("old")
        .unwrap()
        .into_iter()
        .map(|p| p.1.copy())
        .collect();
    model.lora.blend_adapter("old", "default", 0.25).unwrap();
    let def = model.lora.adapter_parameters("default").unwrap();
    let old = model.lora.adapter_parameters("old").unwrap();
    for ((o, d), ob) in old.iter().zip(&def).zip(&old_before) {
        let want = ob * 0.25 + &d.1 * 0.75;
        assert_eq!(max_abs_diff(&o.1, &want), 0.0, "{}", o.0);
    }
    model.lora.copy_adapter("default", "old").unwrap();
    let v_old = model
        .lora
        .with_active("old", || forward(&model, &inputs))
        .unwrap();
    assert_eq!(max_abs_diff(&v_old, &v_default), 0.0);

    // Only the trainable adapter gets gradients.
    model.lora.set_trainable("old", false).unwrap();
    let x = TransformerInputs {
        hidden_states: &inputs["hidden_states"],
        encoder_hidden_states: &inputs["encoder_hidden_states"],
        timestep: &inputs["timestep"],
        guidance: None,
        encoder_attention_mask: None,
    };
    let loss = model.forward(&x).unwrap().square().mean(Kind::Float);
    let loss_old = model
        .lora
        .with_active("old", || {
            model.forward(&x).unwrap().square().mean(Kind::Float)
        })
        .unwrap();
    (loss + loss_old).backward();
    for (n, p) in model.lora.adapter_parameters("default").unwrap() {
        assert!(
            p.grad().defined() && p.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{n} has no grad"
        );
    }
    for (n, p) in model.lora.adapter_parameters("old").unwrap() {
        assert!(!p.requires_grad() && !p.grad().defined(), "{n} is frozen");
    }
}

#[test]
fn model_with_adapters_is_send() {
    fn send<T: Send>() {}
    send::<SanaTransformer2DModel>();
    send::<LoraAdapters>();
}

#[test]
fn dropout_only_in_training_mode() {
    let mut model = tiny();
    let inputs = tiny_inputs();
    let cfg = LoraConfig {
        lora_dropout: 0.5,
        ..attn_config(2)
    };
    model.lora.add_adapter("default", &cfg).unwrap();
    randomize(&model, "default");
    let a = forward(&model, &inputs);
    assert_eq!(
        max_abs_diff(&forward(&model, &inputs), &a),
        0.0,
        "eval: deterministic"
    );
    model.lora.set_training(true);
    assert!(
        max_abs_diff(&forward(&model, &inputs), &a) > 1e-4,
        "train: dropout on the LoRA input"
    );
}

#[test]
fn bf16_model_casts_adapters() {
    let mut model = tiny();
    model.lora.add_adapter("default", &attn_config(2)).unwrap();
    randomize(&model, "default");
    let inputs = tiny_inputs();
    let fp32 = forward(&model, &inputs);
    model.set_kind(Kind::BFloat16);
    assert!(model
        .lora
        .adapter_parameters("default")
        .unwrap()
        .iter()
        .all(|p| p.1.kind() == Kind::BFloat16));
    let bf16 = forward(&model, &inputs);
    assert_eq!(bf16.kind(), Kind::BFloat16);
    assert!(max_abs_diff(&bf16, &fp32) < 0.1);
    // Adapters added to a bf16 model are fp32 (PEFT's autocast_adapter_dtype); the
    // output keeps the model dtype.
    model.lora.add_adapter("new", &attn_config(2)).unwrap();
    let params = model.lora.adapter_parameters("new").unwrap();
    assert!(params.iter().all(|p| p.1.kind() == Kind::Float));
    model.lora.set_active("new").unwrap();
    assert_eq!(forward(&model, &inputs).kind(), Kind::BFloat16);
    model.lora.set_kind(Kind::Float);
    assert_eq!(forward(&model, &inputs).kind(), Kind::BFloat16);
}

#[test]
fn api_misuse_is_a_clear_error() {
    let mut model = tiny();
    let e = |r: Result<()>| r.unwrap_err().to_string();
    let msg = e(model.lora.add_adapter(
        "x",
        &LoraConfig::new(2, 2.0, TargetModules::Names(vec!["to_w".into()])),
    ));
    assert!(msg.contains("not found in the base model"), "{msg}");
    let msg = e(model.lora.add_adapter(
        "x",
        &LoraConfig::new(
            2,
            2.0,
            TargetModules::Names(vec!["ff.conv_inverted".into()]),
        ),
    ));
    assert!(
        msg.contains("transformer_blocks.0.ff.conv_inverted") && msg.contains("Conv2d"),
        "{msg}"
    );
    let msg = e(model.lora.add_adapter(
        "x",
        &LoraConfig::new(2, 2.0, TargetModules::Regex(".*attn1".into())),
    ));
    assert!(msg.contains("not a Linear"), "{msg}");
    let msg = e(model.lora.add_adapter(
        "x",
        &LoraConfig::new(0, 2.0, TargetModules::Regex("all-linear".into())),
    ));
    assert!(msg.contains("`r`"), "{msg}");
    model
        .lora
        .add_adapter(
            "x",
            &LoraConfig::new(2, 2.0, TargetModules::Regex("ALL-LINEAR".into())),
        )
        .unwrap();
    assert_eq!(
        model.lora.modules("x").unwrap().len(),
        model.lora.linear_names().len()
    );
    assert!(e(model.lora.add_adapter("x", &attn_config(2))).contains("already exists"));
    assert!(e(model.lora.set_active("nope")).contains("no adapter named `nope`"));
    model.lora.set_active(ActiveAdapter::Disabled).unwrap();
    assert!(e(model.lora.merge()).contains("no active adapter"));
    assert!(e(model.lora.unmerge()).contains("no adapter is merged"));
    model.lora.delete_adapter("x").unwrap();
    assert!(model.lora.adapter_names().is_empty());
}

/// An exported tiny adapter, its PEFT weights file rewritten by `edit`, then loaded.
fn load_edited(edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> String {
    let mut model = tiny();
    model.lora.add_adapter("default", &attn_config(2)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.lora.export("default", dir.path()).unwrap();
    let path = dir.path().join(PEFT_WEIGHTS_NAME);
    let (mut tensors, meta) = read_safetensors_with_metadata(&path).unwrap();
    edit(&mut tensors);
    write_safetensors_with_metadata(&path, &tensors, &meta.unwrap()).unwrap();
    let mut fresh = tiny();
    let msg = fresh
        .lora
        .load_adapter("default", dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(PEFT_WEIGHTS_NAME),
        "error names the file: {msg}"
    );
    assert!(
        !fresh.lora.has_adapter("default"),
        "a failed load leaves no adapter"
    );
    msg
}

#[test]
fn bad_adapter_files_name_file_and_key() {
    let k = "base_model.model.transformer_blocks.1.attn1.to_k.lora_A.weight";
    let msg = load_edited(|t| {
        t.push((
            "base_model.model.transformer_blocks.0.attn1.to_w.lora_A.weight".into(),
            Tensor::zeros([2, 8], (Kind::Float, Device::Cpu)),
        ))
    });
    assert!(
        msg.contains("transformer_blocks.0.attn1.to_w.lora_A.weight")
            && msg.contains("unknown module"),
        "{msg}"
    );
    let msg = load_edited(|t| {
        for (n, x) in t.iter_mut() {
            if n == k {
                *x = Tensor::zeros([3, 8], (Kind::Float, Device::Cpu));
            }
        }
    });
    assert!(
        msg.contains("transformer_blocks.1.attn1.to_k.lora_A.weight")
            && msg.contains("rank mismatch"),
        "{msg}"
    );
    let msg = load_edited(|t| {
        for (n, x) in t.iter_mut() {
            if n == k {
                *x = Tensor::zeros([2, 5], (Kind::Float, Device::Cpu));
            }
        }
    });
    assert!(msg.contains("[2, 5]") && msg.contains("to_k"), "{msg}");
    let msg = load_edited(|t| t.retain(|(n, _)| n != k));
    assert!(
        msg.contains("missing key `transformer_blocks.1.attn1.to_k.lora_A.weight`"),
        "{msg}"
    );
    let msg = load_edited(|t| {
        t.iter_mut()
            .for_each(|(n, _)| *n = n.replace("base_model.model.", ""));
    });
    assert!(msg.contains("base_model.model."), "{msg}");

    // A config asking for a PEFT feature we do not implement names file and key.
    let mut model = tiny();
    model.lora.add_adapter("default", &attn_config(2)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.lora.export("default", dir.path()).unwrap();
    let cfg_path = dir.path().join(PEFT_CONFIG_NAME);
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        text.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .unwrap();
    let msg = tiny()
        .lora
        .load_adapter("default", dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(PEFT_CONFIG_NAME) && msg.contains("`use_dora`"),
        "{msg}"
    );
    std::fs::write(&cfg_path, text.replace("\"to_q\"", "\"to_qq\"")).unwrap();
    let msg = tiny()
        .lora
        .load_adapter("default", dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("to_q.lora_A.weight") && msg.contains("does not target it"),
        "{msg}"
    );

    // A diffusers file whose keys are not `transformer.`-prefixed.
    let file = dir.path().join(DIFFUSERS_LORA_WEIGHTS_NAME);
    let (tensors, meta) = read_safetensors_with_metadata(&file).unwrap();
    let renamed: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| (n.replace("transformer.", "unet."), t))
        .collect();
    write_safetensors_with_metadata(&file, &renamed, &meta.unwrap()).unwrap();
    let msg = tiny()
        .lora
        .load_adapter("default", &file)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(DIFFUSERS_LORA_WEIGHTS_NAME) && msg.contains("transformer."),
        "{msg}"
    );
}

/// A fresh `all-linear` adapter saves the condensed suffix list PEFT saves.
#[test]
fn all_linear_export_condenses_targets_as_peft() {
    let case = Case::load("all_linear_rslora");
    let mut model = case.model();
    let theirs = json_file(&case.dir.join("adapter").join(PEFT_CONFIG_NAME));
    let mut config =
        LoraConfig::from_json_file(&case.dir.join("adapter").join(PEFT_CONFIG_NAME)).unwrap();
    config.target_modules = Some(TargetModules::Regex("all-linear".into()));
    model.lora.add_adapter("default", &config).unwrap();
    let ours = serde_json::Value::Object(model.lora.peft_config_json("default", true).unwrap());
    assert_eq!(sets(ours)["target_modules"], sets(theirs)["target_modules"]);
}
