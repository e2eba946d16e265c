#!/usr/bin/env bash
# `make e2e-kind`: Berth on a real cluster (kind), the same flow as the local stack's
# test (tests/integration/test_local_stack.py), with a kubelet this time:
#
#   1. kind create cluster
#   2. build the image (hack/image.sh) and `kind load` it: the tag is the project
#      version, the image the operator gives the registries it deploys
#   3. helm install helm/berth (operator, RBAC, CRDs); wait for the operator
#   4. kubectl apply -f samples/; wait until Registry main is Ready
#   5. apply the samples again: nothing may change (GitOps idempotence)
#   6. port-forward the registry's Service, read the admin credentials from its
#      Secret, push an image with skopeo and pull it back, then pull it with the robot
#      of the pull Secret Berth wrote into team-a, which may not push
#      (python -m berth_dev.smoke: the same checks as the local stack's test)
#   7. delete the cluster (also on failure; BERTH_E2E_KEEP=1 keeps it)
#
# Needs a Docker engine, Go (to build kind when it is not on PATH), skopeo, and
# `make install tools` done (the venv, helm and kubectl from the tool cache).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=tools/versions.env
source "$root/tools/versions.env"

cluster="${BERTH_E2E_CLUSTER:-berth-e2e}"
kind_version="${KIND_VERSION:-v0.33.0}"
cache="${BERTH_CACHE:-$HOME/.cache/berth}"
python="${PYTHON:-$root/.venv/bin/python}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n1)"
image_repository="ghcr.io/berth-dev/berth"
image="$image_repository:$version"
namespace=registries
registry=main
started=$EPOCHREALTIME

step() { printf '\n[%6.1fs] == %s\n' "$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { print b - a }')" "$*"; }
fail() { echo "e2e-kind: $*" >&2; exit 1; }

# --- tools ---------------------------------------------------------------------------
command -v docker >/dev/null || fail "docker is missing"
docker info >/dev/null 2>&1 || fail "no Docker engine answers (docker info failed)"
command -v skopeo >/dev/null || fail "skopeo is missing (make tools installs it)"
command -v curl >/dev/null || fail "curl is missing"
[[ -x $python ]] || fail "$python is missing: run make install"
helm="$cache/helm-$HELM_VERSION/helm"
kubectl="$cache/kubernetes-$KUBERNETES_VERSION/kubectl"
[[ -x $helm && -x $kubectl ]] || fail "helm or kubectl missing in $cache: run make tools"
if command -v kind >/dev/null; then
    kind="$(command -v kind)"
else
    kind="$cache/kind-$kind_version/kind"
    if [[ ! -x $kind ]]; then
        step "building kind $kind_version"
        GOBIN="$cache/kind-$kind_version" CGO_ENABLED=0 GOTOOLCHAIN=local \
            "${GO:-/usr/local/go/bin/go}" install "sigs.k8s.io/kind@$kind_version"
    fi
fi

workdir="$(mktemp -d "${TMPDIR:-/tmp}/berth-e2e-kind.XXXXXX")"
export KUBECONFIG="$workdir/kubeconfig"
forward_pid=""
cleanup() {
    local status=$?
    if [[ -n $forward_pid ]]; then
        kill "$forward_pid" 2>/dev/null || true
    fi
    if ((status != 0)); then
        echo "e2e-kind: failed; operator log and cluster state:" >&2
        "$kubectl" -n berth-system logs deployment/berth --tail=100 >&2 || true
        "$kubectl" get registries,repositories,deployments,pods -A >&2 || true
    fi
    if [[ -n ${BERTH_E2E_KEEP:-} ]]; then
        echo "e2e-kind: cluster $cluster kept (KUBECONFIG=$KUBECONFIG)" >&2
    else
        "$kind" delete cluster --name "$cluster" >/dev/null 2>&1 || true
        rm -rf "$workdir"
    fi
    exit "$status"
}
trap cleanup EXIT

# --- 1. the cluster ------------------------------------------------------------------
step "kind create cluster $cluster"
"$kind" create cluster --name "$cluster" --kubeconfig "$KUBECONFIG" --wait 180s

# --- 2. the image --------------------------------------------------------------------
step "docker build $image"
IMAGE="$image_repository" TAG="$version" bash hack/image.sh
step "kind load docker-image $image"
"$kind" load docker-image "$image" --name "$cluster"

# --- 3. the operator -----------------------------------------------------------------
step "helm install berth helm/berth"
"$helm" install berth helm/berth --namespace berth-system --create-namespace \
    --set image.pullPolicy=IfNotPresent --wait --timeout 5m
"$kubectl" -n berth-system rollout status deployment/berth --timeout=3m
registry_image="$("$kubectl" -n berth-system get deployment berth \
    -o jsonpath='{.spec.template.spec.containers[0].env[?(@.name=="BERTH_REGISTRY_IMAGE")].value}')"
[[ $registry_image == "$image" ]] || fail "the operator would deploy $registry_image, not $image"

# --- 4. the samples ------------------------------------------------------------------
step "kubectl apply -f samples/"
"$kubectl" apply -f samples/
"$kubectl" -n "$namespace" wait --for=condition=Ready "registry/$registry" --timeout=5m
"$kubectl" get registries,repositories -A

# --- 5. idempotence ------------------------------------------------------------------
step "kubectl apply -f samples/ again: nothing changes"
changed="$("$kubectl" apply -f samples/ | grep -v ' unchanged$' || true)"
[[ -z $changed ]] || fail "re-applying the samples changed: $changed"

# --- 6. push and pull through the Service ----------------------------------------------
step "push and pull through a port-forward of service/$registry"
port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$kubectl" -n "$namespace" port-forward "service/$registry" "$port:5000" \
    >"$workdir/port-forward.log" 2>&1 &
forward_pid=$!
# HTTPS with the generated certificate (spec.tls Generated, the default), verified
# against the Registry's CA: the certificate names 127.0.0.1 for port-forwards.
certs="$workdir/certs"
mkdir -p "$certs"
"$kubectl" -n "$namespace" get secret "$registry-serving-tls" -o 'jsonpath={.data.ca\.crt}' |
    base64 -d >"$certs/ca.crt"
for _ in $(seq 60); do
    code="$(curl -s --cacert "$certs/ca.crt" -o /dev/null -w '%{http_code}' "https://127.0.0.1:$port/v2/" || true)"
    [[ $code == 401 || $code == 200 ]] && break
    sleep 0.5
done
[[ $code == 401 || $code == 200 ]] || fail "the Service did not answer through the port-forward"
# Clients fetch their token from the challenge's realm: it must point at the address
# they used (the port-forward), not at the Service's in-cluster name.
realm="$(curl -s --cacert "$certs/ca.crt" -D - -o /dev/null "https://127.0.0.1:$port/v2/" |
    sed -n 's/^[Ww][Ww][Ww]-[Aa]uthenticate: Bearer realm="\([^"]*\)".*/\1/p')"
case "$realm" in
"" | "https://127.0.0.1:$port/"*) ;;
*) fail "token realm $realm is not reachable through the port-forward" ;;
esac
secret() {
    "$kubectl" -n "$namespace" get secret "$registry-auth" -o "jsonpath={.data.$1}" | base64 -d
}
username="$(secret admin-username)"
# The sample Repository grants team-a pull access: the robot in the Secret Berth wrote
# there must pull the image and must not push. The Secret has one entry per address
# (node proxy, Ingress, Service), all holding the same credential.
pull_secret="$("$kubectl" -n team-a get secrets -o name \
    -l "app.kubernetes.io/managed-by=berth-operator,berth.dev/registry=$registry" | head -n1)"
[[ -n $pull_secret ]] || fail "no pull Secret of $registry in namespace team-a"
robot="$("$kubectl" -n team-a get "$pull_secret" -o 'jsonpath={.data.\.dockerconfigjson}' |
    base64 -d | "$python" -c 'import json, sys; e = next(iter(json.load(sys.stdin)["auths"].values())); print(e["username"]); print(e["password"])')"
BERTH_SMOKE_PASSWORD="$(secret admin-password)" \
    BERTH_SMOKE_PULLER_PASSWORD="$(sed -n 2p <<<"$robot")" \
    "$python" -m berth_dev.smoke "127.0.0.1:$port" --cert-dir "$certs" --username "$username" \
    --puller-username "$(sed -n 1p <<<"$robot")"

step "passed"
