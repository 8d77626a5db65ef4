//! SFT end to end (full weights and LoRA): controller + policy worker on a
//! small image folder the test writes; the loss falls, unreadable samples are
//! skipped and counted, and the export loads in diffusers and PEFT.

use e2e::*;
use std::process::Command;

fn sft(template: &str, out_name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train");
    python_script("make_sft_folder.py", &[data.as_os_str()]);
    // One image that cannot be decoded, one prompt without an image.
    std::fs::write(data.join("broken.png"), b"not an image").unwrap();
    std::fs::write(data.join("broken.json"), r#"{"prompt": "broken"}"#).unwrap();
    std::fs::write(data.join("lonely.json"), r#"{"prompt": "no image"}"#).unwrap();
    let out = dir.path().join("runs");
    let local = format!("dataset.local_dir = {data:?}");
    let cfg = config_from(
        template,
        out_name,
        dir.path(),
        &out,
        &[("dataset.local_dir = \"out/sft-demo/train\"", &local)],
    );
    let res = Command::new(bin("controller"))
        .arg("--config")
        .arg(&cfg)
        .current_dir(repo_root())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{template}:\n{stderr}");
    let run = only_run_dir(&out);
    let m = metrics(&run);
    assert_eq!(m.len(), 24, "{stderr}");
    let mean = |r: &[serde_json::Value]| {
        r.iter().map(|x| x["loss"].as_f64().unwrap()).sum::<f64>() / r.len() as f64
    };
    let (first, last) = (mean(&m[..5]), mean(&m[19..]));
    eprintln!("{template}: mean loss first 5 {first:.4}, last 5 {last:.4}");
    assert!(
        last < 0.9 * first,
        "{template}: the loss did not fall ({first} → {last})"
    );
    let skipped: u64 = m.iter().map(|x| x["skipped"].as_u64().unwrap()).sum();
    assert!(
        skipped > 0,
        "the broken image was never drawn or never counted"
    );
    let report = python_script(
        "check_export_loads.py",
        &[
            tiny_pipeline().as_os_str(),
            run.join("safetensors/step_24").as_os_str(),
        ],
    );
    eprintln!("{template}: {report}");
}

#[test]
fn sft_full_weights_learns_and_exports_a_diffusers_transformer() {
    sft("tiny-image-sft.toml", "./out/runs/tiny-image-sft");
}

#[test]
fn sft_lora_learns_and_exports_an_adapter_diffusers_and_peft_load() {
    sft("tiny-image-sft-lora.toml", "./out/runs/tiny-image-sft-lora");
}
