#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine; does nothing when it is already there.
set -euo pipefail
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v faketime >/dev/null 2>&1 || need+=(faketime)
# A real etcd for tests/etcd_process.rs and tests/etcd_cluster_process.rs (single etcds and a
# three-member cluster, started by the tests themselves), and etcdctl.
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
