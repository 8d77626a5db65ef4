# Sourced by the other scripts: makes sure the toolchain pieces exist (installing
# what is missing) and exports the environment tch's build needs.
#
# Installs into ${SANA_RL_CACHE:-~/.cache/sana-rl} (kept between runs, outside the clone):
#   venv/  Python venv with torch 2.11.0 (libtorch for tch) and diffusers 0.42.1
set -euo pipefail

SANA_RL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SANA_RL_CACHE="${SANA_RL_CACHE:-$HOME/.cache/sana-rl}"
export SANA_RL_ROOT SANA_RL_CACHE

log() { printf '\033[1m[sana-rl]\033[0m %s\n' "$*" >&2; }

# Debian packages: a C++ compiler for torch-sys' shim; pkg-config for -sys crates.
need_apt=()
command -v g++ >/dev/null || need_apt+=(g++)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v python3 >/dev/null || need_apt+=(python3 python3-venv)
# Rewards: redis-server keeps scores (embedded and in tests); cmake and nasm
# build the libjpeg-turbo that the `turbojpeg` crate vendors.
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v nasm >/dev/null || need_apt+=(nasm)
# Collectives (c10d/): torch's ProcessGroupGloo header includes Gloo's headers,
# which the torch wheel does not ship.
[ -f /usr/include/gloo/config.h ] || need_apt+=(libgloo-dev)
# The Slurm launcher's test runs a one-node cluster (scripts/slurm_cluster.sh).
command -v slurmctld >/dev/null || need_apt+=(slurm-wlm munge)
# FFmpeg 5.1's libraries for mp4 in/out (ffmpeg-next), and libclang for its bindgen.
pkg-config --exists libavformat libavcodec libswscale 2>/dev/null ||
    need_apt+=(libavformat-dev libavcodec-dev libavutil-dev libswscale-dev libswresample-dev)
[ -n "$(ls /usr/lib/llvm-*/lib/libclang.so* 2>/dev/null)" ] || need_apt+=(libclang-dev clang)
if ((${#need_apt[@]})); then
    log "installing Debian packages: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# The Python venv, rebuilt when scripts/requirements.txt changes.
VENV="$SANA_RL_CACHE/venv"
REQ="$SANA_RL_ROOT/scripts/requirements.txt"
STAMP="$VENV/.sana-rl-requirements"
if [ ! -x "$VENV/bin/python" ] || ! cmp -s "$REQ" "$STAMP"; then
    log "setting up the Python venv in $VENV (torch 2.11.0 is ~1 GB with its CUDA libraries; once)"
    mkdir -p "$SANA_RL_CACHE"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r "$REQ"
    cp "$REQ" "$STAMP"
fi

export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
# tch's build finds libtorch inside the venv's torch package.
export LIBTORCH_USE_PYTORCH=1
cd "$SANA_RL_ROOT"
