#!/usr/bin/env bash
# Runs each fuzz target for a bounded time: `fuzz/run.sh [seconds-per-target]`.
# Targets: envelope (backend frames and tab messages), handshake (request
# headers, cookies, subprotocols), config (proxy.toml text), graphql (a
# graphql session's frames from tabs and server, in any order), mqtt (an
# mqtt session's bytes from tabs and broker, cut anywhere, in any order).
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 enables them on the
# stable toolchain this project builds with.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for target in envelope handshake config graphql mqtt; do
  echo "== fuzz $target for ${secs}s"
  cargo fuzz run -O "$target" -- -max_total_time="$secs" -max_len=4096 2>&1 | grep -E '^Done|ERROR|panicked' || true
  # A crash leaves an artifact and a non-zero status from cargo fuzz.
  if ls "artifacts/$target"/crash-* >/dev/null 2>&1; then
    echo "fuzz target $target crashed: see fuzz/artifacts/$target"; exit 1
  fi
done
