//! The `sana` binary as a user runs it: exit codes, files written, one-line errors.

use std::path::Path;
use std::process::{Command, Output};

use tch::{Device, Kind, Tensor};

fn sana(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sana"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run sana")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn init_model(dir: &Path) {
    let out = sana(&["init-model", "--seed", "3", "--out", p(dir)]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn sample_writes_latents_and_preview() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("s");
    let out = sana(&[
        "sample",
        "--device",
        "cpu",
        "--steps",
        "3",
        "--latent-height",
        "8",
        "--latent-width",
        "12",
        "--num-samples",
        "2",
        "--out",
        p(&out_dir),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let latents = Tensor::read_safetensors(out_dir.join("latents.safetensors")).unwrap();
    assert_eq!(latents[0].0, "latents");
    assert_eq!(latents[0].1.size(), [2, 32, 8, 12]);
    assert!(latents[0].1.isfinite().all().int64_value(&[]) == 1);
    for i in 0..2 {
        let png = std::fs::read(out_dir.join(format!("preview_{i}.png"))).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}

#[test]
fn sample_is_reproducible_by_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, seed: &str| {
        let d = tmp.path().join(name);
        let out = sana(&[
            "sample",
            "--device",
            "cpu",
            "--steps",
            "2",
            "--latent-height",
            "4",
            "--latent-width",
            "4",
            "--sampler",
            "euler",
            "--seed",
            seed,
            "--out",
            p(&d),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        Tensor::read_safetensors(d.join("latents.safetensors"))
            .unwrap()
            .remove(0)
            .1
    };
    let (a, b, c) = (run("a", "7"), run("b", "7"), run("c", "8"));
    assert!(a.equal(&b), "same seed, same latents");
    assert!(!a.equal(&c), "another seed, other latents");
}

#[test]
fn forward_matches_library_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("m");
    init_model(&model_dir);
    let f = (Kind::Float, Device::Cpu);
    tch::manual_seed(1);
    let hidden = Tensor::randn([2, 32, 4, 6], f);
    let enc = Tensor::randn([2, 5, 64], f);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 0, 0, 0]).view([2, 5]);
    let t = Tensor::from_slice(&[999.0f32, 3.0]);
    let inputs = tmp.path().join("in.safetensors");
    Tensor::write_safetensors(
        &[
            ("hidden_states", &hidden),
            ("encoder_hidden_states", &enc),
            ("encoder_attention_mask", &mask),
            ("timestep", &t),
        ],
        &inputs,
    )
    .unwrap();
    let out_path = tmp.path().join("out.safetensors");
    let out = sana(&[
        "forward",
        "--model",
        p(&model_dir),
        "--inputs",
        p(&inputs),
        "--out",
        p(&out_path),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = Tensor::read_safetensors(&out_path).unwrap().remove(0);
    assert_eq!(got.0, "sample");

    let model =
        sana::models::SanaTransformer2DModel::from_pretrained(&model_dir, Device::Cpu, Kind::Float)
            .unwrap();
    let want = tch::no_grad(|| {
        model.forward(
            &sana::models::transformers::sana_transformer::TransformerInputs {
                hidden_states: &hidden,
                encoder_hidden_states: &enc,
                timestep: &t,
                guidance: None,
                encoder_attention_mask: Some(&mask),
            },
        )
    })
    .unwrap();
    assert!(got.1.allclose(&want, 1e-6, 1e-6, false));
}

#[test]
fn malformed_model_dir_is_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("m");
    init_model(&model_dir);
    std::fs::write(model_dir.join("config.json"), r#"{"num_layers": -1}"#).unwrap();
    let inputs = tmp.path().join("missing.safetensors");
    let out = sana(&[
        "forward",
        "--model",
        p(&model_dir),
        "--inputs",
        p(&inputs),
        "--out",
        "x.safetensors",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("config.json") && err.contains("num_layers"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn missing_input_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("m");
    init_model(&model_dir);
    let inputs = tmp.path().join("in.safetensors");
    let hs = Tensor::zeros([1, 32, 2, 2], (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(&[("hidden_states", &hs)], &inputs).unwrap();
    let out = sana(&[
        "forward",
        "--model",
        p(&model_dir),
        "--inputs",
        p(&inputs),
        "--out",
        "x.safetensors",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("missing tensor `encoder_hidden_states`"),
        "{}",
        stderr(&out)
    );
}
