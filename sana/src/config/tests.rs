use super::*;

const NFT: &str = r#"
mode = "colocated"
[policy]
model_name_or_path = "out/tiny-sana/pipeline"
is_diffusers = true
[policy.lora]
lora_names = ["default", "old"]
r = 4
lora_alpha = 4
init_lora_weights = "gaussian"
target_modules = ["attn1.to_q", "attn2.to_q"]
[policy.diffusers]
timestep_fraction = 0.99
nft_beta = 1.0
[policy.diffusers.sample]
num_steps = 10
guidance_scale = 1.0
solver = "euler"
deterministic_sampling = true
[train]
seed = 7
[train.train_policy]
type = "grpo"
trainer_type = "diffusion_nft"
dataset.name = "pickscore"
kl_beta = 0.0001
mini_batch = 9
[[train.train_policy.remote_reward.reward_fns]]
name = "jpeg_compressibility"
weigth = 2.0
"#;

fn load_text(text: &str, strict: bool) -> Result<Loaded> {
    load_str(text, Path::new("run.toml"), strict)
}

#[test]
fn defaults_and_values_as_cosmos_rl() {
    let l = load_text(NFT, false).unwrap();
    let c = &l.config;
    assert_eq!(c.run_kind(), RunKind::Nft);
    assert!(c.mode.is_colocated());
    assert_eq!(c.seed(), 7);
    assert_eq!(c.rollout.n_generation, 16);
    assert_eq!(c.train.train_batch_per_replica, 8);
    assert_eq!(c.train.optm_lr, 1e-6);
    assert_eq!(
        c.policy.diffusers.timesteps_fraction, 1.0,
        "the misspelt key is not applied"
    );
    assert_eq!(c.num_train_timesteps(), 10);
    let f = &c.train.train_policy.remote_reward.reward_fns[0];
    assert_eq!((f.weight, f.clip_min, f.clip_max), (1.0, -5.0, 5.0));
    assert_eq!(
        c.validation_reward().reward_fns[0].name,
        "jpeg_compressibility"
    );
}

#[test]
fn unknown_keys_name_line_and_nearest_key() {
    let l = load_text(NFT, false).unwrap();
    let by_key: Vec<(&str, usize, Option<&str>)> = l
        .unknown
        .iter()
        .map(|u| (u.key.as_str(), u.line, u.suggestion.as_deref()))
        .collect();
    assert!(
        by_key.contains(&(
            "policy.diffusers.timestep_fraction",
            13,
            Some("policy.diffusers.timesteps_fraction")
        )),
        "{by_key:?}"
    );
    let w = by_key
        .iter()
        .find(|k| k.0.ends_with("weigth"))
        .expect("the typo inside an array of tables is reported");
    assert_eq!(w.1, 30);
    assert_eq!(
        w.2,
        Some("train.train_policy.remote_reward.reward_fns[].weight")
    );
}

/// `strict` refuses the unknown keys all at once: the NFT presets' own typo
/// must not hide the user's.
#[test]
fn strict_names_every_unknown_key_in_one_error() {
    let line_of = |k: &str| NFT.lines().position(|l| l.starts_with(k)).unwrap() + 1;
    let err = load_text(NFT, true).unwrap_err().to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines[0], "run.toml: 2 unknown keys:", "{err}");
    let first = format!(
        "  run.toml:{}: unknown key `policy.diffusers.timestep_fraction`",
        line_of("timestep_fraction")
    );
    assert!(
        lines[1].starts_with(&first)
            && lines[1].contains("did you mean `policy.diffusers.timesteps_fraction`"),
        "{err}"
    );
    let second = format!(
        "  run.toml:{}: unknown key `train.train_policy.remote_reward.reward_fns",
        line_of("weigth")
    );
    assert!(
        lines[2].starts_with(&second)
            && lines[2]
                .contains("did you mean `train.train_policy.remote_reward.reward_fns[].weight`"),
        "{err}"
    );
    assert_eq!(lines.len(), 3, "{err}");

    // A single one stays a one-line error naming the key.
    let one = NFT.replace("weigth", "weight");
    let err = load_text(&one, true).unwrap_err().to_string();
    assert!(
        err.starts_with("run.toml: key `policy.diffusers.timestep_fraction`: line ")
            && err.contains("did you mean `policy.diffusers.timesteps_fraction`")
            && !err.contains('\n'),
        "{err}"
    );
}

#[test]
fn keys_set_in_vain_are_listed() {
    let sft = "[train.train_policy]\ntype = \"sft\"\ndataset.local_dir = \"d\"\n";
    let l = load_text(sft, false).unwrap();
    assert!(l.not_supported.is_empty(), "{:?}", l.not_supported);
    let text = format!("redis = \"12800\"\n{sft}[train.ckpt]\nupload_hf = true\n");
    let l = load_text(&text, false).unwrap();
    assert_eq!(l.not_supported, ["redis", "train.ckpt.upload_hf"]);
}

#[test]
fn a_key_in_the_wrong_table_points_to_where_it_belongs() {
    let text = "[train]\nnft_beta = 0.5\n";
    let l = load_text(
        &format!("{text}[train.train_policy]\ntype = \"sft\"\ndataset.local_dir = \"d\"\n"),
        false,
    )
    .unwrap();
    assert_eq!(
        l.unknown[0].suggestion.as_deref(),
        Some("policy.diffusers.nft_beta")
    );
    assert_eq!(l.unknown[0].line, 2);
}

#[test]
fn bad_values_fail_naming_file_key_and_fix() {
    let cases = [
        (
            NFT.replace("seed = 7", "seed = \"seven\""),
            "key `train.seed`",
            "line 21",
        ),
        (
            NFT.replace("dataset.name = \"pickscore\"", ""),
            "train.train_policy.dataset.name",
            "missing",
        ),
        (
            NFT.replace("dataset.name = \"pickscore\"", "dataset.name = \"laion\""),
            "dataset.name",
            "not a prompt set",
        ),
        (
            NFT.replace("kl_beta = 0.0001", "kl_beta = 0.0"),
            "kl_beta",
            "needs kl_beta > 0",
        ),
        (
            NFT.replace("lora_names = [\"default\", \"old\"]", ""),
            "policy.lora.lora_names",
            "[\"default\", \"old\"]",
        ),
        (
            NFT.replace("mode = \"colocated\"", "mode = \"spread\""),
            "mode",
            "unknown variant",
        ),
        (
            NFT.replace(
                "[policy.diffusers]",
                "[policy.diffusers]\ninference_size = [512]",
            ),
            "inference_size",
            "[height, width]",
        ),
        ("[train\n".to_string(), "run.toml", "line 1"),
    ];
    for (text, key, msg) in cases {
        let started = std::time::Instant::now();
        let err = load_text(&text, false).unwrap_err().to_string();
        assert!(started.elapsed().as_secs_f64() < 1.0);
        assert!(
            err.contains(key) && err.contains(msg),
            "want {key} / {msg}: {err}"
        );
    }
}

#[test]
fn shipped_configs_load_strictly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut n = 0;
    for sub in ["sana", "demo"] {
        let Ok(entries) = std::fs::read_dir(root.join(sub)) else {
            continue;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "toml") {
                load(&p, true).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
    }
    assert!(
        n >= 6,
        "configs/sana and configs/demo hold the shipped run configs ({n} found)"
    );
}
