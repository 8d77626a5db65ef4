//! `controller --config X --render k8s`: the run as Kubernetes objects, printed
//! as multi-document YAML for `kubectl apply -f -` (deploy/k8s/ holds them for
//! configs/sana/sana-image-nft.toml; deploy/k8s/README.md says how to use them).
//!
//! What runs where follows the plan, as `controller::launch` does on one
//! machine: Redis and the reward-service (unless REMOTE_REWARD_* point at an
//! external one), the reward-gateway, the policy ranks and the rollout workers
//! as two Indexed Jobs behind one headless Service (stable names
//! `<prefix>-policy-<rank>.<prefix>-workers`), and the controller as a Job that
//! attaches to them. SFT runs have no rollout workers and no reward pieces.
//!
//! The objects are built as [`Y`] trees and printed by a small block-style YAML
//! writer here rather than with a YAML crate or as JSON documents: the key order
//! stays Kubernetes' usual one (apiVersion, kind, metadata, spec; serde_json's
//! map sorts keys unless its `preserve_order` feature is on, which feature
//! unification could flip under us, changing the committed files), the
//! ConfigMap's TOML reads as a literal block, and the workspace gains no
//! dependency for ~100 lines of writer.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::bail;
use sana::config::{RunConfig, RunKind};

use crate::plan::{Plan, RewardSetup, EMBEDDED_REWARDS};

/// Where the ConfigMap (config.toml, rewards.toml) is mounted in every pod.
pub const CONFIG_DIR: &str = "/etc/sana-rl";
/// Where the shared PersistentVolumeClaim is mounted (run directory, Hugging
/// Face cache, prompt sets); also the sana-rl containers' working directory,
/// so relative paths of the config resolve on the volume.
pub const OUTPUT_DIR: &str = "/output";
pub const WORKER_PORT: u16 = 50051;
pub const RENDEZVOUS_PORT: u16 = 29500;
pub const GATEWAY_PORT: u16 = 50060;
pub const REWARD_SERVICE_PORT: u16 = 8080;
pub const REDIS_PORT: u16 = 6379;
pub const REDIS_IMAGE: &str = "redis:7";
/// Keys of the rendered Secret (empty placeholders to fill in before applying).
pub const SECRET_KEYS: &[&str] = &["HF_TOKEN", "WANDB_API_KEY", "REMOTE_REWARD_TOKEN"];
/// The label every object carries (`kubectl delete all,cm,secret,pvc -l ...`).
pub const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "sana-rl");
/// Pod label shared by both worker Jobs, which the headless Service selects.
pub const ROLE_LABEL: &str = "sana-rl/role";
/// The longest name prefix: `<prefix>-reward-service` and the worker pods'
/// hostnames `<prefix>-rollout-<index>` stay within a 63-character label.
pub const MAX_PREFIX: usize = 40;

/// `ghcr.io/sana-rl/sana-rl:<crate version>`; `--image` overrides it.
pub fn default_image() -> String {
    format!("ghcr.io/sana-rl/sana-rl:{}", env!("CARGO_PKG_VERSION"))
}

/// A YAML node with its keys in insertion order.
#[derive(Debug, Clone, PartialEq)]
pub enum Y {
    Str(String),
    Int(i64),
    Bool(bool),
    Seq(Vec<Y>),
    Map(Vec<(String, Y)>),
}

impl From<&str> for Y {
    fn from(s: &str) -> Self {
        Y::Str(s.to_string())
    }
}
impl From<String> for Y {
    fn from(s: String) -> Self {
        Y::Str(s)
    }
}
impl From<&String> for Y {
    fn from(s: &String) -> Self {
        Y::Str(s.clone())
    }
}
impl From<i64> for Y {
    fn from(n: i64) -> Self {
        Y::Int(n)
    }
}
impl From<u16> for Y {
    fn from(n: u16) -> Self {
        Y::Int(n.into())
    }
}
impl From<usize> for Y {
    fn from(n: usize) -> Self {
        Y::Int(n as i64)
    }
}
impl From<bool> for Y {
    fn from(b: bool) -> Self {
        Y::Bool(b)
    }
}
impl From<Vec<Y>> for Y {
    fn from(v: Vec<Y>) -> Self {
        Y::Seq(v)
    }
}
impl From<Vec<String>> for Y {
    fn from(v: Vec<String>) -> Self {
        Y::Seq(v.into_iter().map(Y::Str).collect())
    }
}

/// `map! { "key" => value, ... }`: a [`Y::Map`] in the order written.
macro_rules! map {
    ($($k:expr => $v:expr),* $(,)?) => {
        Y::Map(vec![$(($k.to_string(), Y::from($v))),*])
    };
}

impl Y {
    /// The value under `key` of a map.
    pub fn get(&self, key: &str) -> Option<&Y> {
        match self {
            Y::Map(e) => e.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The value at a path of map keys and sequence indices (`["spec", "0"]`).
    pub fn at(&self, path: &[&str]) -> Option<&Y> {
        path.iter().try_fold(self, |y, k| match y {
            Y::Seq(s) => k.parse::<usize>().ok().and_then(|i| s.get(i)),
            _ => y.get(k),
        })
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Y::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Y::Int(n) => Some(*n),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> &[Y] {
        match self {
            Y::Seq(s) => s,
            _ => &[],
        }
    }

    fn push(&mut self, key: &str, value: impl Into<Y>) {
        if let Y::Map(e) = self {
            e.push((key.to_string(), value.into()));
        }
    }

    /// Block-style YAML (kubectl's layout: sequences under a key are not indented).
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        match self {
            Y::Map(e) if !e.is_empty() => write_map(&mut out, e, 0, false),
            Y::Seq(s) if !s.is_empty() => write_seq(&mut out, s, 0),
            other => write_scalar(&mut out, other, 2),
        }
        out
    }
}

fn pad(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

fn write_map(out: &mut String, entries: &[(String, Y)], indent: usize, inline_first: bool) {
    for (i, (k, v)) in entries.iter().enumerate() {
        if !(inline_first && i == 0) {
            pad(out, indent);
        }
        out.push_str(&scalar_text(k));
        out.push(':');
        write_value(out, v, indent, true);
    }
}

fn write_seq(out: &mut String, items: &[Y], indent: usize) {
    for it in items {
        pad(out, indent);
        out.push('-');
        write_value(out, it, indent, false);
    }
}

/// The value after `key:` or `-` (at column `indent`), through its last newline.
fn write_value(out: &mut String, v: &Y, indent: usize, after_key: bool) {
    match v {
        Y::Map(e) if !e.is_empty() => {
            if after_key {
                out.push('\n');
                write_map(out, e, indent + 2, false);
            } else {
                out.push(' ');
                write_map(out, e, indent + 2, true);
            }
        }
        Y::Seq(s) if !s.is_empty() => {
            out.push('\n');
            write_seq(out, s, if after_key { indent } else { indent + 2 });
        }
        _ => {
            out.push(' ');
            write_scalar(out, v, indent + 2);
        }
    }
}

/// A scalar (or an empty collection) and its newline; multi-line text as a
/// literal block indented by `block_indent`.
fn write_scalar(out: &mut String, v: &Y, block_indent: usize) {
    match v {
        Y::Str(s) if literal_block_ok(s) => {
            let body = match s.strip_suffix('\n') {
                Some(b) => {
                    out.push_str("|\n");
                    b
                }
                None => {
                    out.push_str("|-\n");
                    s.as_str()
                }
            };
            for line in body.split('\n') {
                if !line.is_empty() {
                    pad(out, block_indent);
                    out.push_str(line);
                }
                out.push('\n');
            }
            return;
        }
        Y::Str(s) => out.push_str(&scalar_text(s)),
        Y::Int(n) => {
            let _ = write!(out, "{n}");
        }
        Y::Bool(b) => {
            let _ = write!(out, "{b}");
        }
        Y::Seq(_) => out.push_str("[]"),
        Y::Map(_) => out.push_str("{}"),
    }
    out.push('\n');
}

/// Multi-line text that a `|` / `|-` block carries exactly: printable, no CR,
/// at most one trailing newline, and a first content line that does not start
/// with a space (the block's indentation is read from it).
fn literal_block_ok(s: &str) -> bool {
    s.contains('\n')
        && !s.ends_with("\n\n")
        && s.chars().all(|c| c == '\n' || c == '\t' || printable(c))
        && s.split('\n')
            .find(|l| !l.is_empty())
            .is_some_and(|l| !l.starts_with(' ') && !l.starts_with('\t'))
}

/// YAML's printable set, less the byte-order mark.
fn printable(c: char) -> bool {
    matches!(c, ' '..='~' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
        && c != '\u{feff}'
}

/// A string as a plain scalar where that reads back as the same string under
/// YAML 1.1 and 1.2 (PyYAML, Go's yaml), else double-quoted.
fn scalar_text(s: &str) -> String {
    if plain_ok(s) {
        return s.to_string();
    }
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            '\r' => o.push_str("\\r"),
            c if printable(c) => o.push(c),
            c if (c as u32) <= 0xffff => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(o, "\\U{:08x}", c as u32);
            }
        }
    }
    o.push('"');
    o
}

/// Conservative: letters, digits and `-._/:` only; starts with a letter, `/`,
/// or `-` before a letter or `-` (flags); no trailing `:`; never a word YAML 1.1
/// reads as a bool or null; nothing starting with a digit (numbers, times, dates).
fn plain_ok(s: &str) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    let second = chars.next();
    let start_ok = first.is_ascii_alphabetic()
        || first == '/'
        || (first == '-' && second.is_some_and(|c| c == '-' || c.is_ascii_alphabetic()));
    start_ok
        && !s.ends_with(':')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '/' | ':'))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "y" | "n" | "yes" | "no" | "true" | "false" | "on" | "off" | "null"
        )
}

/// `s` as a DNS-1035 label (lowercase letters, digits, `-`; starts with a
/// letter, as Service names must), at most `max` characters.
pub fn dns_label(raw: &str, max: usize) -> String {
    let mut s = String::new();
    for c in raw.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            s.push(c);
        } else if !s.is_empty() && !s.ends_with('-') {
            s.push('-');
        }
    }
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        s = format!("run-{s}");
    }
    s.truncate(max);
    while s.ends_with('-') {
        s.pop();
    }
    s
}

/// The objects' name prefix: `logging.experiment_name` (Cosmos-RL's presets
/// write the string "None" for none), else the config file's stem, as a DNS label.
pub fn name_prefix(c: &RunConfig, config_path: &Path) -> String {
    let exp = c
        .logging
        .experiment_name
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty() && !s.eq_ignore_ascii_case("none"));
    let raw = match exp {
        Some(e) => e.to_string(),
        None => config_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    dns_label(&raw, MAX_PREFIX)
}

/// Policy ranks: `dp_replicate_size × dp_shard_size` of `[policy.parallelism]`
/// (a shard size of -1, "every device of the node", counts one: a pod has one GPU),
/// at least 1.
pub fn policy_ranks(c: &RunConfig) -> usize {
    c.policy.parallelism.dp_world(1).max(1) as usize
}

/// The rendered objects, each with the file name deploy/k8s/ keeps it under.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub prefix: String,
    pub objects: Vec<(String, Y)>,
    /// Things the manifests cannot fix that the user should know before applying.
    pub warnings: Vec<String>,
}

impl Rendered {
    /// Multi-document YAML: each document starts with `---` and a
    /// `# Source: <file>` comment naming its file in deploy/k8s/.
    pub fn yaml(&self) -> String {
        let mut s = String::new();
        for (file, obj) in &self.objects {
            let _ = writeln!(s, "---\n# Source: {file}");
            s.push_str(&obj.to_yaml());
        }
        s
    }

    /// The object of this kind and name (without the prefix).
    pub fn find(&self, kind: &str, name: &str) -> Option<&Y> {
        let full = format!("{}-{name}", self.prefix);
        self.objects.iter().map(|(_, o)| o).find(|o| {
            o.get("kind").and_then(Y::as_str) == Some(kind)
                && o.at(&["metadata", "name"]).and_then(Y::as_str) == Some(full.as_str())
        })
    }
}

struct Ctx<'a> {
    prefix: String,
    image: &'a str,
}

impl Ctx<'_> {
    fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.prefix)
    }

    fn labels(&self, component: &str) -> Y {
        map! {
            PART_OF.0 => PART_OF.1,
            "app.kubernetes.io/instance" => &self.prefix,
            "app.kubernetes.io/component" => component,
        }
    }

    fn selector(&self, component: &str) -> Y {
        map! {
            "app.kubernetes.io/instance" => &self.prefix,
            "app.kubernetes.io/component" => component,
        }
    }

    fn meta(&self, suffix: &str, component: &str) -> Y {
        map! { "name" => self.name(suffix), "labels" => self.labels(component) }
    }

    fn secret_env_from(&self) -> Y {
        Y::Seq(vec![map! {
            "secretRef" => map! { "name" => self.name("secrets"), "optional" => true },
        }])
    }

    fn config_volume(&self) -> Y {
        map! { "name" => "config", "configMap" => map! { "name" => self.name("config") } }
    }

    fn output_volume(&self) -> Y {
        map! {
            "name" => "output",
            "persistentVolumeClaim" => map! { "claimName" => self.name("output") },
        }
    }

    /// A container of the sana-rl image running `command` with the config
    /// mounted; `output`: also the shared volume, as working directory, with the
    /// Hugging Face cache and the prompt sets on it.
    fn container(&self, command: &str, args: Vec<String>, mut env: Vec<Y>, output: bool) -> Y {
        let mut mounts =
            vec![map! { "name" => "config", "mountPath" => CONFIG_DIR, "readOnly" => true }];
        let mut c = map! {
            "name" => command,
            "image" => self.image,
            "command" => vec![command.to_string()],
            "args" => args,
        };
        if output {
            c.push("workingDir", OUTPUT_DIR);
            env.push(map! { "name" => "HF_HOME", "value" => format!("{OUTPUT_DIR}/huggingface") });
            env.push(
                map! { "name" => "SANA_RL_DATA", "value" => format!("{OUTPUT_DIR}/datasets") },
            );
            mounts.push(map! { "name" => "output", "mountPath" => OUTPUT_DIR });
        }
        if !env.is_empty() {
            c.push("env", env);
        }
        c.push("envFrom", self.secret_env_from());
        c.push("volumeMounts", mounts);
        c
    }

    fn deployment(&self, suffix: &str, component: &str, container: Y, volumes: Vec<Y>) -> Y {
        let mut pod = map! { "containers" => vec![container] };
        if !volumes.is_empty() {
            pod.push("volumes", volumes);
        }
        map! {
            "apiVersion" => "apps/v1",
            "kind" => "Deployment",
            "metadata" => self.meta(suffix, component),
            "spec" => map! {
                "replicas" => 1usize,
                "selector" => map! { "matchLabels" => self.selector(component) },
                "template" => map! {
                    "metadata" => map! { "labels" => self.labels(component) },
                    "spec" => pod,
                },
            },
        }
    }

    fn service(&self, suffix: &str, component: &str, port: u16, port_name: &str) -> Y {
        map! {
            "apiVersion" => "v1",
            "kind" => "Service",
            "metadata" => self.meta(suffix, component),
            "spec" => map! {
                "selector" => self.selector(component),
                "ports" => vec![map! { "name" => port_name, "port" => port, "targetPort" => port }],
            },
        }
    }

    /// An Indexed Job of `n` worker pods (`<prefix>-<suffix>-<index>` under
    /// the headless `<prefix>-workers`), RANK = the completion index.
    fn worker_job(&self, suffix: &str, n: usize, mut container: Y, ports: Vec<Y>) -> Y {
        container.push("ports", ports);
        container.push(
            "resources",
            map! { "limits" => map! { "nvidia.com/gpu" => 1usize } },
        );
        let mut labels = self.labels(suffix);
        labels.push(ROLE_LABEL, "worker");
        map! {
            "apiVersion" => "batch/v1",
            "kind" => "Job",
            "metadata" => self.meta(suffix, suffix),
            "spec" => map! {
                "completionMode" => "Indexed",
                "completions" => n,
                "parallelism" => n,
                "backoffLimit" => 0usize,
                "template" => map! {
                    "metadata" => map! { "labels" => labels },
                    "spec" => map! {
                        "subdomain" => self.name("workers"),
                        "restartPolicy" => "Never",
                        "containers" => vec![container],
                        "volumes" => vec![self.config_volume(), self.output_volume()],
                    },
                },
            },
        }
    }

    /// `<prefix>-<job>-<index>.<prefix>-workers:<port>`: a worker pod's stable address.
    fn worker_addr(&self, job: &str, index: usize, port: u16) -> String {
        format!("{}-{index}.{}:{port}", self.name(job), self.name("workers"))
    }
}

fn rank_env() -> Y {
    map! {
        "name" => "RANK",
        "valueFrom" => map! {
            "fieldRef" => map! {
                "fieldPath" => "metadata.annotations['batch.kubernetes.io/job-completion-index']",
            },
        },
    }
}

fn tcp_probe(port: u16) -> Y {
    map! {
        "tcpSocket" => map! { "port" => port },
        "periodSeconds" => 5usize,
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The run of `c` / `plan` as Kubernetes objects; `config_text` is the config
/// file as written (the ConfigMap carries it), `image` overrides [`default_image`].
pub fn render(
    c: &RunConfig,
    plan: &Plan,
    config_text: &str,
    image: Option<&str>,
) -> anyhow::Result<Rendered> {
    let image = image.map(str::to_string).unwrap_or_else(default_image);
    if image.is_empty()
        || image
            .chars()
            .any(|ch| ch.is_whitespace() || ch.is_control())
    {
        bail!("--image {image:?}: not an image reference");
    }
    let x = Ctx {
        prefix: name_prefix(c, &plan.config_path),
        image: &image,
    };
    let nft = plan.kind == RunKind::Nft;
    let ranks = policy_ranks(c);
    let rollouts = if nft { plan.rollout_workers.max(1) } else { 0 };
    let embedded = nft && matches!(plan.rewards, RewardSetup::Embedded);
    let run_dir = format!("{OUTPUT_DIR}/{}", x.prefix);
    let config_file = format!("{CONFIG_DIR}/config.toml");
    let mut warnings = Vec::new();
    let mut objects: Vec<(String, Y)> = Vec::new();
    let mut add = |file: &str, y: Y| objects.push((file.to_string(), y));

    // The run config as written, and the reward-service's own config.
    let mut data = map! { "config.toml" => config_text };
    if embedded {
        data.push(
            "rewards.toml",
            format!(
                "# reward-service: the embedded JPEG rewards, scores in the {0} Redis.\n\
                 host = \"0.0.0.0\"\nport = {REWARD_SERVICE_PORT}\n\
                 redis_host = \"{0}\"\nredis_port = {REDIS_PORT}\n{1}",
                x.name("redis"),
                EMBEDDED_REWARDS
                    .iter()
                    .map(|r| format!("\n[[reward_args]]\nreward_type = \"{r}\"\n"))
                    .collect::<String>()
            ),
        );
    }
    add(
        "00-config-configmap.yaml",
        map! {
            "apiVersion" => "v1",
            "kind" => "ConfigMap",
            "metadata" => x.meta("config", "config"),
            "data" => data,
        },
    );
    add(
        "01-secrets-secret.yaml",
        map! {
            "apiVersion" => "v1",
            "kind" => "Secret",
            "metadata" => x.meta("secrets", "config"),
            "type" => "Opaque",
            "stringData" => Y::Map(SECRET_KEYS.iter().map(|k| (k.to_string(), Y::from(""))).collect()),
        },
    );
    add(
        "02-output-persistentvolumeclaim.yaml",
        map! {
            "apiVersion" => "v1",
            "kind" => "PersistentVolumeClaim",
            "metadata" => x.meta("output", "output"),
            "spec" => map! {
                "accessModes" => strings(&["ReadWriteMany"]),
                "resources" => map! { "requests" => map! { "storage" => "100Gi" } },
            },
        },
    );

    if embedded {
        let mut redis = map! {
            "name" => "redis",
            "image" => REDIS_IMAGE,
            "ports" => vec![map! { "name" => "redis", "containerPort" => REDIS_PORT }],
        };
        redis.push("readinessProbe", tcp_probe(REDIS_PORT));
        add(
            "10-redis-deployment.yaml",
            x.deployment("redis", "redis", redis, vec![]),
        );
        add(
            "11-redis-service.yaml",
            x.service("redis", "redis", REDIS_PORT, "redis"),
        );

        let mut svc = x.container(
            "reward-service",
            vec![
                "--config".into(),
                format!("{CONFIG_DIR}/rewards.toml"),
                "--host".into(),
                "0.0.0.0".into(),
                "--port".into(),
                REWARD_SERVICE_PORT.to_string(),
            ],
            vec![map! {
                "name" => "REWARD_SERVICE_TOKEN",
                "valueFrom" => map! {
                    "secretKeyRef" => map! {
                        "name" => x.name("secrets"),
                        "key" => "REMOTE_REWARD_TOKEN",
                        "optional" => true,
                    },
                },
            }],
            false,
        );
        svc.push(
            "ports",
            vec![map! { "name" => "http", "containerPort" => REWARD_SERVICE_PORT }],
        );
        svc.push("readinessProbe", tcp_probe(REWARD_SERVICE_PORT));
        add(
            "12-reward-service-deployment.yaml",
            x.deployment(
                "reward-service",
                "reward-service",
                svc,
                vec![x.config_volume()],
            ),
        );
        add(
            "13-reward-service-service.yaml",
            x.service(
                "reward-service",
                "reward-service",
                REWARD_SERVICE_PORT,
                "http",
            ),
        );
    }

    if nft {
        let (enqueue, fetch) = match &plan.rewards {
            RewardSetup::External { enqueue, fetch } => {
                if [enqueue, fetch]
                    .iter()
                    .any(|u| u.contains("://localhost") || u.contains("://127."))
                {
                    warnings.push(format!(
                        "REMOTE_REWARD_ENQUEUE_URL / _FETCH_URL ({enqueue}, {fetch}) name this machine, \
                         which the reward-gateway pod cannot reach"
                    ));
                }
                (enqueue.clone(), fetch.clone())
            }
            RewardSetup::Embedded => {
                let base = format!("http://{}:{REWARD_SERVICE_PORT}", x.name("reward-service"));
                for f in &c.train.train_policy.remote_reward.reward_fns {
                    if !EMBEDDED_REWARDS.contains(&f.name.as_str()) {
                        warnings.push(format!(
                            "reward {:?} is not one of the rendered reward-service's ({}): set \
                             REMOTE_REWARD_ENQUEUE_URL / REMOTE_REWARD_FETCH_URL to Cosmos-RL's reward \
                             service when rendering, and REMOTE_REWARD_TOKEN in the Secret",
                            f.name,
                            EMBEDDED_REWARDS.join(", ")
                        ));
                    }
                }
                (
                    format!("{base}/api/reward/enqueue"),
                    format!("{base}/api/reward/pull"),
                )
            }
        };
        let mut gw = x.container(
            "reward-gateway",
            vec![
                "--config".into(),
                config_file.clone(),
                "--listen".into(),
                format!("0.0.0.0:{GATEWAY_PORT}"),
            ],
            vec![
                map! { "name" => "REMOTE_REWARD_ENQUEUE_URL", "value" => enqueue },
                map! { "name" => "REMOTE_REWARD_FETCH_URL", "value" => fetch },
            ],
            false,
        );
        gw.push(
            "ports",
            vec![map! { "name" => "grpc", "containerPort" => GATEWAY_PORT }],
        );
        gw.push("readinessProbe", tcp_probe(GATEWAY_PORT));
        add(
            "14-reward-gateway-deployment.yaml",
            x.deployment(
                "reward-gateway",
                "reward-gateway",
                gw,
                vec![x.config_volume()],
            ),
        );
        add(
            "15-reward-gateway-service.yaml",
            x.service("reward-gateway", "reward-gateway", GATEWAY_PORT, "grpc"),
        );
    }

    add(
        "20-workers-service.yaml",
        map! {
            "apiVersion" => "v1",
            "kind" => "Service",
            "metadata" => x.meta("workers", "workers"),
            "spec" => map! {
                "clusterIP" => "None",
                // Peers resolve each other before they are Ready (rendezvous).
                "publishNotReadyAddresses" => true,
                "selector" => map! {
                    "app.kubernetes.io/instance" => &x.prefix,
                    ROLE_LABEL => "worker",
                },
                "ports" => vec![
                    map! { "name" => "grpc", "port" => WORKER_PORT, "targetPort" => WORKER_PORT },
                    map! { "name" => "rendezvous", "port" => RENDEZVOUS_PORT, "targetPort" => RENDEZVOUS_PORT },
                ],
            },
        },
    );

    if plan.total_steps == 0 {
        warnings.push(
            "the number of training steps is unknown here (the training data is not readable where \
             this renders): the policy workers get --total-steps 0, a one-step LR schedule; render \
             where the data is, or set train.max_num_steps"
                .into(),
        );
    }
    let policy = x.container(
        "policy-worker",
        vec![
            "--config".into(),
            config_file.clone(),
            "--listen".into(),
            format!("0.0.0.0:{WORKER_PORT}"),
            "--device".into(),
            "cuda:0".into(),
            "--rank".into(),
            "$(RANK)".into(),
            "--world-size".into(),
            ranks.to_string(),
            "--master".into(),
            x.worker_addr("policy", 0, RENDEZVOUS_PORT),
            "--total-steps".into(),
            plan.total_steps.to_string(),
            "--output-dir".into(),
            run_dir.clone(),
        ],
        vec![rank_env()],
        true,
    );
    add(
        "21-policy-job.yaml",
        x.worker_job(
            "policy",
            ranks,
            policy,
            vec![
                map! { "name" => "grpc", "containerPort" => WORKER_PORT },
                map! { "name" => "rendezvous", "containerPort" => RENDEZVOUS_PORT },
            ],
        ),
    );

    if rollouts > 0 {
        let rollout = x.container(
            "rollout-worker",
            vec![
                "--config".into(),
                config_file.clone(),
                "--listen".into(),
                format!("0.0.0.0:{WORKER_PORT}"),
                "--rank".into(),
                "$(RANK)".into(),
                "--device".into(),
                "cuda:0".into(),
                "--gateway".into(),
                format!("http://{}:{GATEWAY_PORT}", x.name("reward-gateway")),
                "--run-id".into(),
                x.prefix.clone(),
            ],
            vec![rank_env()],
            true,
        );
        add(
            "22-rollout-job.yaml",
            x.worker_job(
                "rollout",
                rollouts,
                rollout,
                vec![map! { "name" => "grpc", "containerPort" => WORKER_PORT }],
            ),
        );
    }

    let mut args = vec!["--config".to_string(), config_file];
    for r in 0..ranks {
        args.push("--attach-policy".into());
        args.push(x.worker_addr("policy", r, WORKER_PORT));
    }
    for r in 0..rollouts {
        args.push("--attach-rollout".into());
        args.push(x.worker_addr("rollout", r, WORKER_PORT));
    }
    args.push("--run-dir".into());
    args.push(run_dir);
    let controller = x.container("controller", args, vec![], true);
    add(
        "30-controller-job.yaml",
        map! {
            "apiVersion" => "batch/v1",
            "kind" => "Job",
            "metadata" => x.meta("controller", "controller"),
            "spec" => map! {
                "backoffLimit" => 0usize,
                "template" => map! {
                    "metadata" => map! { "labels" => x.labels("controller") },
                    "spec" => map! {
                        "restartPolicy" => "Never",
                        "containers" => vec![controller],
                        "volumes" => vec![x.config_volume(), x.output_volume()],
                    },
                },
            },
        },
    );

    Ok(Rendered {
        prefix: x.prefix,
        objects,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn rendered_with(rel: &str, edit: impl Fn(&mut RunConfig)) -> Rendered {
        let path = repo().join(rel);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut c = sana::config::load_str(&text, &path, true).unwrap().config;
        edit(&mut c);
        let mut plan = Plan::new(&c, &path, &repo(), vec!["cpu".into()]).unwrap();
        // The reward setup follows REMOTE_REWARD_* of the environment; these
        // tests want the embedded one whatever the environment says.
        plan.rewards = RewardSetup::Embedded;
        render(&c, &plan, &text, None).unwrap()
    }

    fn rendered(rel: &str) -> Rendered {
        rendered_with(rel, |_| {})
    }

    fn kinds(r: &Rendered) -> Vec<(String, String)> {
        r.objects
            .iter()
            .map(|(_, o)| {
                (
                    o.get("kind").and_then(Y::as_str).unwrap().to_string(),
                    o.at(&["metadata", "name"])
                        .and_then(Y::as_str)
                        .unwrap()
                        .to_string(),
                )
            })
            .collect()
    }

    fn is_dns_1035(s: &str) -> bool {
        s.len() <= 63
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && !s.ends_with('-')
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    }

    fn args(job: &Y) -> Vec<&str> {
        job.at(&["spec", "template", "spec", "containers", "0", "args"])
            .unwrap()
            .as_seq()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect()
    }

    #[test]
    fn nft_renders_every_piece_with_dns_names() {
        let r = rendered("configs/demo/tiny-image-nft.toml");
        assert_eq!(r.prefix, "tiny-image-nft");
        let k = kinds(&r);
        let count = |kind: &str| k.iter().filter(|(x, _)| x == kind).count();
        assert_eq!(k.len(), 13, "{k:?}");
        assert_eq!(count("ConfigMap"), 1);
        assert_eq!(count("Secret"), 1);
        assert_eq!(count("PersistentVolumeClaim"), 1);
        assert_eq!(count("Deployment"), 3);
        assert_eq!(count("Service"), 4);
        assert_eq!(count("Job"), 3);
        for (kind, name) in &k {
            assert!(is_dns_1035(name), "{kind} {name}");
            assert!(name.starts_with("tiny-image-nft-"), "{name}");
        }
        let files: std::collections::BTreeSet<_> = r.objects.iter().map(|(f, _)| f).collect();
        assert_eq!(files.len(), r.objects.len(), "file names are unique");
        for (_, o) in &r.objects {
            assert_eq!(
                o.at(&["metadata", "labels", PART_OF.0]).and_then(Y::as_str),
                Some(PART_OF.1)
            );
        }
        let cm = r.find("ConfigMap", "config").unwrap();
        let text =
            std::fs::read_to_string(repo().join("configs/demo/tiny-image-nft.toml")).unwrap();
        assert_eq!(
            cm.at(&["data", "config.toml"]).and_then(Y::as_str),
            Some(text.as_str())
        );
        let rewards = cm
            .at(&["data", "rewards.toml"])
            .and_then(Y::as_str)
            .unwrap();
        assert!(
            rewards.contains("redis_host = \"tiny-image-nft-redis\""),
            "{rewards}"
        );
        let gw = r.find("Deployment", "reward-gateway").unwrap();
        let env = gw
            .at(&["spec", "template", "spec", "containers", "0", "env"])
            .unwrap()
            .to_yaml();
        assert!(
            env.contains("http://tiny-image-nft-reward-service:8080/api/reward/enqueue"),
            "{env}"
        );
        assert!(
            env.contains("http://tiny-image-nft-reward-service:8080/api/reward/pull"),
            "{env}"
        );
        let rollout = r.find("Job", "rollout").unwrap();
        assert!(args(rollout).contains(&"http://tiny-image-nft-reward-gateway:50060"));
        let ctl = args(r.find("Job", "controller").unwrap());
        assert_eq!(ctl.iter().filter(|a| **a == "--attach-rollout").count(), 1);
        assert!(ctl.contains(&"tiny-image-nft-rollout-0.tiny-image-nft-workers:50051"));
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    }

    #[test]
    fn policy_completions_equal_the_dp_world_size() {
        for (replicate, shard, want) in [(1, 1, 1), (1, 8, 8), (2, 4, 8), (3, -1, 3), (0, 2, 1)] {
            let r = rendered_with("configs/demo/tiny-image-nft.toml", |c| {
                c.policy.parallelism.dp_replicate_size = replicate;
                c.policy.parallelism.dp_shard_size = shard;
            });
            let job = r.find("Job", "policy").unwrap();
            for k in ["completions", "parallelism"] {
                assert_eq!(
                    job.at(&["spec", k]).and_then(Y::as_int),
                    Some(want as i64),
                    "{replicate}×{shard}: {k}"
                );
            }
            assert_eq!(
                job.at(&["spec", "completionMode"]).and_then(Y::as_str),
                Some("Indexed")
            );
            let a = args(job);
            let ws = a.iter().position(|x| *x == "--world-size").unwrap();
            assert_eq!(a[ws + 1], want.to_string());
            let ctl = args(r.find("Job", "controller").unwrap());
            let attached: Vec<_> = ctl
                .windows(2)
                .filter(|w| w[0] == "--attach-policy")
                .map(|w| w[1])
                .collect();
            let expected: Vec<String> = (0..want)
                .map(|i| format!("tiny-image-nft-policy-{i}.tiny-image-nft-workers:50051"))
                .collect();
            assert_eq!(attached, expected);
        }
    }

    #[test]
    fn sft_has_no_rollouts_and_no_reward_pieces() {
        let r = rendered("configs/demo/tiny-image-sft.toml");
        let k = kinds(&r);
        assert!(r.find("Job", "rollout").is_none(), "{k:?}");
        for name in ["redis", "reward-service", "reward-gateway"] {
            assert!(
                k.iter()
                    .all(|(_, n)| *n != format!("tiny-image-sft-{name}")),
                "{k:?}"
            );
        }
        assert_eq!(k.len(), 6, "{k:?}");
        let ctl = args(r.find("Job", "controller").unwrap());
        assert!(!ctl.contains(&"--attach-rollout"), "{ctl:?}");
        let cm = r.find("ConfigMap", "config").unwrap();
        assert!(cm.at(&["data", "rewards.toml"]).is_none());
    }

    #[test]
    fn external_rewards_skip_redis_and_the_reward_service() {
        let path = repo().join("configs/demo/tiny-image-nft.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let c = sana::config::load_str(&text, &path, true).unwrap().config;
        let mut plan = Plan::new(&c, &path, &repo(), vec!["cpu".into()]).unwrap();
        plan.rewards = RewardSetup::External {
            enqueue: "https://rewards.example/api/reward/enqueue".into(),
            fetch: "https://rewards.example/api/reward/pull".into(),
        };
        let r = render(&c, &plan, &text, Some("registry.example/sana:dev")).unwrap();
        assert!(r.find("Deployment", "redis").is_none());
        assert!(r.find("Deployment", "reward-service").is_none());
        let gw = r.find("Deployment", "reward-gateway").unwrap();
        assert!(gw
            .to_yaml()
            .contains("value: https://rewards.example/api/reward/enqueue"));
        assert!(r.yaml().contains("image: registry.example/sana:dev"));
        assert!(!r.yaml().contains(&default_image()));
    }

    #[test]
    fn sana_preset_names_come_from_the_file_stem() {
        let r = rendered("configs/sana/sana-image-nft.toml");
        assert_eq!(r.prefix, "sana-image-nft");
        assert_eq!(
            r.find("Job", "policy")
                .unwrap()
                .at(&["spec", "completions"])
                .and_then(Y::as_int),
            Some(8)
        );
        // pickscore needs Cosmos-RL's reward service.
        assert!(
            r.warnings.iter().any(|w| w.contains("pickscore")),
            "{:?}",
            r.warnings
        );
    }

    #[test]
    fn dns_labels() {
        assert_eq!(dns_label("Sana_Image NFT!!v2", 40), "sana-image-nft-v2");
        assert_eq!(dns_label("123", 40), "run-123");
        assert_eq!(dns_label("", 40), "run");
        assert_eq!(dns_label("--a--", 40), "a");
        let long = dns_label(&"x-".repeat(50), MAX_PREFIX);
        assert!(long.len() <= MAX_PREFIX && !long.ends_with('-'), "{long}");
    }

    #[test]
    fn yaml_writer_layout_and_quoting() {
        let y = map! {
            "apiVersion" => "v1",
            "plain" => vec![
                "--config".to_string(), "cuda:0".into(), "redis:7".into(),
                "http://a-b:50060/x".into(), "/etc/sana-rl/config.toml".into(),
            ],
            "quoted" => vec![
                String::new(), "true".into(), "No".into(), "0.0.0.0:50051".into(), "100Gi".into(),
                "-1".into(), "1:30".into(), "a: b".into(), "#x".into(), "$(RANK)".into(),
                "x:".into(), "say \"hi\"\\".into(), "bell\u{7}".into(), ".5".into(),
            ],
            "n" => 3usize,
            "b" => false,
            "empty" => Y::Map(vec![]),
            "none" => Y::Seq(vec![]),
            "items" => vec![
                map! { "name" => "a", "nested" => map! { "k" => "v" }, "list" => vec!["x".to_string()] },
                Y::Seq(vec![Y::from("inner")]),
            ],
            "text" => "line one\n\n  indented\nlast\n",
            "no-newline" => "a\nb",
            "lead-space" => " a\nb\n",
        };
        let want = r##"apiVersion: v1
plain:
- --config
- cuda:0
- redis:7
- http://a-b:50060/x
- /etc/sana-rl/config.toml
quoted:
- ""
- "true"
- "No"
- "0.0.0.0:50051"
- "100Gi"
- "-1"
- "1:30"
- "a: b"
- "#x"
- "$(RANK)"
- "x:"
- "say \"hi\"\\"
- "bell\u0007"
- ".5"
"n": 3
b: false
empty: {}
none: []
items:
- name: a
  nested:
    k: v
  list:
  - x
-
  - inner
text: |
  line one

    indented
  last
no-newline: |-
  a
  b
lead-space: " a\nb\n"
"##;
        assert_eq!(y.to_yaml(), want);
    }
}
