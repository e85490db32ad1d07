#!/usr/bin/env bash
# ferry on a kind cluster, from nothing to a smoke test, on a machine with a
# running Docker engine, kind and kubectl:
#
#   1. a 3-node cluster from conf/kubernetes/kind.yaml (no CNI, no kube-proxy),
#      or the existing one of that name;
#   2. the image from conf/kubernetes/Dockerfile, tagged ferry:dev-<commit>
#      (never `latest`), loaded onto the nodes with `kind load docker-image`;
#   3. conf/kubernetes/ferry.yaml applied with that image and this cluster's
#      API server address; waits for ferry, the nodes and CoreDNS;
#   4. smoke test in namespace ferry-smoke: pods on two nodes ping each other;
#      a Deployment behind a Service answers by ClusterIP (both endpoints),
#      by DNS name through CoreDNS, and by NodePort from outside the cluster
#      on the control-plane node, which has no endpoint of its own.
#
# Run it again after a change: it rebuilds, reloads and rolls the DaemonSet.
#
#   scripts/kind-up.sh [--name NAME] [--no-smoke] [--keep-smoke]
#   scripts/kind-up.sh [--name NAME] --delete
set -Eeuo pipefail

usage() {
  cat <<'EOF'
usage: scripts/kind-up.sh [--name NAME] [--no-smoke] [--keep-smoke]
       scripts/kind-up.sh [--name NAME] --delete

  --name NAME    kind cluster name (default: ferry); kubectl context kind-NAME
  --no-smoke     install ferry, skip the smoke test
  --keep-smoke   leave the smoke test's namespace ferry-smoke in place
  --delete       delete the cluster and exit
EOF
}

cluster=ferry
delete=false
smoke=true
keep_smoke=false
while [ $# -gt 0 ]; do
  case $1 in
    --name) [ $# -ge 2 ] || { usage >&2; exit 2; }; cluster=$2; shift 2 ;;
    --name=*) cluster=${1#--name=}; shift ;;
    --delete) delete=true; shift ;;
    --no-smoke) smoke=false; shift ;;
    --keep-smoke) keep_smoke=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "kind-up.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
# kind's rule for cluster names; the name also goes into sed below.
if ! [[ $cluster =~ ^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$ ]]; then
  echo "kind-up.sh: bad cluster name '$cluster' (lower-case letters, digits, '.', '-')" >&2
  exit 2
fi

cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
ok() { printf '    ok: %s\n' "$*"; }
# Set once the cluster is there: a failure then shows its state.
have_cluster=false
die() {
  printf 'kind-up.sh: %s\n' "$*" >&2
  if $have_cluster; then dump_state; fi
  exit 1
}

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || die "'$tool' is not installed (this script needs docker, kind and kubectl)"
done
docker info >/dev/null 2>&1 || die "no Docker engine answers ('docker info' fails); start it first"

if $delete; then
  step "deleting kind cluster '$cluster'"
  kind delete cluster --name "$cluster"
  exit 0
fi

context="kind-$cluster"
ns=ferry-smoke
# Where kind puts its nodes; a container there is outside the cluster.
kind_network=${KIND_EXPERIMENTAL_DOCKER_NETWORK:-kind}
client_image=busybox:1.37
k() { kubectl --context "$context" "$@"; }

manifest=$(mktemp "${TMPDIR:-/tmp}/ferry-kind.XXXXXX")
trap 'rm -f "$manifest"' EXIT

# What the cluster looks like, and what ferryd said.
dump_state() {
  trap - ERR
  printf '\nThe cluster is left as it is. Its state:\n' >&2
  k get nodes -o wide >&2 || true
  k get pods -A -o wide >&2 || true
  k -n kube-system logs -l app.kubernetes.io/name=ferry --all-containers --prefix --tail=40 >&2 || true
  printf '\nRetry with scripts/kind-up.sh --name %s; remove the cluster with --delete.\n' "$cluster" >&2
}
on_error() {
  printf '\nkind-up.sh: failed at line %s\n' "$1" >&2
  if $have_cluster; then dump_state; fi
}
trap 'on_error $LINENO' ERR

# --- 1. cluster --------------------------------------------------------------
clusters=$(kind get clusters 2>/dev/null || true)
if grep -qxF -- "$cluster" <<<"$clusters"; then
  step "kind cluster '$cluster' exists: using it"
else
  step "creating kind cluster '$cluster' (1 control plane, 2 workers, no CNI, no kube-proxy)"
  kind create cluster --name "$cluster" --config conf/kubernetes/kind.yaml
fi
have_cluster=true
k cluster-info >/dev/null
ok "kubectl context $context"
# A cluster made some other way has a network already: two would fight.
for other in kindnet kube-proxy; do
  if k -n kube-system get daemonset "$other" >/dev/null 2>&1; then
    have_cluster=false
    die "cluster '$cluster' runs $other: it was not made from conf/kubernetes/kind.yaml; pick another --name"
  fi
done

# --- 2. image ----------------------------------------------------------------
tag="dev-$(git rev-parse --short=12 HEAD 2>/dev/null || echo nogit)"
# Uncommitted changes: a new tag for each build, so that new pods never run
# an older image that happens to carry the same tag.
if [ -n "$(git status --porcelain 2>/dev/null || true)" ]; then
  tag="$tag-dirty-$(date +%s)"
fi
image="ferry:$tag"
step "building $image (conf/kubernetes/Dockerfile; the first build takes a while)"
DOCKER_BUILDKIT=1 docker build -f conf/kubernetes/Dockerfile -t "$image" .
step "loading $image onto the nodes"
kind load docker-image "$image" --name "$cluster"

# --- 3. ferry ----------------------------------------------------------------
step "applying conf/kubernetes/ferry.yaml (image $image, API server $cluster-control-plane:6443)"
sed -E \
  -e "s#^([[:space:]]*image:[[:space:]]*)ferry:[^[:space:]]+\$#\\1$image#" \
  -e "s#^([[:space:]]*value:[[:space:]]*)ferry-control-plane\$#\\1$cluster-control-plane#" \
  conf/kubernetes/ferry.yaml >"$manifest"
# The edit must have hit every image and the API server host: a manifest
# whose layout changed must fail here, not install the wrong image.
images=$(grep -cE '^[[:space:]]*image:' "$manifest" || true)
replaced=$(grep -cE "^[[:space:]]*image:[[:space:]]*$image\$" "$manifest" || true)
if [ "$images" -eq 0 ] || [ "$images" != "$replaced" ]; then
  die "could not set the image in ferry.yaml ($replaced of $images image lines)"
fi
grep -qE "^[[:space:]]*value:[[:space:]]*$cluster-control-plane\$" "$manifest" ||
  die "could not set the API server host in ferry.yaml"
k apply -f "$manifest"

step "waiting for ferry on every node"
k -n kube-system rollout status daemonset/ferry --timeout=300s
step "waiting for the nodes to be Ready (ferryd has written their CNI conflist)"
k wait --for=condition=Ready node --all --timeout=300s
step "waiting for CoreDNS (its pods need the pod network, and the API by ClusterIP)"
k -n kube-system rollout status deployment/coredns --timeout=300s
k get nodes -o wide

if ! $smoke; then
  step "done (no smoke test)"
  exit 0
fi

# --- 4. smoke test -----------------------------------------------------------
read -r -a workers <<<"$(k get nodes -l '!node-role.kubernetes.io/control-plane' \
  -o jsonpath='{.items[*].metadata.name}')"
[ "${#workers[@]}" -ge 2 ] || die "need two worker nodes, found ${#workers[@]}"
control_plane="$cluster-control-plane"
cp_ip=$(k get node "$control_plane" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
[ -n "$cp_ip" ] || die "node $control_plane has no InternalIP"

step "smoke test in namespace $ns: clients on ${workers[0]} and ${workers[1]}, web on both"
k delete namespace "$ns" --ignore-not-found --wait=true
# \$ leaves a variable to the container's shell.
k apply -f - <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $ns
---
apiVersion: v1
kind: Pod
metadata:
  name: client-a
  namespace: $ns
spec:
  nodeSelector:
    kubernetes.io/hostname: ${workers[0]}
  terminationGracePeriodSeconds: 1
  containers:
    - name: client
      image: $client_image
      command: [sleep, "86400"]
---
apiVersion: v1
kind: Pod
metadata:
  name: client-b
  namespace: $ns
spec:
  nodeSelector:
    kubernetes.io/hostname: ${workers[1]}
  terminationGracePeriodSeconds: 1
  containers:
    - name: client
      image: $client_image
      command: [sleep, "86400"]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: $ns
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      # One per worker: one endpoint is always on another node than the client.
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            - topologyKey: kubernetes.io/hostname
              labelSelector:
                matchLabels:
                  app: web
      terminationGracePeriodSeconds: 1
      containers:
        - name: web
          image: $client_image
          env:
            - name: POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
          # Answers every request with its pod's name.
          command: [sh, -c, 'mkdir -p /www && echo "\$POD_NAME" >/www/index.html && exec httpd -f -p 8080 -h /www']
          ports:
            - containerPort: 8080
          readinessProbe:
            httpGet:
              path: /
              port: 8080
            periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: $ns
spec:
  type: NodePort
  selector:
    app: web
  ports:
    - port: 80
      targetPort: 8080
EOF
k -n "$ns" wait --for=condition=Ready pod/client-a pod/client-b --timeout=180s
k -n "$ns" rollout status deployment/web --timeout=180s

ip_a=$(k -n "$ns" get pod client-a -o jsonpath='{.status.podIP}')
ip_b=$(k -n "$ns" get pod client-b -o jsonpath='{.status.podIP}')
step "pod to pod across nodes: client-a $ip_a (${workers[0]}) <-> client-b $ip_b (${workers[1]})"
k -n "$ns" exec client-a -- ping -c 3 -W 2 "$ip_b"
k -n "$ns" exec client-b -- ping -c 3 -W 2 "$ip_a"
ok "ping both ways"

# want: the web pods' names, one a line, sorted.
want=$(k -n "$ns" get pods -l app=web -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' | sort)
# check WHAT RUN...: RUN prints one answer a line; every answer must be a web
# pod, and over 20 requests (each endpoint chosen with chance 1/2) both must
# answer: a miss by chance has odds 2^-19.
check_answers() {
  local what=$1 got stray
  shift
  got=$("$@") || die "$what: a request failed"
  [ -n "$got" ] || die "$what: no answer"
  stray=$(grep -vxF -f <(printf '%s\n' "$want") <<<"$got" || true)
  [ -z "$stray" ] || die "$what: an answer that is no web pod: $(head -n1 <<<"$stray")"
  [ "$(sort -u <<<"$got")" = "$want" ] ||
    die "$what: not every endpoint answered; got: $(sort <<<"$got" | uniq -c | tr -s ' \n' ' ')"
  ok "$what: $(wc -l <<<"$got" | tr -d ' ') answers, from ${want//$'\n'/ }"
}
# The loop runs in the client's shell; the URL is its $1.
# shellcheck disable=SC2016 # expanded there, not here
fetch20='for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do wget -qO- -T 5 "$1" || exit 1; done'

cluster_ip=$(k -n "$ns" get service web -o jsonpath='{.spec.clusterIP}')
step "Service by ClusterIP: http://$cluster_ip/ from client-a"
check_answers "ClusterIP $cluster_ip" k -n "$ns" exec client-a -- sh -c "$fetch20" sh "http://$cluster_ip/"

name="web.$ns.svc.cluster.local"
step "Service by DNS name through CoreDNS: http://$name/ from client-b"
k -n "$ns" exec client-b -- nslookup "$name"
check_answers "DNS $name" k -n "$ns" exec client-b -- sh -c "$fetch20" sh "http://$name/"

node_port=$(k -n "$ns" get service web -o jsonpath='{.spec.ports[0].nodePort}')
step "Service by NodePort from outside the cluster: http://$cp_ip:$node_port/ ($control_plane, no local endpoint), from a container on Docker network '$kind_network'"
check_answers "NodePort $cp_ip:$node_port" \
  docker run --rm --network "$kind_network" "$client_image" sh -c "$fetch20" sh "http://$cp_ip:$node_port/"

if $keep_smoke; then
  step "smoke test passed; namespace $ns kept"
else
  step "smoke test passed; removing namespace $ns"
  k delete namespace "$ns" --wait=false
fi

cat <<EOF

ferry runs on kind cluster '$cluster' (context $context):
  kubectl --context $context -n kube-system get pods -l app.kubernetes.io/name=ferry -o wide
  kubectl --context $context -n kube-system exec ds/ferry -- ferryctl status
  scripts/kind-up.sh --name $cluster --delete
EOF
