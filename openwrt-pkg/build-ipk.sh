#!/bin/sh
# Builds kube-port-forward_VERSION_x86_64.ipk on this machine, without the OpenWrt SDK: a
# static x86_64 release binary plus the feed package's files, laid out as opkg expects
# (an outer tar.gz of debian-binary, control.tar.gz and data.tar.gz, as OpenWrt's
# ipkg-build makes). For other architectures, and for .apk (OpenWrt 25.12), use the feed
# Makefile in kube-port-forward/ with the SDK.
#
#   openwrt-pkg/build-ipk.sh [--binary PATH] [OUTPUT_DIR]
#
# --binary packages an existing binary instead of building the static one (the package
# structure test does this). Without it the binary is built with glibc linked statically
# (this machine has no musl Rust target) and non-PIE, which drops 0.3 MB of relocations:
# see README, "Binary size".
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
pkg="$here/kube-port-forward"
binary=""
if [ "${1:-}" = "--binary" ]; then
	binary="$2"
	shift 2
fi
out=$(mkdir -p "${1:-$root/target/ipk}" && cd "${1:-$root/target/ipk}" && pwd)

version=$(sed -n 's/^PKG_VERSION:=//p' "$pkg/Makefile")
release=$(sed -n 's/^PKG_RELEASE:=//p' "$pkg/Makefile")
arch=x86_64

if [ -z "$binary" ]; then
	target=x86_64-unknown-linux-gnu
	(
		cd "$root"
		RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
			cargo build --release --locked --target "$target"
	)
	binary="$root/target/$target/release/kube-port-forward"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
data="$work/data"
control="$work/control"
mkdir -p "$data/usr/sbin" "$data/etc/init.d" "$data/etc/config" "$data/etc/kube-port-forward" \
	"$data/usr/share/nftables.d/chain-pre/forward" "$control"
install -m 0755 "$binary" "$data/usr/sbin/kube-port-forward"
install -m 0755 "$pkg/files/kube-port-forward.init" "$data/etc/init.d/kube-port-forward"
install -m 0600 "$pkg/files/kube-port-forward.config" "$data/etc/config/kube-port-forward"
install -m 0644 "$pkg/files/30-kube-port-forward.nft" \
	"$data/usr/share/nftables.d/chain-pre/forward/30-kube-port-forward.nft"
chmod 0700 "$data/etc/kube-port-forward"

size=$(du -sk "$data" | cut -f1)
cat > "$control/control" <<CONTROL
Package: kube-port-forward
Version: $version-r$release
Depends: nftables-json, kmod-nft-nat, kmod-nf-conntrack-netlink
Source: openwrt-pkg/kube-port-forward
SourceName: kube-port-forward
License: Apache-2.0
Section: net
Architecture: $arch
Installed-Size: $((size * 1024))
Description: Router port forwards for Kubernetes LoadBalancer Services.
 Watches a cluster's Services through a kubeconfig and forwards WAN ports to
 annotated Services' LoadBalancer addresses with nftables DNAT rules, holding a
 finalizer so a deleted Service's port is closed before the Service goes.
CONTROL
# The same lists and scripts as the feed Makefile's conffiles and prerm.
sed -n '/^define Package\/kube-port-forward\/conffiles$/,/^endef$/p' "$pkg/Makefile" \
	| sed '1d;$d' > "$control/conffiles"
sed -n '/^define Package\/kube-port-forward\/prerm$/,/^endef$/p' "$pkg/Makefile" \
	| sed '1d;$d' | sed 's/\$\$/$/g' > "$control/prerm"
sed -n '/^define Package\/kube-port-forward\/postrm$/,/^endef$/p' "$pkg/Makefile" \
	| sed '1d;$d' | sed 's/\$\$/$/g' > "$control/postrm"
# The feed's postinst, after what the SDK's default_postinst does there: enable at boot (it
# starts only once enabled in /etc/config/kube-port-forward).
{
	cat <<'ENABLE'
#!/bin/sh
[ -n "${IPKG_INSTROOT}" ] || /etc/init.d/kube-port-forward enable
ENABLE
	sed -n '/^define Package\/kube-port-forward\/postinst$/,/^endef$/p' "$pkg/Makefile" \
		| sed '1,2d;$d' | sed 's/\$\$/$/g'
} > "$control/postinst"
chmod 0755 "$control/prerm" "$control/postinst" "$control/postrm"
echo "2.0" > "$work/debian-binary"

tarball() { # DIR OUTPUT: a gzip tar of DIR's contents, owned by root, reproducible order
	tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$1" -czf "$2" .
}
tarball "$data" "$work/data.tar.gz"
tarball "$control" "$work/control.tar.gz"
ipk="$out/kube-port-forward_${version}-r${release}_${arch}.ipk"
tar --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work" -czf "$ipk" \
	./debian-binary ./control.tar.gz ./data.tar.gz
echo "$ipk"
