#!/usr/bin/env bash
# Builds osstream-agent the way it ships: optimised, statically linked (+crt-static on the
# gnu target, the only one here) and stripped, so it runs in any initramfs without
# libraries. Output: target/x86_64-unknown-linux-gnu/release/osstream-agent.
# --target keeps the static flag off build scripts and proc macros, which run on the host.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --profile agent --locked -p osstream-agent --target "$target"
binary="${CARGO_TARGET_DIR:-target}/$target/agent/osstream-agent"
size=$(stat -c %s "$binary")
echo "== $binary: $((size / 1024)) KiB, $(file -b "$binary" 2>/dev/null | cut -d, -f1-2)"
limit=$((8 * 1024 * 1024))
if [ "$size" -gt "$limit" ]; then
  echo "osstream-agent is $size bytes, over its 8 MiB budget" >&2
  exit 1
fi
