//! Compiles `src/shim.cpp` against the torch wheel's headers. Gloo's headers
//! come from Debian's libgloo-dev (scripts/env.sh installs it); NCCL is
//! compiled in when the wheel's nvidia packages provide nccl.h and the CUDA
//! headers, which torch's CUDA wheels always pull in.
use std::path::{Path, PathBuf};

fn main() {
    build_support::link_libtorch();
    println!("cargo:rerun-if-changed=src/shim.cpp");
    println!("cargo:rerun-if-env-changed=SANA_C10D_NO_NCCL");
    let lib = PathBuf::from(
        std::env::var_os("DEP_TCH_LIBTORCH_LIB")
            .expect("DEP_TCH_LIBTORCH_LIB (torch-sys) is unset: run through scripts/env.sh"),
    );
    let torch = lib.parent().expect("torch/lib has a parent").to_path_buf();
    let include = torch.join("include");
    let gloo = Path::new("/usr/include/gloo/config.h");
    if !gloo.exists() {
        panic!(
            "Gloo's headers are missing ({}): install Debian's libgloo-dev \
             (scripts/env.sh does)",
            gloo.display()
        );
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file("src/shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("USE_C10D_GLOO", None)
        // torch ≥ 2.7 wheels are built with the C++11 string ABI.
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        // Torch's headers are noisy under -Wall; the shim's own code is small.
        .warnings(false);

    let nvidia = torch.parent().map(|sp| sp.join("nvidia"));
    let nccl_dirs = nvidia.as_ref().map(|n| {
        [
            n.join("nccl/include"),
            n.join("cu13/include"),
            n.join("cu13/include/cccl"),
        ]
    });
    let with_nccl = std::env::var_os("SANA_C10D_NO_NCCL").is_none()
        && nccl_dirs.as_ref().is_some_and(|d| {
            d[0].join("nccl.h").exists()
                && d[1].join("crt/host_config.h").exists()
                && d[2].join("nv/target").exists()
        });
    if with_nccl {
        for d in nccl_dirs.iter().flatten() {
            build.include(d);
        }
        build
            .define("USE_C10D_NCCL", None)
            .define("SANA_C10D_NCCL", None);
    } else {
        println!(
            "cargo:warning=c10d: building without NCCL (nccl.h, crt/host_config.h or \
             nv/target missing under the torch wheel's nvidia/ packages)"
        );
    }
    build.compile("sana_c10d_shim");
}
