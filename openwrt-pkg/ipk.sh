# shellcheck shell=sh
# Sourced by build-ipk.sh and build-luci-ipk.sh: opkg's package format, as OpenWrt's
# ipkg-build makes it.

# ipk_pack WORK IPK: packs WORK's data/ and control/ folders into IPK, an outer tar.gz of
# debian-binary, control.tar.gz and data.tar.gz, every file owned by root, in a reproducible
# order and time.
ipk_pack() {
	echo "2.0" > "$1/debian-binary"
	for part in data control; do
		tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$1/$part" -cf - . \
			| gzip -9n > "$1/$part.tar.gz"
	done
	tar --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$1" -czf "$2" \
		./debian-binary ./control.tar.gz ./data.tar.gz
}
