#!/usr/bin/env bash
# README's test command: installs what a fresh Debian lacks, then runs the whole test suite.
# Run as root: the kernel, data-path and end-to-end tests create network namespaces.
# Extra arguments go to `cargo test --release` (e.g. `--test e2e`), and only that part runs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "tests/run.sh: run as root (the tests create network namespaces and nftables tables)" >&2
    exit 1
fi

missing=()
command -v nft >/dev/null || missing+=(nftables)
command -v ip >/dev/null || missing+=(iproute2)
command -v sysctl >/dev/null || missing+=(procps)
# The package test checks the shipped shell scripts with it, and verifies the unit with
# systemd-analyze (the systemd package only installs here; nothing is started).
command -v shellcheck >/dev/null || missing+=(shellcheck)
command -v systemd-analyze >/dev/null || missing+=(systemd)
# The double-NAT tests run a real UPnP IGD (miniupnpd, nftables flavour) as the ISP's box.
command -v miniupnpd >/dev/null || missing+=(miniupnpd-nftables)
# The LuCI browser test (tests/luci.rs): headless Chromium driven by selenium from a venv,
# and what the LuCI test rig (../shared/luci-rig) needs to unpack and start.
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
# A font, or the screenshots show boxes for letters (recommends are not installed).
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v curl >/dev/null || missing+=(curl)
command -v zstd >/dev/null || missing+=(zstd)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "tests/run.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
nft --version
if ! target/luci-venv/bin/python -c 'import selenium' 2>/dev/null; then
    echo "tests/run.sh: installing selenium into target/luci-venv"
    python3 -m venv target/luci-venv
    target/luci-venv/bin/pip install --quiet selenium
fi

# Namespaces of an earlier run that was killed (its guards never ran): their names carry
# the test process's pid, so only those of processes that are gone are removed.
for ns in $(ip netns list | awk '/^kpf[0-9]+-/ {print $1}'); do
    pid=${ns#kpf}
    pid=${pid%%-*}
    if ! kill -0 "$pid" 2>/dev/null; then
        ip netns del "$ns" && echo "tests/run.sh: removed $ns, left by a killed run"
    fi
done

# Extra arguments: that part of the suite only.
if [ $# -gt 0 ]; then
    exec cargo test --release "$@"
fi
cargo test --release

# The router builds: one foreign CPU built as a user's package is (big-endian MIPS, the
# CPU least like this one), its plan and host-name lookups checked against the native build
# under qemu-user (tests/cross.rs), and the unit tests run on emulated aarch64 and MIPS.
# The toolchain comes from the registries (openwrt-pkg/cross-toolchain.sh).
builds=target/openwrt-ci
openwrt-pkg/build-all.sh --arch mips_24kc "$builds"
KPF_ROUTER_BUILDS=$builds cargo test --release --test cross -- --ignored
(
    eval "$(openwrt-pkg/cross-toolchain.sh)"
    export CARGO_TARGET_DIR=target/cross/build
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUNNER=qemu-aarch64-static
    export CARGO_TARGET_MIPS_UNKNOWN_LINUX_MUSL_RUNNER=qemu-mips-static
    # build-all.sh's flags but those that drop unwinding: the test harness catches panics.
    export RUSTFLAGS="-C link-self-contained=no -C target-feature=+crt-static"
    for triple in aarch64-unknown-linux-musl mips-unknown-linux-musl; do
        echo "tests/run.sh: unit tests on $triple under qemu-user"
        cargo-zigbuild test --locked --lib --target "$triple" -Zbuild-std
    done
)
