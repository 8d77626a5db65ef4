//! Training-state checkpoints: everything a run needs to continue bit for bit
//! (trainable weights, optimizer moments, EMA, the "old" adapter, step, seed,
//! data position), written so that a crash never costs the previous one.
//!
//! Layout: `<root>/step_<N>/{state.safetensors, trainer.json, manifest.json}`.
//! A checkpoint is written under `<root>/.step_<N>.tmp`, every file fsynced,
//! then the directory renamed into place and the root fsynced: a kill mid-write
//! leaves only the temporary directory, which is ignored and swept. The
//! manifest, written last, holds each file's size and CRC32, so a file cut
//! short or damaged after the rename (disk full, a copy interrupted) is caught
//! on resume and the previous checkpoint used instead, with a message naming
//! the file. `SaveMode::Async` copies the tensors to host memory and writes on
//! a background thread, so the step does not wait for the disk.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use safetensors::tensor::SafeTensors;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::safetensors_io::{self, to_host, HostTensor};
use crate::{Result, SanaError};

pub const STATE_FILE: &str = "state.safetensors";
pub const TRAINER_FILE: &str = "trainer.json";
pub const MANIFEST_FILE: &str = "manifest.json";
const FORMAT_VERSION: u32 = 1;

/// What a trainer hands over to be saved, and gets back on resume.
#[derive(Debug)]
pub struct TrainingState {
    /// Completed training steps.
    pub step: u64,
    /// Trainer scalars (optimizer step, seed, …) and the caller's data position.
    pub meta: serde_json::Value,
    /// Named tensors (`trained/…`, `exp_avg/…`, …), any device; saved as they are.
    pub tensors: Vec<(String, Tensor)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    step: u64,
    files: Vec<FileEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileEntry {
    name: String,
    bytes: u64,
    crc32: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct TrainerFile {
    format: u32,
    step: u64,
    meta: serde_json::Value,
}

fn ckpt_err(path: &Path, msg: impl Into<String>) -> SanaError {
    SanaError::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn crc_of_file(path: &Path) -> Result<(u64, u32)> {
    let mut f = File::open(path).map_err(|e| SanaError::io(path, e))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| SanaError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hasher.finalize()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| SanaError::io(path, e))?;
    f.write_all(bytes).map_err(|e| SanaError::io(path, e))?;
    f.sync_all().map_err(|e| SanaError::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SanaError::io(dir, e))
}

/// The directory name of step `n`'s checkpoint.
pub fn step_dir_name(step: u64) -> String {
    format!("step_{step}")
}

/// Writes one checkpoint atomically as `<root>/step_<N>` (see the module docs).
fn write_checkpoint(
    root: &Path,
    step: u64,
    meta: &serde_json::Value,
    host: &[HostTensor],
) -> Result<PathBuf> {
    let final_dir = root.join(step_dir_name(step));
    let tmp = root.join(format!(".{}.tmp", step_dir_name(step)));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| SanaError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| SanaError::io(&tmp, e))?;

    let state_path = tmp.join(STATE_FILE);
    let info = HashMap::from([("format".to_string(), "sana-rl-training-state".to_string())]);
    safetensors_io::write(&state_path, host, &info)?;

    let trainer = TrainerFile {
        format: FORMAT_VERSION,
        step,
        meta: meta.clone(),
    };
    let trainer_path = tmp.join(TRAINER_FILE);
    write_synced(
        &trainer_path,
        serde_json::to_string_pretty(&trainer)
            .expect("json")
            .as_bytes(),
    )?;

    let mut files = Vec::new();
    for name in [STATE_FILE, TRAINER_FILE] {
        let (bytes, crc32) = crc_of_file(&tmp.join(name))?;
        files.push(FileEntry {
            name: name.into(),
            bytes,
            crc32,
        });
    }
    let manifest = Manifest {
        format: FORMAT_VERSION,
        step,
        files,
    };
    write_synced(
        &tmp.join(MANIFEST_FILE),
        serde_json::to_string_pretty(&manifest)
            .expect("json")
            .as_bytes(),
    )?;
    sync_dir(&tmp)?;
    if final_dir.exists() {
        // Re-saving a step (e.g. the final save after a periodic one): replace it.
        std::fs::remove_dir_all(&final_dir).map_err(|e| SanaError::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| SanaError::io(&final_dir, e))?;
    sync_dir(root)?;
    Ok(final_dir)
}

/// Reads and verifies one checkpoint directory: every file present with the
/// size and CRC32 its manifest records; tensors loaded on the CPU.
pub fn read_checkpoint(dir: &Path) -> Result<TrainingState> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
        ckpt_err(
            dir,
            format!("no readable {MANIFEST_FILE} ({e}): the save did not finish"),
        )
    })?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| ckpt_err(&manifest_path, format!("unreadable: {e}")))?;
    if manifest.format != FORMAT_VERSION {
        return Err(ckpt_err(
            &manifest_path,
            format!(
                "format {} (this sana-rl reads format {FORMAT_VERSION})",
                manifest.format
            ),
        ));
    }
    for entry in &manifest.files {
        let path = dir.join(&entry.name);
        let (bytes, crc) = match crc_of_file(&path) {
            Ok(x) => x,
            Err(_) => return Err(ckpt_err(&path, "missing")),
        };
        if bytes != entry.bytes {
            return Err(ckpt_err(
                &path,
                format!(
                    "cut short or overwritten: {bytes} bytes, the manifest says {}",
                    entry.bytes
                ),
            ));
        }
        if crc != entry.crc32 {
            return Err(ckpt_err(
                &path,
                format!(
                    "corrupt: CRC32 {crc:08x}, the manifest says {:08x}",
                    entry.crc32
                ),
            ));
        }
    }
    let trainer_path = dir.join(TRAINER_FILE);
    let trainer: TrainerFile = serde_json::from_str(
        &std::fs::read_to_string(&trainer_path).map_err(|e| SanaError::io(&trainer_path, e))?,
    )
    .map_err(|e| ckpt_err(&trainer_path, format!("unreadable: {e}")))?;
    let state_path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&state_path).map_err(|e| SanaError::io(&state_path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| ckpt_err(&state_path, format!("unreadable: {e:?}")))?;
    let mut tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| Ok((n, Tensor::try_from(v)?)))
        .collect::<Result<Vec<_>>>()?;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(TrainingState {
        step: trainer.step,
        meta: trainer.meta,
        tensors,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SaveMode {
    /// Write before returning.
    Sync,
    /// Copy to host memory, write on a background thread (Cosmos-RL's `save_mode = "async"`).
    Async,
}

/// A checkpoint found on resume, and the newer ones passed over (with why).
#[derive(Debug)]
pub struct Resumed {
    pub path: PathBuf,
    pub state: TrainingState,
    pub skipped: Vec<(PathBuf, String)>,
}

/// Saves, prunes and finds the training checkpoints under one root.
#[derive(Debug)]
pub struct CheckpointManager {
    root: PathBuf,
    mode: SaveMode,
    /// Checkpoints kept (oldest removed first); 0 keeps all.
    max_keep: usize,
    pending: Option<JoinHandle<Result<PathBuf>>>,
}

impl CheckpointManager {
    pub fn new(root: impl Into<PathBuf>, mode: SaveMode, max_keep: usize) -> Self {
        Self {
            root: root.into(),
            mode,
            max_keep,
            pending: None,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Saves `state`; in async mode returns once the tensors are copied to host
    /// memory (after the previous save has finished).
    pub fn save(&mut self, state: &TrainingState) -> Result<()> {
        self.wait()?;
        std::fs::create_dir_all(&self.root).map_err(|e| SanaError::io(&self.root, e))?;
        let host = to_host(&state.tensors)?;
        let (root, step, meta, max_keep) = (
            self.root.clone(),
            state.step,
            state.meta.clone(),
            self.max_keep,
        );
        let job = move || -> Result<PathBuf> {
            let started = std::time::Instant::now();
            let dir = write_checkpoint(&root, step, &meta, &host)?;
            prune(&root, max_keep)?;
            tracing::info!(
                step,
                path = %dir.display(),
                secs = started.elapsed().as_secs_f64(),
                "checkpoint saved"
            );
            Ok(dir)
        };
        match self.mode {
            SaveMode::Sync => job().map(|_| ()),
            SaveMode::Async => {
                let handle = std::thread::Builder::new()
                    .name(format!("checkpoint-step-{step}"))
                    .spawn(job)
                    .map_err(|e| SanaError::io(&self.root, e))?;
                self.pending = Some(handle);
                Ok(())
            }
        }
    }

    /// Waits for an async save to finish; its error, if any.
    pub fn wait(&mut self) -> Result<Option<PathBuf>> {
        match self.pending.take() {
            None => Ok(None),
            Some(h) => match h.join() {
                Ok(r) => r.map(Some),
                Err(_) => Err(ckpt_err(
                    &self.root,
                    "the checkpoint writer thread panicked",
                )),
            },
        }
    }

    /// Committed checkpoints, newest first.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        list(&self.root)
    }

    /// The newest checkpoint that verifies; newer ones that do not are logged
    /// and listed in `skipped`. `None` when there is none at all.
    pub fn load_latest(&self) -> Result<Option<Resumed>> {
        let mut skipped = Vec::new();
        for (_, dir) in self.list()? {
            match read_checkpoint(&dir) {
                Ok(state) => {
                    return Ok(Some(Resumed {
                        path: dir,
                        state,
                        skipped,
                    }))
                }
                Err(e) => {
                    tracing::warn!("skipping checkpoint: {e}; trying the previous one");
                    skipped.push((dir, e.to_string()));
                }
            }
        }
        if let Some((dir, why)) = skipped.first() {
            return Err(ckpt_err(
                dir,
                format!("no usable checkpoint under {}: {why}", self.root.display()),
            ));
        }
        Ok(None)
    }
}

impl Drop for CheckpointManager {
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            tracing::error!("last checkpoint save failed: {e}");
        }
    }
}

fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SanaError::io(root, e)),
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step_")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    Ok(out)
}

/// Removes checkpoints beyond the newest `max_keep`, and temporary directories
/// left by a killed save.
fn prune(root: &Path, max_keep: usize) -> Result<()> {
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let in_flight = name.starts_with(".step_") && name.ends_with(".tmp");
            if in_flight {
                tracing::debug!(path = %e.path().display(), "removing an unfinished checkpoint");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if max_keep == 0 {
        return Ok(());
    }
    for (_, dir) in list(root)?.into_iter().skip(max_keep) {
        std::fs::remove_dir_all(&dir).map_err(|e| SanaError::io(&dir, e))?;
    }
    Ok(())
}

/// Takes the tensor called `name` out of a loaded state, checking its shape.
pub fn take_tensor(
    tensors: &mut HashMap<String, Tensor>,
    name: &str,
    like: &Tensor,
    source: &Path,
) -> Result<Tensor> {
    let t = tensors
        .remove(name)
        .ok_or_else(|| ckpt_err(source, format!("missing tensor `{name}`")))?;
    if t.size() != like.size() {
        return Err(ckpt_err(
            source,
            format!(
                "tensor `{name}` has shape {:?}, the model has {:?} (a different model or LoRA config?)",
                t.size(),
                like.size()
            ),
        ));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn state(step: u64) -> TrainingState {
        TrainingState {
            step,
            meta: serde_json::json!({"data": {"epoch": 1, "index": step * 4}}),
            tensors: vec![
                (
                    "a".into(),
                    Tensor::arange(1000, (Kind::Float, Device::Cpu)) * step as f64,
                ),
                (
                    "b".into(),
                    Tensor::ones([3, 4], (Kind::BFloat16, Device::Cpu)),
                ),
            ],
        }
    }

    #[test]
    fn save_load_prune_roundtrip_both_modes() {
        for mode in [SaveMode::Sync, SaveMode::Async] {
            let dir = tempfile::tempdir().unwrap();
            let mut m = CheckpointManager::new(dir.path(), mode, 2);
            for step in 1..=3 {
                m.save(&state(step)).unwrap();
            }
            m.wait().unwrap();
            let steps: Vec<u64> = m.list().unwrap().into_iter().map(|(s, _)| s).collect();
            assert_eq!(steps, vec![3, 2], "{mode:?}: keeps the newest 2");
            let r = m.load_latest().unwrap().unwrap();
            assert_eq!(r.state.step, 3);
            assert!(r.skipped.is_empty());
            assert_eq!(r.state.meta["data"]["index"], 12);
            assert_eq!(r.state.tensors[0].1, state(3).tensors[0].1);
            assert_eq!(r.state.tensors[1].1.kind(), Kind::BFloat16);
        }
    }

    #[test]
    fn a_checkpoint_cut_short_falls_back_to_the_previous() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = CheckpointManager::new(dir.path(), SaveMode::Sync, 0);
        m.save(&state(3)).unwrap();
        m.save(&state(4)).unwrap();
        let file = dir.path().join("step_4").join(STATE_FILE);
        let len = std::fs::metadata(&file).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.set_len(len / 2).unwrap();
        let r = m.load_latest().unwrap().unwrap();
        assert_eq!(r.state.step, 3);
        assert_eq!(r.skipped.len(), 1);
        let why = &r.skipped[0].1;
        assert!(
            why.contains("step_4/state.safetensors") && why.contains("cut short"),
            "{why}"
        );
    }

    #[test]
    fn corruption_and_an_unfinished_save_are_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = CheckpointManager::new(dir.path(), SaveMode::Sync, 0);
        m.save(&state(1)).unwrap();
        m.save(&state(2)).unwrap();
        // Flip one byte in the middle of step 2's tensors: same size, bad CRC.
        let file = dir.path().join("step_2").join(STATE_FILE);
        let mut bytes = std::fs::read(&file).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&file, bytes).unwrap();
        // A save killed before its rename: only the temporary directory exists.
        let tmp = dir.path().join(".step_3.tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join(STATE_FILE), b"partial").unwrap();
        let r = m.load_latest().unwrap().unwrap();
        assert_eq!(r.state.step, 1);
        assert!(r.skipped[0].1.contains("corrupt: CRC32"), "{:?}", r.skipped);
        // The next save sweeps the leftover.
        m.save(&state(5)).unwrap();
        assert!(!tmp.exists());
    }

    #[test]
    fn no_usable_checkpoint_is_an_error_naming_why() {
        let dir = tempfile::tempdir().unwrap();
        let m = CheckpointManager::new(dir.path(), SaveMode::Sync, 0);
        assert!(
            m.load_latest().unwrap().is_none(),
            "an empty root is a fresh start"
        );
        std::fs::create_dir_all(dir.path().join("step_7")).unwrap();
        let err = m.load_latest().unwrap_err().to_string();
        assert!(
            err.contains("step_7") && err.contains("did not finish"),
            "{err}"
        );
    }

    /// The child of `a_save_killed_mid_write_leaves_the_previous_usable`: saves
    /// 32 MB checkpoints in a loop until killed. Only runs when asked to.
    #[test]
    #[ignore = "run by a_save_killed_mid_write_leaves_the_previous_usable"]
    fn child_saves_until_killed() {
        let Some(root) = std::env::var_os("SANA_CKPT_CHILD_DIR") else {
            return;
        };
        let mut m = CheckpointManager::new(PathBuf::from(root), SaveMode::Sync, 0);
        for step in 1.. {
            let big = Tensor::full([8 << 20], step as f64, (Kind::Float, Device::Cpu));
            m.save(&TrainingState {
                step,
                meta: serde_json::json!({}),
                tensors: vec![("big".into(), big)],
            })
            .unwrap();
        }
    }

    /// A real SIGKILL while a checkpoint is being written: the newest committed
    /// checkpoint still verifies and loads, the half-written one is never used.
    #[test]
    fn a_save_killed_mid_write_leaves_the_previous_usable() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "training::checkpoint::tests::child_saves_until_killed",
                "--ignored",
            ])
            .env("SANA_CKPT_CHILD_DIR", dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait for a save in flight after at least one committed checkpoint.
        let started = std::time::Instant::now();
        let in_flight = loop {
            let committed = dir.path().join("step_1").exists();
            let tmp = std::fs::read_dir(dir.path()).ok().and_then(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .find(|n| n.starts_with(".step_") && n != ".step_1.tmp")
            });
            if let (true, Some(tmp)) = (committed, tmp) {
                child.kill().unwrap();
                break tmp;
            }
            assert!(
                started.elapsed().as_secs() < 60,
                "the child never started a second save"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        child.wait().unwrap();
        let killed_step: u64 = in_flight
            .trim_start_matches(".step_")
            .trim_end_matches(".tmp")
            .parse()
            .unwrap();
        let m = CheckpointManager::new(dir.path(), SaveMode::Sync, 0);
        let r = m.load_latest().unwrap().unwrap();
        assert!(r.state.step < killed_step || !dir.path().join(&in_flight).exists());
        let big = &r.state.tensors[0].1;
        assert_eq!(big.size(), vec![8 << 20]);
        assert_eq!(big.double_value(&[12345]), r.state.step as f64);
        eprintln!(
            "killed while writing step {killed_step}; resumed from step {}",
            r.state.step
        );
    }
}
