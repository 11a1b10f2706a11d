#!/usr/bin/env bash
# Installs what sovkms needs to build and test, when it is missing.
# Debian 12 / Ubuntu; needs root or sudo for apt. Safe to run repeatedly.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

have protoc || need+=(protobuf-compiler)
# SoftHSM2: the PKCS#11 token of the quickstart and the tests; opensc gives
# pkcs11-tool, which the tests use to inspect the root key from outside.
have softhsm2-util || need+=(softhsm2)
have pkcs11-tool || need+=(opensc)
for p in pkg-config; do pkg_installed "$p" || need+=("$p"); done
# TPM 2.0: libtss2-dev to build tss-esapi; swtpm for the tests' software
# TPMs; tpm2-tools for tpm2_checkquote (the auditor's verifier).
pkg_installed libtss2-dev || need+=(libtss2-dev)
have swtpm || need+=(swtpm swtpm-tools)
have tpm2_checkquote || need+=(tpm2-tools)
# strace: a test watches the broker's syscalls to prove "record synced,
# then answer sent" (the page cache would hide a missing sync from kill -9).
have strace || need+=(strace)
# Python venv support for PyKMIP, the third-party KMIP client of the
# interop test (Debian ships venv separately).
pkg_installed python3-venv || need+=(python3-venv)
# systemd-analyze checks the hardened unit (verify, security exposure).
have systemd-analyze || need+=(systemd)
# PostgreSQL server binaries: tests, benchmarks and the demo start their
# own throwaway clusters (initdb, pg_ctl) for brokers that share a region's
# database. No cluster of the distribution's is wanted: none is created.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    need+=(postgresql)
    if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO mkdir -p /etc/postgresql-common
        echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
    fi
fi

if ((${#need[@]})); then
    echo "deps: installing ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# A venv of the project's own (never the system's packages): PyKMIP, run
# by the KMIP interop test against a real broker; PyYAML,
# kubernetes-validate and promql-parser, which check the deployment files.
py=/usr/bin/python3
[ -x "$py" ] || py=python3
venv="$(dirname "$0")/../target/pyvenv"
if ! "$venv/bin/python" -c "import kmip, yaml, kubernetes_validate, promql_parser" >/dev/null 2>&1; then
    echo "deps: creating $venv with PyKMIP and the deployment checkers"
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "pykmip==0.11.0" \
        "PyYAML==6.0.4" "kubernetes-validate==1.37.0" "promql-parser==0.12.0"
fi

if ! have cargo; then
    echo "deps: cargo (Rust >= 1.85) is required: https://rustup.rs" >&2
    exit 1
fi
