#!/usr/bin/env bash
# Install the Debian test tools when missing: skopeo, docker-registry (CNCF
# distribution 2.8, /usr/bin/docker-registry), nginx (benchmarks), containerd, and
# lua5.4 (runs the Argo CD health check documented in docs/gitops.md), and what the
# test node needs (runc, CNI plugins, iptables, conntrack, busybox-static),
# PostgreSQL (tests/support/postgres.py runs throwaway clusters with its initdb/pg_ctl),
# and chromium with its driver (the web UI's browser tests).
# Nothing is fetched when they are all present. Package installs must not leave
# daemons running on fixed ports (docker-registry :5000, nginx :80): tests start
# their own instances on free ports, so service starts are denied while apt runs.
set -euo pipefail

installed() {
    dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null | grep -qx installed
}

start=$EPOCHREALTIME
missing=()
installed skopeo || missing+=(skopeo)
installed docker-registry || missing+=(docker-registry)
installed nginx-light || installed nginx || installed nginx-full || missing+=(nginx-light)
installed containerd || installed containerd.io || command -v containerd >/dev/null ||
    missing+=(containerd)
installed lua5.4 || missing+=(lua5.4)
# The test node (tests/support/node.py): containerd's runtime, pod networking with
# kube-proxy's iptables rules, and busybox for the images the node's pods run.
installed runc || missing+=(runc)
installed containernetworking-plugins || missing+=(containernetworking-plugins)
installed iptables || missing+=(iptables)
installed conntrack || missing+=(conntrack)
installed busybox-static || missing+=(busybox-static)
installed postgresql || missing+=(postgresql)
installed curl || missing+=(curl)  # bench/tls.py's client
# The web UI's browser tests (tests/integration/test_ui_browser.py): selenium drives
# chromium through its chromedriver, headless.
installed chromium || missing+=(chromium)
installed chromium-driver || missing+=(chromium-driver)

if ((${#missing[@]} == 0)); then
    printf '%-12s %-44s cached  %ss\n' apt "skopeo docker-registry nginx containerd lua node pg chromium" \
        "$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "apt.sh: missing Debian packages: ${missing[*]}; run as root:" >&2
    echo "  apt-get install -y ${missing[*]}" >&2
    exit 1
fi

# Deny service starts for the duration of the install (exit 101 = action
# forbidden) unless the machine already has such a policy.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# berth tools/apt.sh: no service starts during install\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi

# PostgreSQL's package would create (and on boot start) a cluster on :5432; the tests
# make their own, so none is created (postgresql-common reads this drop-in).
if [[ " ${missing[*]} " == *" postgresql "* ]]; then
    mkdir -p /etc/postgresql-common/createcluster.d
    printf '# berth tools/apt.sh: tests run their own clusters\ncreate_main_cluster = false\n' \
        >/etc/postgresql-common/createcluster.d/berth-no-main-cluster.conf
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

# On a systemd host, keep these from starting at boot as well.
if [[ -d /run/systemd/system ]]; then
    for unit in docker-registry nginx postgresql; do
        systemctl disable --now "$unit" >/dev/null 2>&1 || true
    done
fi

printf '%-12s %-44s built   %ss\n' apt "${missing[*]}" \
    "$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
