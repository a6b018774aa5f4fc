#!/bin/sh
# Sets up what the router builds need, from the package registries alone, in one folder
# (default target/cross/toolchain) without touching the system's own Rust:
#   - Debian 12's rustc-web 1.96 with its matching standard-library source (rust-web-src):
#     rustup cannot add musl targets or rust-src here, so the standard library for each
#     router CPU is built from that source (-Zbuild-std);
#   - zig (PyPI `ziglang`) as linker and C compiler, which carries musl for every target,
#     driven by cargo-zigbuild (PyPI);
#   - qemu-user-static (Debian), which runs the foreign binaries for the tests.
# Prints the environment to source (`eval "$(openwrt-pkg/cross-toolchain.sh)"`).
#
#   openwrt-pkg/cross-toolchain.sh [DIR]
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$root/target/cross/toolchain}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

# The compiler and what it loads at run time, pinned so every build uses the same std source.
rust_version=1.96.0+dfsg1-1~deb12u2
debs="rustc-web=$rust_version cargo-web=$rust_version libstd-rust-web-1.96=$rust_version
libstd-rust-web-dev=$rust_version rust-web-src=$rust_version libllvm22 libgit2-1.5
libmbedtls14 libmbedcrypto7 libmbedx509-1 libhttp-parser2.9"
zig_version=0.17.1
zigbuild_version=0.24.1

say() { echo "cross-toolchain: $*" >&2; }

if [ ! -x "$dir/usr/bin/rustc" ] || ! grep -qx "$rust_version" "$dir/.rust-version" 2>/dev/null; then
	say "fetching Debian's rustc-web $rust_version"
	# apt-get download needs the suite's package lists; bookworm-security carries rustc-web.
	apt-cache show "rustc-web=$rust_version" >/dev/null 2>&1 || apt-get update -qq
	if ! apt-cache show "rustc-web=$rust_version" >/dev/null 2>&1; then
		say "rustc-web $rust_version is not in the package lists any more (a security update replaces it):"
		say "set rust_version in $0 to the version 'apt-cache policy rustc-web' offers, and the"
		say "libstd-rust-web-X.Y and libllvmN names to what 'apt-cache depends rustc-web' lists"
		exit 1
	fi
	debdir="$dir/debs"
	mkdir -p "$debdir"
	# shellcheck disable=SC2086 # the list is meant to split into words
	(cd "$debdir" && apt-get download -qq $debs)
	for deb in "$debdir"/*.deb; do
		dpkg-deb -x "$deb" "$dir"
	done
	rm -rf "$debdir"
	echo "$rust_version" > "$dir/.rust-version"
fi

if [ ! -x "$dir/venv/bin/cargo-zigbuild" ]; then
	say "installing ziglang $zig_version and cargo-zigbuild $zigbuild_version from PyPI"
	python3 -m venv "$dir/venv"
	"$dir/venv/bin/pip" install -q "ziglang==$zig_version" "cargo-zigbuild==$zigbuild_version"
fi

if ! command -v qemu-aarch64-static >/dev/null || ! command -v qemu-mips-static >/dev/null; then
	say "installing qemu-user-static"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -qq --no-install-recommends qemu-user-static >/dev/null 2>&1 || {
		apt-get update -qq
		apt-get install -y -qq --no-install-recommends qemu-user-static >/dev/null
	}
fi

lib=$dir/usr/lib/x86_64-linux-gnu
# A folder of its own for cargo's binaries, so `cargo` and `rustc` mean Debian's 1.96 there
# while the system's rustup toolchain stays first everywhere else.
cat <<ENV
export PATH="$dir/venv/bin:$dir/usr/bin:\$PATH"
export LD_LIBRARY_PATH="$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export RUSTC="$dir/usr/bin/rustc"
export CARGO="$dir/usr/bin/cargo"
export RUSTC_BOOTSTRAP=1
ENV
