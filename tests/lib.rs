//! Helpers of the end-to-end tests: the built binaries, a tiny random SANA
//! pipeline written by diffusers, and run configs pointing at it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A workspace binary of the same profile as this test (scripts/test.sh builds them all).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        p.exists(),
        "{} is missing: `cargo build --workspace --bins` (scripts/test.sh does) first",
        p.display()
    );
    p
}

/// `controller --config <config>`, run from the repository root.
pub fn controller(config: &Path) -> Command {
    let mut c = Command::new(bin("controller"));
    c.arg("--config").arg(config).current_dir(repo_root());
    c
}

/// The demo with `edits`, run to the end under `dir/<name>/runs`; its run directory.
pub fn finished_demo_run(dir: &Path, name: &str, edits: &[(&str, &str)]) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let cfg = demo_config(&d, &d.join("runs"), edits);
    let res = controller(&cfg).output().unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    only_run_dir(&d.join("runs"))
}

/// A demo run under `dir/<name>/runs` (controller flags `args`) whose process
/// `worker` is SIGKILLed once `after_steps` steps are logged; waits for the
/// controller. Returns the run's folder (`dir/<name>`), its run directory and
/// the controller's output.
pub fn demo_run_killing(
    dir: &Path,
    name: &str,
    edits: &[(&str, &str)],
    args: &[&str],
    after_steps: usize,
    worker: &str,
) -> (PathBuf, PathBuf, std::process::Output) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let cfg = demo_config(&d, &d.join("runs"), edits);
    let child = controller(&cfg)
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let run = wait_for_steps(&d.join("runs"), after_steps);
    let pid = pid_of(&run, worker);
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    (d, run, child.wait_with_output().unwrap())
}

/// Panics unless two runs exported byte-identical adapters at `step`.
pub fn assert_same_adapter_exports(a_run: &Path, b_run: &Path, step: u64) {
    for f in [
        "adapter_model.safetensors",
        "pytorch_lora_weights.safetensors",
    ] {
        let dir = format!("safetensors/step_{step}");
        let a = std::fs::read(a_run.join(&dir).join(f)).unwrap();
        let b = std::fs::read(b_run.join(&dir).join(f)).unwrap();
        assert!(a == b, "{f}: the runs ended with other weights");
    }
}

/// The venv's python (VIRTUAL_ENV, as scripts/env.sh sets it).
pub fn python() -> PathBuf {
    let venv = std::env::var("VIRTUAL_ENV")
        .expect("VIRTUAL_ENV is not set: run through scripts/test.sh (or source scripts/env.sh)");
    Path::new(&venv).join("bin/python")
}

/// A random-weight pipeline written once per test process by
/// scripts/make_random_pipeline.py (diffusers' own save_pretrained): `kind` is
/// `tiny` (SanaPipeline) or `video` (SanaVideoPipeline).
fn random_pipeline(kind: &str, cell: &'static OnceLock<PathBuf>) -> &'static Path {
    cell.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!(
            "sana-rl-e2e-pipeline-{kind}-{}",
            std::process::id()
        ));
        let out = Command::new(python())
            .arg(repo_root().join("scripts/make_random_pipeline.py"))
            .arg(&dir)
            .arg(kind)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "make_random_pipeline.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir.join("pipeline")
    })
}

/// A tiny random-weight SANA (image) pipeline.
pub fn tiny_pipeline() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    random_pipeline("tiny", &DIR)
}

/// A tiny random-weight SanaVideoPipeline (video transformer + Wan VAE).
pub fn tiny_video_pipeline() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    random_pipeline("video", &DIR)
}

/// The NFT demo config with the model, prompts and output directory replaced.
pub fn demo_config(dir: &Path, output_dir: &Path, edits: &[(&str, &str)]) -> PathBuf {
    let prompts = repo_root().join("configs/demo/prompts");
    let local = format!("dataset.local_dir = {prompts:?}");
    let mut all = vec![(
        "dataset.local_dir = \"configs/demo/prompts\"",
        local.as_str(),
    )];
    all.extend_from_slice(edits);
    config_from(
        "tiny-image-nft.toml",
        "./out/runs/tiny-image-nft",
        dir,
        output_dir,
        &all,
    )
}

/// `configs/demo/<template>` with the tiny (image or video) pipeline as its model, `output_dir`
/// replacing `template_out`, and `edits` applied; written to `dir/run.toml`.
pub fn config_from(
    template: &str,
    template_out: &str,
    dir: &Path,
    output_dir: &Path,
    edits: &[(&str, &str)],
) -> PathBuf {
    let mut text =
        std::fs::read_to_string(repo_root().join("configs/demo").join(template)).unwrap();
    let model = if text.contains("out/tiny-sana-video/pipeline") {
        (
            "model_name_or_path = \"out/tiny-sana-video/pipeline\"".to_string(),
            format!("model_name_or_path = {:?}", tiny_video_pipeline()),
        )
    } else {
        (
            "model_name_or_path = \"out/tiny-sana/pipeline\"".to_string(),
            format!("model_name_or_path = {:?}", tiny_pipeline()),
        )
    };
    let mut reps = vec![
        model,
        (
            format!("output_dir = {template_out:?}"),
            format!("output_dir = {output_dir:?}"),
        ),
    ];
    for (a, b) in edits {
        reps.push((a.to_string(), b.to_string()));
    }
    for (a, b) in reps {
        assert!(text.contains(&a), "{template} has no {a:?}");
        text = text.replace(&a, &b);
    }
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs a script of scripts/ with the venv's python; its stdout, or a panic with stderr.
pub fn python_script(script: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(python())
        .arg(repo_root().join("scripts").join(script))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `metrics.jsonl` rows of a run directory (training steps only, not validation).
pub fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .collect()
}

/// The single run directory under an output_dir.
pub fn only_run_dir(output_dir: &Path) -> PathBuf {
    let mut runs: Vec<PathBuf> = std::fs::read_dir(output_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    runs.sort();
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs.pop().unwrap()
}

/// Waits until the single run under `output_dir` has logged `steps` training
/// steps; returns its directory.
pub fn wait_for_steps(output_dir: &Path, steps: usize) -> PathBuf {
    let started = std::time::Instant::now();
    loop {
        let run = std::fs::read_dir(output_dir)
            .ok()
            .and_then(|mut rd| rd.next())
            .map(|e| e.unwrap().path());
        if let Some(run) = run {
            if metrics(&run).len() >= steps {
                return run;
            }
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(300),
            "the run never reached step {steps}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The pid of a process of a run (from its `workers.json`).
pub fn pid_of(run: &Path, name: &str) -> u32 {
    let w: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("workers.json")).unwrap()).unwrap();
    w.as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["pid"].as_u64())
        .unwrap() as u32
}

/// An SFT demo config (`template`, whose `output_dir` is `template_out` and
/// whose data folder line is `data_line`) run on `data` to its 24 steps: the
/// mean loss of the last 5 steps must be under 0.9× the first 5's, some
/// unreadable samples must have been counted as skipped, and the export must
/// load with diffusers/PEFT (scripts/check_export_loads.py against
/// `pipeline`). Returns the controller's stderr.
pub fn sft_run_learns(
    template: &str,
    template_out: &str,
    data_line: &str,
    data: &Path,
    pipeline: &Path,
) -> String {
    let dir = data.parent().unwrap();
    let out = dir.join("runs");
    let local = format!("dataset.local_dir = {data:?}");
    let cfg = config_from(template, template_out, dir, &out, &[(data_line, &local)]);
    let res = controller(&cfg).output().unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr).into_owned();
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
        "{template}: the unreadable samples were never counted"
    );
    let report = python_script(
        "check_export_loads.py",
        &[
            pipeline.as_os_str(),
            run.join("safetensors/step_24").as_os_str(),
        ],
    );
    eprintln!("{template}: {report}");
    stderr
}
