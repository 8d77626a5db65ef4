//! Where a run's workers go: processes on this machine, or job steps on the
//! nodes of the Slurm allocation the controller runs in (`srun`, one per
//! worker). Slurm itself does the placing, signalling and cleanup; this only
//! says which node and how the others reach it.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

/// `--launcher`: how workers start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Launcher {
    /// Slurm inside an allocation (`SLURM_JOB_ID` set), else local.
    #[default]
    Auto,
    /// Child processes of the controller.
    Local,
    /// `srun` job steps on the allocation's nodes.
    Slurm,
}

/// One node of the allocation: its Slurm name and the address others reach it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    Local,
    Slurm {
        job_id: String,
        nodes: Vec<Node>,
        /// The node the controller runs on (index into `nodes`, or its own address).
        here: Node,
        /// GPUs each step asks for (`SLURM_GPUS_ON_NODE`), none on CPU nodes.
        gpus_per_node: u32,
    },
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `NodeAddr=` of `scontrol -o show node NAME` (the name itself when absent).
pub fn parse_node_addr(show: &str, name: &str) -> String {
    show.split_whitespace()
        .find_map(|kv| kv.strip_prefix("NodeAddr="))
        .filter(|a| !a.is_empty() && *a != "(null)")
        .unwrap_or(name)
        .to_string()
}

impl Placement {
    pub fn detect(choice: Launcher) -> anyhow::Result<Self> {
        let job = std::env::var("SLURM_JOB_ID").ok();
        match (choice, job) {
            (Launcher::Local, _) | (Launcher::Auto, None) => Ok(Placement::Local),
            (Launcher::Slurm, None) => bail!(
                "--launcher slurm: SLURM_JOB_ID is unset; run the controller inside an \
                 allocation (sbatch deploy/slurm/sana-rl.sbatch, or salloc)"
            ),
            (_, Some(job_id)) => Self::slurm(job_id),
        }
    }

    fn slurm(job_id: String) -> anyhow::Result<Self> {
        let list = std::env::var("SLURM_JOB_NODELIST")
            .or_else(|_| std::env::var("SLURM_NODELIST"))
            .context("SLURM_JOB_NODELIST is unset inside a Slurm job")?;
        let names: Vec<String> = run(Command::new("scontrol").args(["show", "hostnames", &list]))
            .context("expanding SLURM_JOB_NODELIST")?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        if names.is_empty() {
            bail!("SLURM_JOB_NODELIST {list:?} names no node");
        }
        let node = |name: &str| -> anyhow::Result<Node> {
            let show = run(Command::new("scontrol").args(["-o", "show", "node", name]))?;
            Ok(Node {
                name: name.to_string(),
                addr: parse_node_addr(&show, name),
            })
        };
        let nodes = names
            .iter()
            .map(|n| node(n))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let here_name = std::env::var("SLURMD_NODENAME").unwrap_or_else(|_| names[0].clone());
        let here = match nodes.iter().find(|n| n.name == here_name) {
            Some(n) => n.clone(),
            None => node(&here_name)?,
        };
        let gpus_per_node = std::env::var("SLURM_GPUS_ON_NODE")
            .ok()
            .and_then(|g| g.trim().parse().ok())
            .unwrap_or(0);
        Ok(Placement::Slurm {
            job_id,
            nodes,
            here,
            gpus_per_node,
        })
    }

    pub fn nodes(&self) -> usize {
        match self {
            Placement::Local => 1,
            Placement::Slurm { nodes, .. } => nodes.len(),
        }
    }

    /// The node of worker `index` of `count`, spread evenly in order.
    pub fn node_of(&self, index: usize, count: usize) -> usize {
        index * self.nodes() / count.max(1)
    }

    /// `(listen, reach)` for a server on `node` at `port`: loopback locally;
    /// all interfaces and the node's address under Slurm.
    pub fn server_addr(&self, node: usize, port: u16) -> (String, String) {
        match self {
            Placement::Local => {
                let a = format!("127.0.0.1:{port}");
                (a.clone(), a)
            }
            Placement::Slurm { nodes, .. } => (
                format!("0.0.0.0:{port}"),
                format!("{}:{port}", nodes[node].addr),
            ),
        }
    }

    /// The address of `node` that peers reach (None locally: loopback suffices).
    pub fn node_addr(&self, node: usize) -> Option<String> {
        match self {
            Placement::Local => None,
            Placement::Slurm { nodes, .. } => Some(nodes[node].addr.clone()),
        }
    }

    /// `(listen, reach)` for a server the controller runs on its own node.
    pub fn local_server_addr(&self, port: u16) -> (String, String) {
        match self {
            Placement::Local => self.server_addr(0, port),
            Placement::Slurm { here, .. } => {
                (format!("0.0.0.0:{port}"), format!("{}:{port}", here.addr))
            }
        }
    }

    /// The command that runs `program` as worker `name` on `node`; the caller
    /// adds the program's arguments, environment and working directory, which
    /// srun carries to the step.
    pub fn command(&self, node: usize, name: &str, program: &Path) -> Command {
        match self {
            Placement::Local => Command::new(program),
            Placement::Slurm {
                nodes,
                gpus_per_node,
                ..
            } => {
                let mut c = Command::new("srun");
                c.args([
                    "--nodes=1",
                    "--ntasks=1",
                    "--overlap",
                    "--kill-on-bad-exit=1",
                ])
                .arg(format!("--nodelist={}", nodes[node].name))
                .arg(format!("--job-name={name}"))
                // Workers use every core of their node between them; no pinning to one.
                .args(["--cpu-bind=none", "--unbuffered"]);
                if *gpus_per_node > 0 {
                    c.arg(format!("--gres=gpu:{gpus_per_node}"));
                }
                c.arg(program);
                c
            }
        }
    }

    /// One line for the log and workers.json.
    pub fn describe(&self) -> String {
        match self {
            Placement::Local => "local processes".into(),
            Placement::Slurm { job_id, nodes, .. } => format!(
                "Slurm job {job_id}: srun steps on {}",
                nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slurm(n: usize) -> Placement {
        Placement::Slurm {
            job_id: "7".into(),
            nodes: (0..n)
                .map(|i| Node {
                    name: format!("gpu{i}"),
                    addr: format!("10.0.0.{i}"),
                })
                .collect(),
            here: Node {
                name: "gpu0".into(),
                addr: "10.0.0.0".into(),
            },
            gpus_per_node: 8,
        }
    }

    #[test]
    fn ranks_fill_nodes_in_order() {
        let p = slurm(2);
        let nodes: Vec<usize> = (0..16).map(|r| p.node_of(r, 16)).collect();
        assert_eq!(&nodes[..8], &[0; 8]);
        assert_eq!(&nodes[8..], &[1; 8]);
        assert_eq!(Placement::Local.node_of(5, 8), 0);
    }

    #[test]
    fn slurm_steps_run_on_their_node_and_listen_on_all_interfaces() {
        let p = slurm(2);
        let c = p.command(1, "policy-worker-9", Path::new("/opt/bin/policy-worker"));
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(c.get_program(), "srun");
        assert!(args.contains(&"--nodelist=gpu1".to_string()), "{args:?}");
        assert!(args.contains(&"--gres=gpu:8".to_string()), "{args:?}");
        assert_eq!(args.last().unwrap(), "/opt/bin/policy-worker");
        assert_eq!(
            p.server_addr(1, 5000),
            ("0.0.0.0:5000".into(), "10.0.0.1:5000".into())
        );
        assert_eq!(
            Placement::Local.server_addr(0, 5000),
            ("127.0.0.1:5000".into(), "127.0.0.1:5000".into())
        );
    }

    #[test]
    fn node_addresses_come_from_scontrol() {
        let show = "NodeName=vm Arch=x86_64 CoresPerSocket=1 NodeAddr=127.0.0.1 NodeHostName=vm";
        assert_eq!(parse_node_addr(show, "vm"), "127.0.0.1");
        assert_eq!(parse_node_addr("NodeName=a1", "a1"), "a1");
    }

    #[test]
    fn slurm_without_an_allocation_is_refused() {
        std::env::remove_var("SLURM_JOB_ID");
        let e = Placement::detect(Launcher::Slurm).unwrap_err().to_string();
        assert!(e.contains("SLURM_JOB_ID is unset"), "{e}");
        assert_eq!(Placement::detect(Launcher::Auto).unwrap(), Placement::Local);
    }
}
