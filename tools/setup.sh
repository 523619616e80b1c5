#!/usr/bin/env bash
# Installs the Debian 12 packages jobengine builds with, when missing.
# Usage: tools/setup.sh [--release]
#   (as your usual user: it runs apt-get through sudo when not root; as root
#   where there is no sudo)
#   --release  only what the release preset needs (tools/run.sh: the demo):
#              no clang, qemu, ARM cross compiler or gnuplot
# Idempotent: asks apt only for what dpkg does not already have.
set -euo pipefail

release_only=false
case "${1:-}" in
  "") ;;
  --release) release_only=true ;;
  *) echo "usage: tools/setup.sh [--release]" >&2; exit 64 ;;
esac

# What configuring and building the release preset needs (every target).
packages=(
  build-essential cmake ninja-build pkg-config
  libconcurrentqueue-dev   # moodycamel::ConcurrentQueue (the job queues)
  libxxhash-dev            # XXH3 checksums of snapshots
  libboost-dev             # Boost headers (Interprocess, asio baseline)
  libgtest-dev             # GoogleTest
  libbenchmark-dev         # Google Benchmark
  python3                  # tools/demo.sh's checks, bench/ratios.py, bench report
  libcli11-dev             # jobsnap's command line (CLI11)
  nlohmann-json3-dev       # jobsnap --json, metrics_json tests
  libtbb-dev               # oneTBB baseline in bench/
)
if ! $release_only; then
  packages+=(
    clang libclang-rt-14-dev # sanitizer presets (asan, tsan) and the fuzzers
    gnuplot-nox              # bench plots (PNG)
    googletest               # GoogleTest sources, built for aarch64 in the ARM run
    g++-aarch64-linux-gnu qemu-user  # ARM cross-build, run under qemu-user
  )
fi

missing=()
for p in "${packages[@]}"; do
  if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then sudo=(sudo); else
    echo "setup: need root (or sudo) to install: ${missing[*]}" >&2; exit 1
  fi
fi
echo "setup: installing ${missing[*]}"
# Through env, not export: sudo's env_reset would drop an exported variable.
apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get)
# Another apt or dpkg (a second setup, a fresh VM's unattended-upgrades) may
# hold the locks: wait for them (up to 10 minutes) instead of failing at once.
lock_wait=(-o DPkg::Lock::Timeout=600)
give_up=$((SECONDS + 900))
until "${apt[@]}" "${lock_wait[@]}" update -qq; do
  [ "$SECONDS" -lt "$give_up" ] || { echo "setup: apt-get update kept failing for 15 minutes" >&2; exit 1; }
  echo "setup: apt-get update failed (another apt running?); retrying in 10 s" >&2
  sleep 10
done
"${apt[@]}" "${lock_wait[@]}" install -y -qq --no-install-recommends "${missing[@]}"
