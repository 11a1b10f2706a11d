#!/usr/bin/env bash
# The README's first command: build sovkms and run the two-region scenario
# (development PKI, two eu-central brokers over a throwaway PostgreSQL and
# a us-east broker, encrypt in-region,
# decrypt refused from outside), then stop everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/deps.sh
echo "building sovkms (release; the first build takes a few minutes)..."
cargo build --release --quiet --bin sovkms
exec target/release/sovkms demo --dir .quickstart
