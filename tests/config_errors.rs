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
fn broken_configs_fail_in_under_a_second_naming_the_key() {
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
    ];
    for (from, to, want) in cases {
        assert!(good.contains(from), "{from}");
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, good.replace(from, to)).unwrap();
        let (ok, _, err, took) = dry_run(&p, false);
        assert!(!ok, "{to:?} was accepted");
        assert!(took < Duration::from_secs(1), "{to:?}: {took:?}");
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
