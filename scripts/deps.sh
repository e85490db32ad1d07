#!/usr/bin/env bash
# Install, from Debian's packages, what ferry's demos, tests and benchmarks
# use when it is missing. Sourced by scripts/test.sh and scripts/demo*.sh.

# ferry_need CHECK:PACKAGE ... where CHECK is a command name or a path that
# must exist; installs the packages whose check fails, in one apt run.
ferry_need() {
  local need=() item check pkg
  for item in "$@"; do
    check=${item%%:*} pkg=${item#*:}
    if [[ $check == /* ]]; then [ -e "$check" ] && continue
    else command -v "$check" >/dev/null && continue; fi
    need+=("$pkg")
  done
  [ ${#need[@]} -gt 0 ] || return 0
  echo "==> installing ${need[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "need root to install packages (and to make network namespaces)" >&2
    return 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # podman's package ships /etc/cni/net.d/87-podman-bridge.conflist; /etc/cni stays untouched.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o 'Dpkg::Options::=--path-exclude=/etc/cni' -o 'Dpkg::Options::=--path-exclude=/etc/cni/*' \
    "${need[@]}" >/dev/null
}

# What building ferry needs beyond the Rust toolchain (etcd-client's build
# script runs protoc). Every script that runs cargo starts from this list.
ferry_build_deps() {
  ferry_need protoc:protobuf-compiler
}

# What the demos need: the build, plus the tools they run.
ferry_demo_deps() {
  ferry_build_deps
  ferry_need ip:iproute2 nft:nftables ping:iputils-ping jq:jq iperf3:iperf3 \
    /usr/bin/python3:python3
}

# Everything the tests and benchmarks run against.
ferry_install_deps() {
  ferry_demo_deps
  ferry_need conntrack:conntrack iptables:iptables etcd:etcd-server etcdctl:etcd-client \
    sysctl:procps /usr/lib/cni/bridge:containernetworking-plugins \
    podman:podman /usr/share/doc/busybox-static:busybox-static
}
