//! SANA-Video end to end on CPU: DiffusionNFT on a tiny random SanaVideoPipeline
//! (reward rises on jpeg_compressibility over frames; rollouts logged as mp4),
//! and SFT (full weights and LoRA) on mp4 clips written with ffmpeg-next (loss
//! falls; damaged, short and unpaired clips are counted and skipped; the export
//! loads in diffusers and PEFT).

use e2e::*;
use std::path::Path;
use std::process::Command;

fn sana(args: &[&std::ffi::OsStr]) {
    let res = Command::new(bin("sana")).args(args).output().unwrap();
    assert!(
        res.status.success(),
        "sana {args:?}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
}

#[test]
fn video_nft_raises_the_reward_and_logs_mp4_rollouts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("runs");
    let prompts = repo_root().join("configs/demo/prompts");
    let local = format!("dataset.local_dir = {prompts:?}");
    let cfg = config_from(
        "tiny-video-nft.toml",
        "./out/runs/tiny-video-nft",
        dir.path(),
        &out,
        &[
            ("dataset.local_dir = \"configs/demo/prompts\"", &local),
            ("max_num_steps = 20", "max_num_steps = 14"),
        ],
    );
    let res = controller(&cfg).output().unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    let run = only_run_dir(&out);
    let m = metrics(&run);
    assert_eq!(m.len(), 14, "{stderr}");
    let mean = |r: &[serde_json::Value]| {
        r.iter()
            .map(|x| x["reward_mean"].as_f64().unwrap())
            .sum::<f64>()
            / r.len() as f64
    };
    let (first, last) = (mean(&m[..4]), mean(&m[10..]));
    eprintln!("video NFT: mean reward first 4 steps {first:.5}, last 4 {last:.5}");
    // Measured: −0.01166 → −0.01098 (fixed seeds); a run that does not learn stays put.
    assert!(
        last - first > 2e-4,
        "the reward did not rise: {first} → {last}"
    );
    // Rollouts logged as mp4 with their prompts and rewards (steps 1, 5 and 10).
    let mm = run.join("mm_data");
    let captions: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(mm.join("step_5.json")).unwrap()).unwrap();
    let captions = captions.as_array().unwrap();
    assert_eq!(captions.len(), 4);
    for c in captions {
        let file = mm.join(c["video"].as_str().unwrap());
        assert!(
            std::fs::metadata(&file).unwrap().len() > 0,
            "{}",
            file.display()
        );
        assert!(!c["prompt"].as_str().unwrap().is_empty());
        assert!(c["reward"].as_f64().is_some());
    }
    // The adapter export loads in PEFT and diffusers' SanaVideoPipeline.
    let report = python_script(
        "check_export_loads.py",
        &[
            tiny_video_pipeline().as_os_str(),
            run.join("safetensors/step_14").as_os_str(),
        ],
    );
    eprintln!("video NFT export: {report}");
}

/// Clips for SFT: 10 good ones, one damaged, one too short for `train_frames`
/// (9), one without its sidecar.
fn write_clips(data: &Path, scratch: &Path) {
    sana(&[
        "write-demo-clips".as_ref(),
        data.as_os_str(),
        "--n".as_ref(),
        "10".as_ref(),
    ]);
    std::fs::write(
        data.join("damaged.mp4"),
        b"\x00\x00\x00\x18ftypisom damaged",
    )
    .unwrap();
    std::fs::write(data.join("damaged.json"), r#"{"prompt": "damaged"}"#).unwrap();
    let short = scratch.join("short");
    sana(&[
        "write-demo-clips".as_ref(),
        short.as_os_str(),
        "--n".as_ref(),
        "1".as_ref(),
        "--frames".as_ref(),
        "5".as_ref(),
    ]);
    std::fs::rename(short.join("0.mp4"), data.join("short.mp4")).unwrap();
    std::fs::write(data.join("short.json"), r#"{"prompt": "too short"}"#).unwrap();
    std::fs::rename(data.join("9.json"), scratch.join("9.json")).unwrap(); // 9.mp4 loses its sidecar
}

fn video_sft(template: &str, out_name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train");
    write_clips(&data, dir.path());
    let line = "dataset.local_dir = \"out/sft-video-demo/train\"";
    let stderr = sft_run_learns(template, out_name, line, &data, tiny_video_pipeline());
    assert!(
        stderr.contains("skipping a clip without its name.json sidecar")
            && stderr.contains("9.mp4"),
        "the clip without its sidecar is not reported:\n{stderr}"
    );
}

#[test]
fn video_sft_full_weights_learns_from_mp4_clips() {
    video_sft("tiny-video-sft.toml", "./out/runs/tiny-video-sft");
}

#[test]
fn video_sft_lora_learns_from_mp4_clips() {
    video_sft("tiny-video-sft-lora.toml", "./out/runs/tiny-video-sft-lora");
}
