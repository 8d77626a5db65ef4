//! SFT end to end (full weights and LoRA): controller + policy worker on a
//! small image folder the test writes; the loss falls, unreadable samples are
//! skipped and counted, and the export loads in diffusers and PEFT.

use e2e::*;

fn sft(template: &str, out_name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train");
    python_script("make_sft_folder.py", &[data.as_os_str()]);
    // One image that cannot be decoded, one prompt without an image.
    std::fs::write(data.join("broken.png"), b"not an image").unwrap();
    std::fs::write(data.join("broken.json"), r#"{"prompt": "broken"}"#).unwrap();
    std::fs::write(data.join("lonely.json"), r#"{"prompt": "no image"}"#).unwrap();
    let line = "dataset.local_dir = \"out/sft-demo/train\"";
    sft_run_learns(template, out_name, line, &data, tiny_pipeline());
}

#[test]
fn sft_full_weights_learns_and_exports_a_diffusers_transformer() {
    sft("tiny-image-sft.toml", "./out/runs/tiny-image-sft");
}

#[test]
fn sft_lora_learns_and_exports_an_adapter_diffusers_and_peft_load() {
    sft("tiny-image-sft-lora.toml", "./out/runs/tiny-image-sft-lora");
}
