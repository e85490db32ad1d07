#!/usr/bin/env bash
# Install what ferry's demo, tests and benchmarks use, from Debian's packages,
# when it is missing. Sourced by scripts/test.sh and scripts/demo*.sh.
ferry_install_deps() {
  local need=()
  command -v ip >/dev/null || need+=(iproute2)
  command -v nft >/dev/null || need+=(nftables)
  command -v ping >/dev/null || need+=(iputils-ping)
  command -v iperf3 >/dev/null || need+=(iperf3)
  command -v conntrack >/dev/null || need+=(conntrack)
  command -v iptables >/dev/null || need+=(iptables)
  command -v etcd >/dev/null || need+=(etcd-server)
  command -v protoc >/dev/null || need+=(protobuf-compiler)
  command -v jq >/dev/null || need+=(jq)
  command -v sysctl >/dev/null || need+=(procps)
  [ -x /usr/bin/python3 ] || need+=(python3)
  [ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
  command -v podman >/dev/null || need+=(podman)
  dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
  if [ ${#need[@]} -gt 0 ]; then
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
  fi
}
