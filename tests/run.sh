#!/usr/bin/env bash
# README's test command: installs what a fresh Debian lacks, then runs the whole test suite.
# Run as root: the kernel, data-path and end-to-end tests create network namespaces.
# Extra arguments go to `cargo test --release` (e.g. `--test e2e`).
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
if [ "${#missing[@]}" -gt 0 ]; then
    echo "tests/run.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
nft --version

# Namespaces of an earlier run that was killed (its guards never ran): their names carry
# the test process's pid, so only those of processes that are gone are removed.
for ns in $(ip netns list | awk '/^kpf[0-9]+-/ {print $1}'); do
    pid=${ns#kpf}
    pid=${pid%%-*}
    if ! kill -0 "$pid" 2>/dev/null; then
        ip netns del "$ns" && echo "tests/run.sh: removed $ns, left by a killed run"
    fi
done

exec cargo test --release "$@"
