#!/usr/bin/env bash
# Build the Go test tools once per version into ${BERTH_CACHE:-$HOME/.cache/berth}
# and install the Debian ones (tools/apt.sh). Called by `make tools`.
#
# Layout: $BERTH_CACHE/<name>-<version>/<binary>. A tool is built in a temporary
# directory next to its final place and renamed into it only when every binary is
# there, so an interrupted build never leaves a half tool behind. A tool whose
# directory exists is not rebuilt: delete the directory to force a rebuild.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${BERTH_CACHE:-$HOME/.cache/berth}"
mkdir -p "$cache"

export CGO_ENABLED=0
export GOFLAGS=-mod=mod
# The tools run on this machine only; no toolchain switching.
export GOTOOLCHAIN=local

go_bin() {
    if command -v go >/dev/null 2>&1; then
        command -v go
    elif [[ -x /usr/local/go/bin/go ]]; then
        echo /usr/local/go/bin/go
    else
        echo "build.sh: no Go toolchain (expected /usr/local/go/bin/go)" >&2
        return 1
    fi
}

# One build at a time per cache: a second `make tools` waits for the first.
exec 9>"$cache/.build.lock"
flock 9

# Seconds since $1 (an $EPOCHREALTIME value), one decimal.
elapsed() {
    awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'
}

# The wrapper module must require the version pinned in versions.env.
check_pin() {
    local moddir=$1 module=$2 version=$3
    if ! grep -Eq "^[[:space:]]*(require[[:space:]]+)?${module//./\\.} ${version//./\\.}( |$)" \
        "$here/go/$moddir/go.mod"; then
        echo "build.sh: tools/go/$moddir/go.mod does not require $module $version" \
            "(tools/versions.env); fix one of them" >&2
        return 1
    fi
}

# build_tool NAME VERSION MODDIR BINARY... -- COMMAND...
# Runs COMMAND in tools/go/MODDIR with $out set to the temporary output directory,
# then checks that every BINARY exists in it and publishes it.
build_tool() {
    local name=$1 version=$2 moddir=$3
    shift 3
    local binaries=()
    while [[ $1 != -- ]]; do
        binaries+=("$1")
        shift
    done
    shift
    local dest="$cache/$name-$version" start=$EPOCHREALTIME
    if [[ -d $dest ]]; then
        printf '%-12s %-44s cached  %ss\n' "$name" "$version" "$(elapsed "$start")"
        return 0
    fi
    local log="$cache/$name-$version.build.log"
    # Left by a build that was killed outright; we hold the lock, so none is live.
    rm -rf "$cache/.$name-$version."*
    out="$(mktemp -d "$cache/.$name-$version.XXXXXX")"
    trap 'rm -rf "$out"' EXIT
    if ! (cd "$here/go/$moddir" && "$@") >"$log" 2>&1; then
        echo "build.sh: building $name $version failed; log: $log" >&2
        tail -n 40 "$log" >&2
        return 1
    fi
    local b
    for b in "${binaries[@]}"; do
        if [[ ! -x $out/$b ]]; then
            echo "build.sh: $name $version: $b missing after the build; log: $log" >&2
            return 1
        fi
    done
    chmod 0755 "$out"
    mv -T "$out" "$dest"
    trap - EXIT
    printf '%-12s %-44s built   %ss\n' "$name" "$version" "$(elapsed "$start")"
}

go="$(go_bin)"
ldflags="-s -w"

kube_ldflags() {
    local minor=${KUBERNETES_VERSION#v1.}
    minor=${minor%%.*}
    local pkg flags="$ldflags"
    # Without these the binaries report v0.0.0-master.
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitTreeState=clean"
        flags+=" -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    done
    echo "$flags"
}

# The commands below run inside tools/go/<module>, writing into $out.
build_kubernetes() {
    "$go" build -trimpath -ldflags="$(kube_ldflags)" -o "$out/" \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kubectl
}
# The node: a kubelet, scheduler and proxy of the same version as the control plane.
build_kubernetes_node() {
    "$go" build -trimpath -ldflags="$(kube_ldflags)" -o "$out/" \
        k8s.io/kubernetes/cmd/kubelet \
        k8s.io/kubernetes/cmd/kube-scheduler \
        k8s.io/kubernetes/cmd/kube-proxy
}
build_pause() {
    "$go" build -trimpath -ldflags="$ldflags" -o "$out/pause" .
}
build_coredns() {
    "$go" build -trimpath -ldflags="$ldflags" -o "$out/coredns" .
}
build_etcd() {
    "$go" build -trimpath -ldflags="$ldflags" -o "$out/etcd" .
}
build_crane() {
    "$go" build -trimpath -ldflags="$ldflags" -o "$out/crane" \
        github.com/google/go-containerregistry/cmd/crane
}
build_oras() {
    "$go" build -trimpath -ldflags="$ldflags" -o "$out/oras" oras.land/oras/cmd/oras
}
build_conformance_v11() {
    "$go" test -c -trimpath -ldflags="$ldflags" -o "$out/conformance-v1.1" \
        github.com/opencontainers/distribution-spec/conformance
}
# SeaweedFS's single `weed` binary (master, volume, filer and S3 gateway in one).
build_seaweedfs() {
    "$go" build -trimpath -ldflags="$ldflags" -o "$out/weed" github.com/seaweedfs/seaweedfs/weed
}
build_helm() {
    "$go" build -trimpath \
        -ldflags="$ldflags -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
        -o "$out/helm" helm.sh/helm/v3/cmd/helm
}
build_conformance() {
    local pkg=github.com/opencontainers/distribution-spec/conformance
    "$go" build -trimpath -ldflags="$ldflags" -o "$out/conformance" "$pkg"
    "$go" test -c -trimpath -ldflags="$ldflags" -o "$out/conformance.test" "$pkg"
}

check_pin kubernetes k8s.io/kubernetes "$KUBERNETES_VERSION"
if ! grep -q "k8s.io/api => k8s.io/api $KUBERNETES_STAGING_VERSION\$" \
    "$here/go/kubernetes/go.mod"; then
    echo "build.sh: tools/go/kubernetes/go.mod does not replace the staging modules" \
        "with $KUBERNETES_STAGING_VERSION (tools/versions.env)" >&2
    exit 1
fi
check_pin coredns github.com/coredns/coredns "$COREDNS_VERSION"
check_pin etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
check_pin crane github.com/google/go-containerregistry "$CRANE_VERSION"
check_pin oras oras.land/oras "$ORAS_VERSION"
check_pin helm helm.sh/helm/v3 "$HELM_VERSION"
check_pin seaweedfs github.com/seaweedfs/seaweedfs "$SEAWEEDFS_VERSION"
check_pin conformance github.com/opencontainers/distribution-spec/conformance \
    "$CONFORMANCE_VERSION"
check_pin conformance-v1.1 github.com/opencontainers/distribution-spec/conformance \
    "$CONFORMANCE_V11_VERSION"

total=$EPOCHREALTIME
build_tool etcd "$ETCD_VERSION" etcd etcd -- build_etcd
build_tool crane "$CRANE_VERSION" crane crane -- build_crane
build_tool oras "$ORAS_VERSION" oras oras -- build_oras
build_tool conformance "$CONFORMANCE_VERSION" conformance conformance conformance.test \
    -- build_conformance
build_tool conformance-v1.1 "$CONFORMANCE_V11_VERSION" conformance-v1.1 conformance-v1.1 \
    -- build_conformance_v11
build_tool helm "$HELM_VERSION" helm helm -- build_helm
build_tool kubernetes "$KUBERNETES_VERSION" kubernetes \
    kube-apiserver kube-controller-manager kubectl -- build_kubernetes
build_tool kubernetes-node "$KUBERNETES_VERSION" kubernetes \
    kubelet kube-scheduler kube-proxy -- build_kubernetes_node
build_tool coredns "$COREDNS_VERSION" coredns coredns -- build_coredns
build_tool pause "$PAUSE_VERSION" pause pause -- build_pause
build_tool seaweedfs "$SEAWEEDFS_VERSION" seaweedfs weed -- build_seaweedfs
echo "go tools: $(elapsed "$total")s"

bash "$here/apt.sh"
