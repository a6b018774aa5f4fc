#!/bin/sh
# Builds kube-port-forward for the CPUs OpenWrt routers have, as static musl binaries, and
# packages each as an .ipk (opkg: OpenWrt 23.05, 24.10) named with OpenWrt's architecture.
# Sets up its toolchain from the package registries first (cross-toolchain.sh). Needs root
# only if qemu-user-static or Debian's package lists are missing (apt-get).
#
#   openwrt-pkg/build-all.sh [--arch ARCH]... [OUTPUT_DIR]
#
# Without --arch it builds every architecture below. OUTPUT_DIR (default target/openwrt)
# receives the packages, the binaries (kube-port-forward.TRIPLE) and sizes.tsv, and the LuCI
# app's package (architecture all, build-luci-ipk.sh).
#
# No .apk (OpenWrt 25.12 and snapshots): apk-tools 3, whose `apk mkpkg` writes the v3
# package format, is in none of the registries this is built from; the feed Makefile with
# the SDK makes one (see README, "Router builds").
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)

# OpenWrt architecture -> Rust target. aarch64_cortex-a53 and aarch64_generic share one
# binary (ARMv8.0, what both run), as do the two package names' users.
triple_of() {
	case "$1" in
	x86_64) echo x86_64-unknown-linux-musl ;;
	aarch64_cortex-a53 | aarch64_generic) echo aarch64-unknown-linux-musl ;;
	arm_cortex-a7_neon-vfpv4) echo armv7-unknown-linux-musleabihf ;;
	mipsel_24kc) echo mipsel-unknown-linux-musl ;;
	mips_24kc) echo mips-unknown-linux-musl ;;
	*) return 1 ;;
	esac
}
all="x86_64 aarch64_cortex-a53 aarch64_generic arm_cortex-a7_neon-vfpv4 mipsel_24kc mips_24kc"

arches=""
while [ $# -gt 0 ]; do
	case "$1" in
	--arch)
		triple_of "$2" >/dev/null || {
			echo "build-all.sh: unknown architecture $2 (one of: $all)" >&2
			exit 2
		}
		arches="$arches $2"
		shift 2
		;;
	*) break ;;
	esac
done
arches=${arches:-$all}
out=$(mkdir -p "${1:-$root/target/openwrt}" && cd "${1:-$root/target/openwrt}" && pwd)

eval "$("$root/openwrt-pkg/cross-toolchain.sh")"

# The flags every router build gets; each one's effect on size is in README, "Router builds".
#   link-self-contained=no: build-std has no self-contained crt objects; zig brings musl's.
#   +crt-static: the mips targets link dynamically by default; static everywhere.
#   relocation-model=static: a fixed-address executable (no PIE/PIC): no relocations to
#     carry, and on MIPS no call through the GOT for every function.
#   force-unwind-tables=no: with panic=abort nothing unwinds; build-std compiles the
#     standard library with it too, so its tables go as well.
rustflags="-C link-self-contained=no -C target-feature=+crt-static -C relocation-model=static -C force-unwind-tables=no"

built=""
for arch in $arches; do
	triple=$(triple_of "$arch")
	case " $built " in *" $triple "*) continue ;; esac
	echo "build-all.sh: building $triple" >&2
	start=$(date +%s)
	(
		cd "$root"
		CARGO_TARGET_DIR="$root/target/cross/build" RUSTFLAGS="$rustflags" \
			cargo zigbuild --locked --release --target "$triple" -Zbuild-std=std,panic_abort
	)
	cp "$root/target/cross/build/$triple/release/kube-port-forward" "$out/kube-port-forward.$triple"
	echo "build-all.sh: $triple built in $(($(date +%s) - start)) s" >&2
	built="$built $triple"
done

printf 'arch\ttarget\tbinary_bytes\tipk_bytes\n' > "$out/sizes.tsv"
for arch in $arches; do
	triple=$(triple_of "$arch")
	binary="$out/kube-port-forward.$triple"
	ipk=$("$root/openwrt-pkg/build-ipk.sh" --arch "$arch" --binary "$binary" "$out")
	printf '%s\t%s\t%s\t%s\n' "$arch" "$triple" "$(stat -c %s "$binary")" "$(stat -c %s "$ipk")" \
		>> "$out/sizes.tsv"
done
column -t "$out/sizes.tsv" >&2
echo "build-all.sh: $("$root/openwrt-pkg/build-luci-ipk.sh" "$out")" >&2
