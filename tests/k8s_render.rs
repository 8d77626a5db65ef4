//! `controller --render k8s`: the manifests pass kubernetes-validate (the
//! Kubernetes API's OpenAPI schemas, offline, strict: unknown fields fail) for
//! the versions below, and deploy/k8s/ is exactly what the renderer prints for
//! configs/sana/sana-image-nft.toml. After a change to the renderer or that
//! config, `SANA_RL_BLESS=1 cargo nextest run -p e2e --test k8s_render`
//! rewrites deploy/k8s/.

use e2e::*;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Kubernetes versions the manifests must validate against (schemas shipped
/// with the kubernetes-validate of scripts/requirements.txt).
const K8S_VERSIONS: &[&str] = &["1.34.0", "1.37.0"];
const PRESET: &str = "configs/sana/sana-image-nft.toml";

/// `controller --config <config> --render k8s <extra>` from the repository root,
/// with what the plan reads from the machine pinned (no cached prompt sets, no
/// REMOTE_REWARD_*), so every machine prints the same.
fn render(config: &str, extra: &[&str], env: &[(&str, &str)]) -> String {
    let data = tempfile::tempdir().unwrap();
    let mut c = Command::new(bin("controller"));
    c.args(["--config", config, "--render", "k8s"])
        .args(extra)
        .current_dir(repo_root())
        .env("SANA_RL_DATA", data.path())
        .env_remove("REMOTE_REWARD_ENQUEUE_URL")
        .env_remove("REMOTE_REWARD_FETCH_URL");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "--render k8s of {config} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// kubernetes-validate --strict on `yaml` (stdin) or on `files`, for every version.
fn validate(what: &str, yaml: Option<&str>, files: &[PathBuf]) {
    for v in K8S_VERSIONS {
        let mut c = Command::new(python());
        c.args(["-m", "kubernetes_validate", "--kubernetes-version", v])
            .args(["--strict", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match yaml {
            Some(_) => {
                c.arg("-");
            }
            None => {
                c.args(files);
            }
        }
        let mut child = c.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        if let Some(y) = yaml {
            stdin.write_all(y.as_bytes()).unwrap();
        }
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{what} does not validate for Kubernetes {v} (kubernetes-validate is in \
             scripts/requirements.txt; source scripts/env.sh installs it):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// (file name, document) of each `---` / `# Source: <file>` document.
fn documents(yaml: &str) -> Vec<(String, String)> {
    let mut docs: Vec<(String, String)> = Vec::new();
    let mut lines = yaml.split_inclusive('\n').peekable();
    while let Some(line) = lines.next() {
        assert_eq!(line, "---\n", "every document starts with ---");
        let source = lines.next().expect("a # Source: line after ---");
        let file = source
            .strip_prefix("# Source: ")
            .unwrap_or_else(|| panic!("{source:?} is not a # Source: line"))
            .trim_end()
            .to_string();
        let mut body = String::new();
        while let Some(l) = lines.next_if(|l| *l != "---\n") {
            body.push_str(l);
        }
        docs.push((file, body));
    }
    docs
}

fn header() -> String {
    format!(
        "# Rendered by `controller --config {PRESET} --render k8s`; do not edit:\n\
         # tests/tests/k8s_render.rs checks it (SANA_RL_BLESS=1 there rewrites it).\n"
    )
}

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy/k8s")
}

fn committed_yaml_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

#[test]
fn deploy_k8s_is_what_the_renderer_prints_for_the_preset() {
    let docs = documents(&render(PRESET, &[], &[]));
    let want: Vec<(String, String)> = docs
        .into_iter()
        .map(|(f, d)| (f, format!("{}{d}", header())))
        .collect();
    if std::env::var("SANA_RL_BLESS").as_deref() == Ok("1") {
        for p in committed_yaml_files() {
            std::fs::remove_file(p).unwrap();
        }
        for (f, text) in &want {
            std::fs::write(deploy_dir().join(f), text).unwrap();
        }
    }
    let files = committed_yaml_files();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let want_names: Vec<&String> = want.iter().map(|(f, _)| f).collect();
    assert_eq!(
        names.iter().collect::<Vec<_>>(),
        want_names,
        "deploy/k8s/ has other files than `controller --config {PRESET} --render k8s` prints: \
         rerun this test with SANA_RL_BLESS=1 to rewrite them"
    );
    for (p, (f, text)) in files.iter().zip(&want) {
        let got = std::fs::read_to_string(p).unwrap();
        assert!(
            got == *text,
            "deploy/k8s/{f} differs from what `controller --config {PRESET} --render k8s` prints: \
             rerun this test with SANA_RL_BLESS=1 to rewrite it\n--- committed\n{got}\n--- rendered\n{text}"
        );
    }
    validate("deploy/k8s/", None, &files);
}

#[test]
fn the_preset_validates_with_eight_policy_ranks() {
    let y = render(PRESET, &[], &[]);
    validate(PRESET, Some(&y), &[]);
    assert!(y.contains("\n  completions: 8\n"), "{y}");
    assert_eq!(y.matches("- --attach-policy\n").count(), 8);
    for i in 0..8 {
        assert!(
            y.contains(&format!(
                "- sana-image-nft-policy-{i}.sana-image-nft-workers:50051\n"
            )),
            "{y}"
        );
    }
    assert!(y.contains("- sana-image-nft-policy-0.sana-image-nft-workers:29500\n"));
}

#[test]
fn the_demo_config_validates_with_every_piece() {
    let y = render("configs/demo/tiny-image-nft.toml", &[], &[]);
    validate("configs/demo/tiny-image-nft.toml", Some(&y), &[]);
    for name in [
        "config",
        "secrets",
        "output",
        "redis",
        "reward-service",
        "reward-gateway",
        "workers",
        "policy",
        "rollout",
        "controller",
    ] {
        assert!(
            y.contains(&format!("\n  name: tiny-image-nft-{name}\n")),
            "{name}: {y}"
        );
    }
    assert!(y.contains("image: ghcr.io/sana-rl/sana-rl:"), "{y}");
    assert!(y.contains("- --total-steps\n        - \"20\"\n"), "{y}");
    assert!(y.contains("value: http://tiny-image-nft-reward-service:8080/api/reward/enqueue\n"));
    assert!(y.contains("redis_host = \"tiny-image-nft-redis\"\n"));
}

#[test]
fn external_rewards_and_an_image_override() {
    let y = render(
        "configs/demo/tiny-image-nft.toml",
        &["--image", "registry.example/sana-rl:dev"],
        &[
            (
                "REMOTE_REWARD_ENQUEUE_URL",
                "https://rewards.example/api/reward/enqueue",
            ),
            (
                "REMOTE_REWARD_FETCH_URL",
                "https://rewards.example/api/reward/pull",
            ),
        ],
    );
    validate(
        "tiny-image-nft with an external reward service",
        Some(&y),
        &[],
    );
    assert!(!y.contains("tiny-image-nft-redis"), "{y}");
    assert!(!y.contains("name: tiny-image-nft-reward-service\n"), "{y}");
    assert!(y.contains("value: https://rewards.example/api/reward/enqueue\n"));
    assert!(y.contains("image: registry.example/sana-rl:dev\n"));
    assert!(!y.contains("ghcr.io/sana-rl"), "{y}");
}

#[test]
fn sft_renders_no_rollouts_or_rewards_and_validates() {
    let y = render("configs/demo/tiny-image-sft.toml", &[], &[]);
    validate("configs/demo/tiny-image-sft.toml", Some(&y), &[]);
    assert_eq!(documents(&y).len(), 6, "{y}");
    for absent in ["rollout", "reward", "redis"] {
        assert!(!y.contains(absent), "{absent}: {y}");
    }
}

#[test]
fn image_without_render_is_refused() {
    let out = Command::new(bin("controller"))
        .args([
            "--config",
            "configs/demo/tiny-image-nft.toml",
            "--image",
            "x",
        ])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--render"));
}
