//! Helpers shared by the unit tests: locating the parity references that
//! `scripts/parity/make_reference.py` writes, and comparing tensors.

use std::path::PathBuf;

use tch::{Kind, Tensor};

/// The directory of one reference case (`$SANA_PARITY_DIR/<case>`, default
/// `target/parity/<case>`). `None` (after a note) when it is absent and
/// `SANA_PARITY_REQUIRED` is unset; a panic when it is required.
pub fn parity_case(case: &str) -> Option<PathBuf> {
    let root = std::env::var_os("SANA_PARITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/parity")));
    let dir = root.join(case);
    if dir.is_dir() {
        return Some(dir);
    }
    let msg = format!(
        "parity reference {} is missing: run `scripts/parity/make_reference.py {}` (the README's test command does)",
        dir.display(),
        root.display()
    );
    if std::env::var("SANA_PARITY_REQUIRED").is_ok_and(|v| v == "1") {
        panic!("{msg}");
    }
    eprintln!("skipping: {msg}");
    None
}

/// Tensors of a safetensors file by name.
pub fn load_named(path: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    let cpu = |t: &Tensor| t.to_device(tch::Device::Cpu).to_kind(Kind::Double);
    (cpu(a) - cpu(b)).abs().max().double_value(&[])
}
