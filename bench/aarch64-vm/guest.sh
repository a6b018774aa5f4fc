#!/bin/bash
# The guest side of bench/aarch64-vm.sh, run by the guest's init (/sbin/kpf-init) from the
# share mounted at $SHARE. Installs the ipk as opkg would (data.tar.gz into /; the procd
# init script and UCI config are not run on this Debian guest), then runs the steps,
# appending `STEP VERDICT SECONDS` to $SHARE/results. Host and guest meet through files
# in the share: each waits for the other's file with a deadline, and a side that fails
# writes guest-failed or host-failed so the other stops waiting.
#
# Namespaces: kpf-client --wan-- kpf-router --lan-- kpf-server; the guest's own NIC (user
# networking, the host at 10.0.2.2) is moved into kpf-router for the daemon's API calls.
set -uo pipefail
SHARE=${SHARE:-/mnt/share}
BIN=${BIN:-/usr/sbin/kube-port-forward}
WAN4=203.0.113.1
CLIENT4=203.0.113.2
LB4=192.168.50.10
API_HOST=apiserver.kpf.test
FINALIZER=kube-port-forward-controller/finalizer
WORK=/tmp/kpf
# To try steps on a development host: NIC=none (none moved, no /etc/hosts entry), BIN a
# native binary, STEPS without install and daemon.
NIC=${NIC:-}
STEPS=${STEPS:-install apply datapath daemon-no-ca daemon}
mkdir -p "$WORK"

now() { date +%s.%N; }
log() { echo "KPF-GUEST: $*"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# `step NAME FUNCTION`: runs it, times it, records the verdict; a failed step is logged
# with what it printed, and the run goes on to the next one.
step() {
    local name=$1 start verdict
    shift
    start=$(now)
    log "step $name: start"
    if "$@" >"$WORK/$name.out" 2>&1; then verdict=ok; else verdict=FAIL; fi
    echo "$name $verdict $(elapsed "$start")" >>"$SHARE/results"
    log "step $name: $verdict in $(elapsed "$start") s"
    if [ "$verdict" = FAIL ]; then
        sed 's/^/    /' "$WORK/$name.out"
    fi
    cp "$WORK/$name.out" "$SHARE/$name.out"
    [ "$verdict" = ok ]
}

# `wait_until SECONDS WHAT COMMAND...`: polls COMMAND until it succeeds; fails after the
# deadline, or at once when the host said it failed.
wait_until() {
    local deadline=$(($(date +%s) + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ -e "$SHARE/host-failed" ]; then
            echo "the host failed: $(cat "$SHARE/host-failed")"
            return 1
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "timed out waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

# Written atomically: the host never reads half a file.
signal() { echo "${2:-}" >"$SHARE/.$1" && mv "$SHARE/.$1" "$SHARE/$1"; }

in_ns() { ip netns exec "$@"; }

# The text a client in kpf-client reads from WAN port $1 (fails if it cannot connect).
greeting() { in_ns kpf-client socat -T 5 -u "TCP:$WAN4:$1,connect-timeout=5" -; }
greets() { [ "$(greeting "$1")" = "hello from $LB4" ]; }
refused() { ! greeting "$1" >/dev/null 2>&1; }

network() {
    ip link set lo up
    for ns in kpf-client kpf-router kpf-server; do
        ip netns add "$ns" && ip -n "$ns" link set lo up || return 1
    done
    ip link add wan netns kpf-router type veth peer name eth0 netns kpf-client &&
        ip link add lan netns kpf-router type veth peer name eth0 netns kpf-server &&
        ip -n kpf-router addr add "$WAN4/24" dev wan &&
        ip -n kpf-router addr add 192.168.50.1/24 dev lan &&
        ip -n kpf-client addr add "$CLIENT4/24" dev eth0 &&
        ip -n kpf-server addr add "$LB4/24" dev eth0 &&
        ip -n kpf-router link set wan up && ip -n kpf-router link set lan up &&
        ip -n kpf-client link set eth0 up && ip -n kpf-server link set eth0 up &&
        ip -n kpf-server route add default via 192.168.50.1 &&
        in_ns kpf-router sysctl -qw net.ipv4.ip_forward=1 || return 1
    # The LoadBalancer address's server: greets each connection with its own address.
    in_ns kpf-server socat "TCP-LISTEN:8080,bind=$LB4,fork,reuseaddr" \
        SYSTEM:"echo hello from \$SOCAT_SOCKADDR" &
    wait_until 60 "the server to listen" listening || return 1
    # The guest's NIC: the router reaches the host's API server through it, by name,
    # resolved from /etc/hosts.
    [ "$NIC" != none ] || return 0
    if [ -z "$NIC" ]; then
        # No udev here: the driver is loaded by hand, the NIC is the one link besides lo.
        modprobe virtio_net
        wait_until 30 "the NIC" nic || return 1
        NIC=$(nic)
    fi
    echo "NIC $NIC"
    ip link set "$NIC" netns kpf-router &&
        ip -n kpf-router addr add 10.0.2.15/24 dev "$NIC" &&
        ip -n kpf-router link set "$NIC" up &&
        ip -n kpf-router route add default via 10.0.2.2 &&
        echo "10.0.2.2 $API_HOST" >>/etc/hosts
}

nic() { ip -o link show | awk -F': ' '$2 != "lo" { print $2; found = 1; exit } END { exit !found }'; }

listening() { in_ns kpf-server ss -Htln "sport = :8080" | grep -q .; }

# Unpacked as opkg does. Debian's /lib is a link to usr/lib (OpenWrt's is a folder): the
# package's ./lib/upgrade must go through it, not replace it.
install() {
    local dir=$WORK/ipk
    mkdir -p "$dir"
    tar -xzf "$SHARE/package.ipk" -C "$dir" &&
        [ "$(cat "$dir/debian-binary")" = 2.0 ] &&
        tar -xzf "$dir/control.tar.gz" -C "$dir" ./control &&
        cat "$dir/control" &&
        tar -xzvf "$dir/data.tar.gz" -C / --keep-directory-symlink &&
        file_type=$(od -An -tx1 -j18 -N2 "$BIN" | tr -d ' ') &&
        echo "e_machine $file_type" &&
        [ "$file_type" = b700 ] &&
        "$BIN" --version
}

apply_examples() {
    in_ns kpf-router "$BIN" apply -f "$SHARE/examples" --wan-interface wan \
        --wan-address "$WAN4" || return 1
    in_ns kpf-router "$BIN" status | tee "$WORK/status.txt" || return 1
    # web's two ports, dns over TCP and UDP, git's one good entry; the conflict, the
    # waiting and the refused Services open nothing.
    grep -q "kube_port_forward: 7 forwards" "$WORK/status.txt" || return 1
    for want in "default/web" "infra/dns" "dev/git"; do
        grep -q "$want" "$WORK/status.txt" || { echo "no $want in status"; return 1; }
    done
    for unwanted in "media/jellyfin" "games/minecraft" "infra/vpn"; do
        if grep -q "$unwanted" "$WORK/status.txt"; then
            echo "$unwanted in status"
            return 1
        fi
    done
    in_ns kpf-router nft list table inet kube_port_forward
}

datapath() {
    cat >"$WORK/web.yaml" <<EOF
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: apps
  uid: 00000000-0000-4000-8000-000000000001
  annotations:
    kube-port-forward-controller/mapping: "80:http"
spec:
  type: LoadBalancer
  ports:
    - {name: http, port: 8080, protocol: TCP}
status:
  loadBalancer:
    ingress:
      - ip: $LB4
EOF
    in_ns kpf-router "$BIN" apply -f "$WORK/web.yaml" --wan-interface wan \
        --wan-address "$WAN4" &&
        in_ns kpf-router "$BIN" status &&
        greeting 80 && greets 80 &&
        # The examples' forwards were replaced by this one.
        refused 2222 || return 1
    # Leave the kernel as the daemon will find it on a fresh router.
    in_ns kpf-router nft delete table inet kube_port_forward && refused 80
}

# `start_daemon NAME`: `run` in the router against the host's API server, its log in
# $SHARE/NAME.log; sets $pid.
# `start_daemon NAME [KUBECONFIG]`
start_daemon() {
    in_ns kpf-router "$BIN" run --kubeconfig "${2:-$SHARE/kubeconfig}" --instance "$1" \
        --wan-interface wan --wan-address "$WAN4" --finalizer "$FINALIZER" \
        --condition-type "kube-port-forward-controller/$1" --resync 5 \
        >"$SHARE/$1.log" 2>&1 &
    pid=$!
}

# Succeeds once daemon $1 logged that it is ready; fails as soon as it has exited.
ready() {
    local deadline=$(($(date +%s) + 300))
    until grep -q "ready: " "$SHARE/$1.log"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "daemon $1 exited:"
            cat "$SHARE/$1.log"
            return 1
        fi
        [ "$(date +%s)" -lt "$deadline" ] || { echo "daemon $1 not ready in 300 s"; return 1; }
        sleep 0.2
    done
}

stop_daemon() {
    kill "$pid" 2>/dev/null
    wait "$pid"
    echo "daemon exit status $?"
}

# The daemon on a system without a CA bundle (an OpenWrt image without ca-bundle: the ipk
# does not depend on it), its kubeconfig carrying the cluster's own CA as real ones do.
# The API server is plain http, so no TLS is spoken; what counts is that the client is
# built without the system's roots. A kubeconfig with no CA at all is tried first and its
# outcome only reported: kube then asks the platform verifier for the system's roots and
# refuses to start without any, even for http.
daemon_without_ca() {
    wait_until 900 "the host's kubeconfig" test -e "$SHARE/kubeconfig" || return 1
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
        -subj /CN=kpf-test-cluster-ca -keyout "$WORK/ca.key" -out "$WORK/ca.crt" 2>&1 ||
        return 1
    awk -v ca="$(base64 -w0 "$WORK/ca.crt")" \
        '{ print } /^    server: / { print "    certificate-authority-data: " ca }' \
        "$SHARE/kubeconfig" >"$WORK/kubeconfig-ca"
    chmod 600 "$WORK/kubeconfig-ca"
    mv /etc/ssl/certs /etc/ssl/certs.hidden || return 1
    start_daemon noca-plain
    if ready noca-plain >/dev/null; then
        echo "note: with no CA in the kubeconfig either, the daemon starts"
    else
        echo "note: with no CA in the kubeconfig either, the daemon does not start:"
        grep error "$SHARE/noca-plain.log"
    fi
    stop_daemon
    start_daemon noca "$WORK/kubeconfig-ca"
    ready noca
    local status=$?
    stop_daemon
    mv /etc/ssl/certs.hidden /etc/ssl/certs
    return "$status"
}

daemon() {
    wait_until 900 "the host's kubeconfig" test -e "$SHARE/kubeconfig" || return 1
    cat "$SHARE/kubeconfig"
    start_daemon aarch64
    ready aarch64 &&
        signal daemon-ready &&
        echo "ready; the host creates the Service" &&
        wait_until 300 "the forward to carry a connection" greets 80 &&
        greeting 80 &&
        in_ns kpf-router "$BIN" status | tee "$WORK/status-during.txt" &&
        grep -q "apps/web" "$WORK/status-during.txt" &&
        # The host deletes the Service once it has this.
        signal forward-carried &&
        wait_until 300 "the host to see the Service gone" test -e "$SHARE/service-gone" &&
        # The finalizer is released only once the rule has left the kernel.
        refused 80 &&
        in_ns kpf-router "$BIN" status | tee "$WORK/status-after.txt" &&
        ! grep -q "apps/web" "$WORK/status-after.txt" &&
        signal forward-removed
    local status=$?
    stop_daemon
    return "$status"
}

cleanup() {
    jobs -p | xargs -r kill 2>/dev/null
    for ns in kpf-client kpf-router kpf-server; do ip netns del "$ns" 2>/dev/null; done
}
trap cleanup EXIT

declare -A function=([install]=install [apply]=apply_examples [datapath]=datapath
    [daemon-no-ca]=daemon_without_ca [daemon]=daemon)
log "booted: $(uname -srm)"
: >"$SHARE/results"
if step network network; then
    signal booted
    # Each step goes on from where the last one left the guest; only a failed install
    # stops the run.
    for name in $STEPS; do
        step "$name" "${function[$name]}" || [ "$name" != install ] || break
    done
fi
[ -e "$SHARE/forward-removed" ] || signal guest-failed "see the console log"
signal guest-done
log "done"
