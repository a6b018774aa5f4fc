#!/bin/sh
# What each crate costs in a router build: `cargo bloat --crates` of the release build with
# its symbols kept (profile `bloat`), for each Rust target given (default: every one
# build-all.sh makes). Links with the same zig wrappers cargo-zigbuild made for build-all.sh,
# so run that first for the targets. Needs cargo-bloat (`cargo install cargo-bloat`).
#
#   bench/bloat.sh [-n LINES] [TRIPLE]...
set -eu
cd "$(dirname "$0")/.."

lines=25
if [ "${1:-}" = "-n" ]; then
	lines=$2
	shift 2
fi
[ $# -gt 0 ] || set -- x86_64-unknown-linux-musl aarch64-unknown-linux-musl \
	armv7-unknown-linux-musleabihf mipsel-unknown-linux-musl mips-unknown-linux-musl

eval "$(openwrt-pkg/cross-toolchain.sh)"
# The flags of build-all.sh: the same build, only not stripped.
rustflags="-C link-self-contained=no -C target-feature=+crt-static -C relocation-model=static -C force-unwind-tables=no"

for triple in "$@"; do
	wrapper=$(find "$HOME/.cache/cargo-zigbuild" -name "zigcc-$triple-*.sh" 2>/dev/null | head -n 1)
	if [ -z "$wrapper" ]; then
		echo "bench/bloat.sh: no zig wrapper for $triple: run openwrt-pkg/build-all.sh for it first" >&2
		exit 1
	fi
	ar=$(dirname "$wrapper")/ar
	upper=$(echo "$triple" | tr 'a-z-' 'A-Z_')
	env="$(echo "$triple" | tr '-' '_')"
	echo "== $triple"
	env "CARGO_TARGET_${upper}_LINKER=$wrapper" "CC_$env=$wrapper" "AR_$env=$ar" \
		CARGO_TARGET_DIR=target/cross/bloat RUSTFLAGS="$rustflags" \
		cargo bloat --profile bloat --target "$triple" -Z build-std=std,panic_abort \
		--crates -n "$lines"
done
