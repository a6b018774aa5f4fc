#!/bin/sh
# Writes a kubeconfig for the router from the ServiceAccount of deploy/rbac.yaml, with mode
# 0600 (it holds the token). Run where kubectl reaches the cluster as an admin:
#   deploy/mint-kubeconfig.sh [-o FILE] [-s https://SERVER:6443] [-n NAMESPACE] [-a ACCOUNT]
# Default server: the current context's, which on k3s is often https://127.0.0.1:6443 and
# useless from the router: give the address the router reaches the API server at.
set -eu

out=router.kubeconfig
server=""
namespace=kube-port-forward
account=router
while getopts o:s:n:a: flag; do
	case "$flag" in
	o) out="$OPTARG" ;;
	s) server="$OPTARG" ;;
	n) namespace="$OPTARG" ;;
	a) account="$OPTARG" ;;
	*) sed -n '2,6p' "$0" >&2; exit 2 ;;
	esac
done

secret="$account-token"
# The token controller fills the Secret shortly after it is created.
tries=0
until token=$(kubectl -n "$namespace" get secret "$secret" -o jsonpath='{.data.token}') && [ -n "$token" ]; do
	tries=$((tries + 1))
	if [ "$tries" -ge 30 ]; then
		echo "no token in secret $namespace/$secret: was deploy/rbac.yaml applied?" >&2
		exit 1
	fi
	sleep 1
done
ca=$(kubectl -n "$namespace" get secret "$secret" -o jsonpath='{.data.ca\.crt}')
if [ -z "$server" ]; then
	server=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
fi
case "$server" in
*://127.*|*://localhost*|*://\[::1\]*)
	echo "warning: server $server is a loopback address; pass -s with one the router can reach" >&2 ;;
esac

umask 077
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
{
	echo "apiVersion: v1"
	echo "kind: Config"
	echo "clusters:"
	echo "- name: cluster"
	echo "  cluster:"
	echo "    server: $server"
	echo "    certificate-authority-data: $ca"
	echo "users:"
	echo "- name: $account"
	echo "  user:"
	echo "    token: $(echo "$token" | base64 -d)"
	echo "contexts:"
	echo "- name: router"
	echo "  context:"
	echo "    cluster: cluster"
	echo "    user: $account"
	echo "current-context: router"
} > "$tmp"
chmod 0600 "$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "wrote $out (mode 0600); copy it to the router's /etc/kube-port-forward/kubeconfig" >&2
