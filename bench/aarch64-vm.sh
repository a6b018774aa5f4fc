#!/usr/bin/env bash
# The aarch64 package on an emulated aarch64 machine (issue 21): run by hand, as root, not
# in CI.
#   bench/aarch64-vm.sh [IPK]        IPK default: the aarch64_generic one that
#                                    openwrt-pkg/build-all.sh makes in target/openwrt/
#   bench/aarch64-vm.sh --image-only builds (or finds) the machine and stops
#
# The machine: Debian bookworm arm64 (minbase, nftables, iproute2, socat, Debian's arm64
# kernel) made by debootstrap, its second stage run in a chroot through qemu-aarch64-static
# and binfmt_misc (mounted and registered for the build if the host has neither, then
# removed again), written into an ext4 image by `mke2fs -d` (no loop device, no mount). It
# boots under qemu-system-aarch64 (software emulation, cortex-a53) with Debian's own kernel
# and initrd, the image as a virtio disk opened with -snapshot (every run starts from the
# same image), user-mode networking (the host's 127.0.0.1 is 10.0.2.2 in the guest) and a
# 9p share holding the guest script, the ipk and the results. All of it is cached in
# target/aarch64-vm/ (or $KPF_VM_CACHE) and reused; delete that folder to build it anew.
#
# The package is installed as opkg would: data.tar.gz of the ipk unpacked into /. The guest
# is Debian, not OpenWrt: the procd init script, the UCI config and the firewall4 include
# are unpacked but not run here (tests/package.rs checks them). The guest
# (bench/aarch64-vm/guest.sh) runs, on the aarch64 kernel with real nftables:
#   apply     `kube-port-forward apply -f` of examples/, then `status` shows the forwards
#   datapath  client / router / server namespaces: a TCP connection to the router's WAN
#             port reaches a server listening on the LoadBalancer address
#   daemon-no-ca  the daemon starts with no CA bundle on the system (/etc/ssl/certs moved
#             aside) when its kubeconfig carries the cluster's CA (OpenWrt without
#             ca-bundle); one with no CA at all does not start then (reported, not failed)
#   daemon    `kube-port-forward run` against the test API server of tests/common, run on
#             the host by the ignored test tests/aarch64_vm.rs and reached by a host name:
#             a Service appears, its forward carries a connection, the Service is deleted,
#             the forward goes and the finalizer is released
# Host and guest meet through files in the share, each waiting for the other's with a
# deadline. Prints pass/fail and the wall time of each step; exits 1 if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

DEFAULT_IPK=$repo/target/openwrt/kube-port-forward_0.1.0-r1_aarch64_generic.ipk
SUITE=bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}
# ca-certificates: OpenWrt images usually have ca-bundle (daemon-no-ca runs without it).
PACKAGES=nftables,iproute2,socat,linux-image-arm64,kmod,procps,ca-certificates
# How long the guest's steps may take once it has booted.
RUN_DEADLINE=${RUN_DEADLINE:-1800}

cache=${KPF_VM_CACHE:-$repo/target/aarch64-vm}
rootfs=$cache/rootfs
image=$cache/root.img
run=$cache/run
image_only=0
ipk=$DEFAULT_IPK
case "${1:-}" in
    --image-only) image_only=1 ;;
    -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
    "") ;;
    *) ipk=$1 ;;
esac

[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 2; }

timings=()
now() { date +%s.%N; }
# `record NAME START VERDICT`: one line of the summary.
record() {
    timings+=("$(printf '%-28s %-5s %7.1f s' "$1" "$3" "$(echo "$(now) - $2" | bc)")")
}

qemu_pid=
host_test=
binfmt_registered=0
binfmt_mounted=0
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
    local status=$?
    if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    # The host test stops waiting (within a poll) once the guest is said to have failed.
    if [ -n "$host_test" ] && kill -0 "$host_test" 2>/dev/null; then
        echo "the run was stopped" >"$run/guest-failed"
        wait "$host_test" 2>/dev/null || true
    fi
    # Anything debootstrap left mounted in the root (proc, sys) if it stopped midway.
    if [ -d "$rootfs" ]; then
        awk -v root="$rootfs" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r |
            while read -r m; do umount -l "$m" || true; done
    fi
    if [ "$binfmt_registered" = 1 ]; then
        echo -1 >/proc/sys/fs/binfmt_misc/kpf-aarch64 || true
    fi
    if [ "$binfmt_mounted" = 1 ]; then
        umount /proc/sys/fs/binfmt_misc || true
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need() {
    local missing=()
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# aarch64 ELF executables run through qemu-aarch64-static: Debian's magic and mask from
# /usr/share/binfmts, registered under our own name with F (the interpreter is opened now,
# so it works inside the chroot), unless the system already has an aarch64 handler.
binfmt_aarch64() {
    local dir=/proc/sys/fs/binfmt_misc
    if [ ! -e "$dir/register" ]; then
        mount -t binfmt_misc binfmt_misc "$dir"
        binfmt_mounted=1
    fi
    if grep -qs '^enabled' "$dir"/qemu-aarch64 "$dir"/kpf-aarch64; then
        return
    fi
    local magic mask
    magic=$(awk '$1 == "magic" { print $2 }' /usr/share/binfmts/qemu-aarch64)
    mask=$(awk '$1 == "mask" { print $2 }' /usr/share/binfmts/qemu-aarch64)
    printf ':kpf-aarch64:M::%s:%s:%s:F' "$magic" "$mask" "$(command -v qemu-aarch64-static)" \
        >"$dir/register"
    binfmt_registered=1
}

build_image() {
    local start
    start=$(now)
    need debootstrap:debootstrap qemu-aarch64-static:qemu-user-static mke2fs:e2fsprogs
    binfmt_aarch64
    rm -rf "$rootfs" "$image" "$cache/vmlinuz" "$cache/initrd.img"
    mkdir -p "$cache"
    echo "== debootstrap $SUITE arm64 into $rootfs (minutes: the second stage is emulated)"
    if ! nice debootstrap --foreign --arch arm64 --variant minbase --include "$PACKAGES" \
        "$SUITE" "$rootfs" "$MIRROR" >"$cache/debootstrap.log" 2>&1; then
        tail -30 "$cache/debootstrap.log"
        return 1
    fi
    # Debian's initrd with just what this machine needs to mount its root: the default
    # (MODULES=most) has mkinitramfs look at every module through qemu-user, twice, which
    # took 20 of the 30 minutes of the first build.
    mkdir -p "$rootfs/etc/initramfs-tools/conf.d"
    echo MODULES=list >"$rootfs/etc/initramfs-tools/conf.d/kpf-vm"
    printf '%s\n' virtio_pci virtio_blk ext4 crc32c_generic >>"$rootfs/etc/initramfs-tools/modules"
    if ! nice chroot "$rootfs" /debootstrap/debootstrap --second-stage \
        >>"$cache/debootstrap.log" 2>&1; then
        tail -30 "$cache/debootstrap.log" "$rootfs/debootstrap/debootstrap.log" 2>/dev/null
        return 1
    fi
    # No init system: the kernel starts this, which mounts the share and runs the guest
    # script from it (so the script can change without a new image).
    cat >"$rootfs/sbin/kpf-init" <<'EOF'
#!/bin/sh
# The initrd has mounted these already, and moved them here.
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
hostname kpf-aarch64
modprobe 9pnet_virtio && modprobe 9p
mkdir -p /mnt/share
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share /mnt/share; then
    /bin/bash /mnt/share/guest.sh >/dev/console 2>&1
else
    echo "KPF-GUEST: cannot mount the share" >/dev/console
fi
sync
echo o >/proc/sysrq-trigger
sleep 60
EOF
    chmod 755 "$rootfs/sbin/kpf-init"
    echo "/dev/vda / ext4 rw 0 1" >"$rootfs/etc/fstab"
    echo kpf-aarch64 >"$rootfs/etc/hostname"
    local kernel
    kernel=$(find "$rootfs/boot" -name 'vmlinuz-*' | sort | tail -1)
    cp "$kernel" "$cache/vmlinuz"
    cp "$rootfs/boot/initrd.img-${kernel##*/vmlinuz-}" "$cache/initrd.img"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb
    echo "== ext4 image"
    nice mke2fs -q -t ext4 -d "$rootfs" -L kpf-root "$image" 2G
    touch "$cache/image.ok"
    record "image build" "$start" ok
}

# The whole run is one function, read before it starts: editing this file while it runs
# (the image build takes a while) cannot change what it does.
main() {
    start_all=$(now)
    need bc:bc qemu-system-aarch64:qemu-system-arm
    if [ -e "$cache/image.ok" ]; then
        timings+=("$(printf '%-28s %-5s %9s' "image build" cached -)")
    else
        build_image
    fi
    if [ "$image_only" = 1 ]; then
        printf '%s\n' "${timings[@]}"
        exit 0
    fi
    [ -f "$ipk" ] || { echo "no package at $ipk (openwrt-pkg/build-all.sh makes it)" >&2; exit 2; }

    # The host test is built before the guest boots: the emulation wants both cores.
    start=$(now)
    echo "== building the host test (tests/aarch64_vm.rs)"
    CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target} nice cargo test --release \
        --test aarch64_vm --no-run >"$cache/host-build.log" 2>&1 || {
        tail -30 "$cache/host-build.log"
        exit 1
    }
    record "host test build" "$start" ok

    rm -rf "$run"
    mkdir -p "$run/examples"
    cp bench/aarch64-vm/guest.sh "$run/guest.sh"
    cp examples/*.yaml "$run/examples/"
    cp "$ipk" "$run/package.ipk"

    # `wait_for SECONDS WHAT COMMAND...`: polls until COMMAND succeeds, or the guest stops.
    wait_for() {
        local deadline=$(($(date +%s) + $1)) what=$2
        shift 2
        until "$@"; do
            if ! kill -0 "$qemu_pid" 2>/dev/null; then
                echo "the guest stopped before $what" >&2
                return 1
            fi
            if [ "$(date +%s)" -ge "$deadline" ]; then
                echo "timed out waiting for $what" >&2
                return 1
            fi
            sleep 0.5
        done
    }

    echo "== booting the guest (console: $cache/console.log)"
    start=$(now)
    qemu-system-aarch64 -M virt -cpu cortex-a53 -smp 2 -m 1024 -nographic -no-reboot \
        -kernel "$cache/vmlinuz" -initrd "$cache/initrd.img" \
        -append "root=/dev/vda rw console=ttyAMA0 init=/sbin/kpf-init panic=-1 quiet" \
        -drive "file=$image,if=virtio,format=raw,snapshot=on" \
        -netdev user,id=net0 -device virtio-net-pci,netdev=net0 \
        -fsdev "local,id=share,path=$run,security_model=none" \
        -device virtio-9p-pci,fsdev=share,mount_tag=share \
        </dev/null >"$cache/console.log" 2>&1 &
    qemu_pid=$!

    echo "== host test: API server for the guest (log: $cache/host-test.log)"
    KPF_VM_SHARE=$run CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target} cargo test --release \
        --test aarch64_vm -- --ignored --nocapture >"$cache/host-test.log" 2>&1 &
    host_test=$!

    booted=ok
    wait_for 900 "the guest to boot" test -e "$run/booted" || booted=FAIL
    record "boot to ready" "$start" "$booted"
    if [ "$booted" = ok ]; then
        echo "== guest ready; steps running"
        wait_for "$RUN_DEADLINE" "the guest's steps" test -e "$run/guest-done" || true
    fi
    # The guest powers itself off once done; it is stopped if it has not within a minute.
    deadline=$(($(date +%s) + 60))
    while kill -0 "$qemu_pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.5; done
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
    if [ ! -e "$run/forward-removed" ] && [ ! -e "$run/host-failed" ]; then
        # The host test would wait on for a guest that has gone.
        echo "the guest is gone" >"$run/guest-failed"
    fi
    host_verdict=ok
    wait "$host_test" || host_verdict=FAIL

    failed=0
    [ "$booted" = ok ] || failed=1
    for name in network install apply datapath daemon-no-ca daemon; do
        line=$(awk -v n="$name" '$1 == n' "$run/results" 2>/dev/null)
        if [ -z "$line" ]; then
            timings+=("$(printf '%-28s %-5s %9s' "guest: $name" "-" "not run")")
            failed=1
            continue
        fi
        read -r _ verdict seconds <<<"$line"
        timings+=("$(printf '%-28s %-5s %7.1f s' "guest: $name" "$verdict" "$seconds")")
        [ "$verdict" = ok ] || failed=1
    done
    timings+=("$(printf '%-28s %-5s' "host: API server test" "$host_verdict")")
    [ "$host_verdict" = ok ] || failed=1
    record "whole run" "$start_all" "$([ "$failed" = 0 ] && echo ok || echo FAIL)"

    echo
    echo "== guest console (KPF-GUEST lines)"
    grep -a 'KPF-GUEST' "$cache/console.log" || tail -40 "$cache/console.log"
    awk '$2 != "ok" { print $1 }' "$run/results" 2>/dev/null | while read -r name; do
        echo "== $name: what it printed (last lines; all in $run/$name.out)"
        tail -8 "$run/$name.out"
    done
    if [ "$host_verdict" != ok ]; then
        echo "== host test"
        tail -30 "$cache/host-test.log"
    fi
    echo
    echo "== summary ($(uname -m) host, guest aarch64 under TCG; outputs in $run)"
    printf '%s\n' "${timings[@]}"
    return "$failed"
}

main
