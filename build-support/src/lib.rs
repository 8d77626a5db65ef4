//! Shared by the build scripts of every crate that links libtorch.
//!
//! torch-sys (`links = "tch"`) exports the libtorch lib dir as `DEP_TCH_LIBTORCH_LIB` to
//! crates that depend on it directly, but its own link arguments do not reach
//! downstream binaries. So each binary crate calls [`link_libtorch`] to:
//! - add an rpath, so binaries run without `LD_LIBRARY_PATH`;
//! - keep `libtorch_cuda` as a `DT_NEEDED` entry (`--no-as-needed`): nothing
//!   references its symbols directly, and without it CUDA silently reports
//!   "unavailable" on GPU machines.

use std::path::PathBuf;

/// Emits the link arguments. Call from `build.rs` of a crate that lists
/// `torch-sys` among its direct dependencies.
pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") else {
        println!(
            "cargo:warning=DEP_TCH_LIBTORCH_LIB is unset: add torch-sys as a direct dependency"
        );
        return;
    };
    let dir = PathBuf::from(dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    if dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
