#!/bin/sh
# Packages a kube-port-forward binary as kube-port-forward_VERSION_ARCH.ipk, without the
# OpenWrt SDK: the binary plus the feed package's files, laid out as opkg expects (an outer
# tar.gz of debian-binary, control.tar.gz and data.tar.gz, as OpenWrt's ipkg-build makes).
# build-all.sh builds the static musl binaries for every router CPU and calls this for each.
#
#   openwrt-pkg/build-ipk.sh --arch ARCH --binary PATH [OUTPUT_DIR]
#
# ARCH is OpenWrt's package architecture (x86_64, aarch64_cortex-a53, mipsel_24kc, ...).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=ipk.sh
. "$here/ipk.sh"
root=$(dirname "$here")
pkg="$here/kube-port-forward"
arch=""
binary=""
while [ $# -gt 0 ]; do
	case "$1" in
	--arch) arch="$2" && shift 2 ;;
	--binary) binary="$2" && shift 2 ;;
	*) break ;;
	esac
done
if [ -z "$arch" ] || [ ! -f "$binary" ]; then
	echo "usage: $0 --arch ARCH --binary PATH [OUTPUT_DIR]" >&2
	exit 2
fi
out=$(mkdir -p "${1:-$root/target/ipk}" && cd "${1:-$root/target/ipk}" && pwd)

version=$(sed -n 's/^PKG_VERSION:=//p' "$pkg/Makefile")
release=$(sed -n 's/^PKG_RELEASE:=//p' "$pkg/Makefile")

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
mkdir -p "$data/lib/upgrade/keep.d"
install -m 0644 "$pkg/files/kube-port-forward.keep" "$data/lib/upgrade/keep.d/kube-port-forward"

size=$(du -sk "$data" | cut -f1)
cat > "$control/control" <<CONTROL
Package: kube-port-forward
Version: $version-r$release
Depends: nftables-json, kmod-nft-nat, kmod-nf-conntrack-netlink, ca-bundle
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
# The feed's postinst, after what the SDK's default_postinst does there: enable at boot on a
# first install (it starts only once enabled in /etc/config/kube-port-forward); an upgrade
# keeps what the user chose.
{
	cat <<'ENABLE'
#!/bin/sh
[ -n "${IPKG_INSTROOT}" ] || [ "${PKG_UPGRADE}" = 1 ] || /etc/init.d/kube-port-forward enable
ENABLE
	sed -n '/^define Package\/kube-port-forward\/postinst$/,/^endef$/p' "$pkg/Makefile" \
		| sed '1,2d;$d' | sed 's/\$\$/$/g'
} > "$control/postinst"
chmod 0755 "$control/prerm" "$control/postinst" "$control/postrm"
ipk="$out/kube-port-forward_${version}-r${release}_${arch}.ipk"
ipk_pack "$work" "$ipk"
echo "$ipk"
