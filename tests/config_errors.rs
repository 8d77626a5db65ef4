//! `controller --dry-run` on the shipped configs, and broken configs failing
//! fast with the key named.

use e2e::*;
use std::process::Command;
use std::time::{Duration, Instant};

fn dry_run(config: &std::path::Path, strict: bool) -> (bool, String, String, Duration) {
    let started = Instant::now();
    let mut c = Command::new(bin("controller"));
    c.arg("--config")
        .arg(config)
        .arg("--dry-run")
        .current_dir(repo_root());
    if strict {
        c.arg("--strict");
    }
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn every_shipped_config_passes_dry_run() {
    for sub in ["configs/sana", "configs/demo"] {
        for e in std::fs::read_dir(repo_root().join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let (ok, out, err, _) = dry_run(&p, true);
                assert!(ok, "{}: {err}", p.display());
                assert!(
                    out.contains("workers") && out.contains("optimizer"),
                    "{out}"
                );
            }
        }
    }
}

#[test]
fn broken_configs_fail_fast_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let good =
        std::fs::read_to_string(repo_root().join("configs/demo/tiny-image-nft.toml")).unwrap();
    let cases = [
        (
            "train_batch_per_replica = 32",
            "train_batch_per_replica = \"many\"",
            "train.train_batch_per_replica",
        ),
        (
            "dataset.name = \"pickscore\"\n",
            "",
            "train.train_policy.dataset.name",
        ),
        (
            "name = \"jpeg_compressibility\"",
            "name = \"jpeg_compresibility\"",
            "unknown reward \"jpeg_compresibility\"",
        ),
        (
            "n_generation = 8",
            "n_generation = 7",
            "not a multiple of rollout.n_generation",
        ),
        ("mode = \"colocated\"", "mode = \"together\"", "key `mode`"),
        (
            "solver = \"euler\"",
            "solver = \"heun\"",
            "policy.diffusers.sample.solver",
        ),
        (
            "solver = \"euler\"",
            "solver = \"rk4\"",
            "flow, dance, ddim, dpm1, dpm2",
        ),
        (
            "solver = \"euler\"\ndeterministic_sampling = true",
            "solver = \"dpm2\"\ndeterministic_sampling = false",
            "policy.diffusers.sample.deterministic_sampling",
        ),
        (
            "guidance_scale = 1.0",
            "guidance_scale = 4.5",
            "set guidance_scale = 1.0",
        ),
        (
            "n_generation = 8",
            "n_generation = 8\nn_generation_mini_batch = 0",
            "rollout.n_generation_mini_batch",
        ),
    ];
    for (from, to, want) in cases {
        assert!(good.contains(from), "{from}");
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, good.replace(from, to)).unwrap();
        let (ok, _, err, took) = dry_run(&p, false);
        assert!(!ok, "{to:?} was accepted");
        // Before anything starts: a loaded machine, not the config, sets the time.
        assert!(took < Duration::from_secs(10), "{to:?}: {took:?}");
        assert!(
            err.starts_with("error: ") && err.contains(want),
            "{to:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
    // Unknown keys: a warning with the line and the fix, an error with --strict.
    let p = dir.path().join("typo.toml");
    std::fs::write(&p, good.replace("timesteps_fraction", "timestep_fraction")).unwrap();
    let (ok, _, err, _) = dry_run(&p, false);
    assert!(
        ok && err.contains("did you mean `policy.diffusers.timesteps_fraction`"),
        "{err}"
    );
    let (ok, _, err, _) = dry_run(&p, true);
    assert!(
        !ok && err.contains("policy.diffusers.timestep_fraction"),
        "{err}"
    );
}

/// `--strict` names every unknown key in one error, each with its line and fix
/// (Cosmos-RL's own NFT preset has one; it must not hide the user's).
#[test]
fn strict_names_every_unknown_key_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let good =
        std::fs::read_to_string(repo_root().join("configs/demo/tiny-image-nft.toml")).unwrap();
    let p = dir.path().join("typos.toml");
    let text = good
        .replace("timesteps_fraction", "timestep_fraction")
        .replace("kl_beta", "kl_bta");
    std::fs::write(&p, text).unwrap();
    let (ok, _, err, _) = dry_run(&p, true);
    assert!(!ok, "accepted with --strict");
    assert!(err.contains("2 unknown keys"), "{err}");
    for want in [
        "unknown key `policy.diffusers.timestep_fraction`",
        "did you mean `policy.diffusers.timesteps_fraction`",
        "unknown key `train.train_policy.kl_bta`",
        "did you mean `train.train_policy.kl_beta`",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
}

/// A key the run will not honour is named once, on one line of the plan.
#[test]
fn keys_set_in_vain_are_one_line_of_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let good =
        std::fs::read_to_string(repo_root().join("configs/demo/tiny-image-nft.toml")).unwrap();
    let p = dir.path().join("vain.toml");
    let text = format!("redis = \"12800\"\n{good}").replace("compile = false", "compile = true");
    std::fs::write(&p, text).unwrap();
    let (ok, out, err, _) = dry_run(&p, false);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out
        .lines()
        .chain(err.lines())
        .filter(|l| l.contains("parsed, not supported"))
        .collect();
    assert_eq!(
        lines,
        ["warning    parsed, not supported: redis, train.compile"],
        "{out}{err}"
    );
}
