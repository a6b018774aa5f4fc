#!/bin/sh
# Packages the LuCI app as luci-app-kube-port-forward_VERSION_all.ipk, without the OpenWrt
# SDK: its files laid out as luci.mk installs them (htdocs under /www, root under /), with the
# feed Makefile's postinst and postrm, in opkg's format (as build-ipk.sh does for the daemon).
# build-all.sh calls it once: the app is JavaScript and ucode, the same for every router.
#
#   openwrt-pkg/build-luci-ipk.sh [OUTPUT_DIR]
set -eu

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=ipk.sh
. "$here/ipk.sh"
root=$(dirname "$here")
name=luci-app-kube-port-forward
pkg="$here/$name"
out=$(mkdir -p "${1:-$root/target/ipk}" && cd "${1:-$root/target/ipk}" && pwd)

version=$(sed -n 's/^PKG_VERSION:=//p' "$pkg/Makefile")
release=$(sed -n 's/^PKG_RELEASE:=//p' "$pkg/Makefile")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
data="$work/data"
control="$work/control"
mkdir -p "$data/www" "$control"
cp -R "$pkg/htdocs/." "$data/www/"
cp -R "$pkg/root/." "$data/"
find "$data" -type d -exec chmod 0755 {} +
find "$data" -type f -exec chmod 0644 {} +

size=$(du -sk "$data" | cut -f1)
cat > "$control/control" <<CONTROL
Package: $name
Version: $version-r$release
Depends: kube-port-forward, luci-base, rpcd-mod-ucode, ucode-mod-fs, ucode-mod-uci, ucode-mod-ubus
Source: openwrt-pkg/$name
SourceName: $name
License: Apache-2.0
Section: luci
Architecture: all
Installed-Size: $((size * 1024))
Description: LuCI pages for kube-port-forward.
 Shows what the router forwards to Kubernetes Services and why, and configures
 the daemon; the daemon checks settings and kubeconfig before they are saved.
CONTROL
# The feed Makefile's scripts, so the SDK build and this one agree.
for script in postinst postrm; do
	sed -n "/^define Package\/$name\/$script\$/,/^endef\$/p" "$pkg/Makefile" \
		| sed '1d;$d' | sed 's/\$\$/$/g' > "$control/$script"
	chmod 0755 "$control/$script"
done
ipk="$out/${name}_${version}-r${release}_all.ipk"
ipk_pack "$work" "$ipk"
echo "$ipk"
