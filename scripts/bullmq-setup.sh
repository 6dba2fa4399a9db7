#!/usr/bin/env bash
# Installs (once) BullMQ, pinned by bench/bullmq/package-lock.json, for bench/'s BullMQ rows.
#
#   scripts/bullmq-setup.sh           # -> prints the directory holding bench.mjs and node_modules/ as the
#                                     #    last line of stdout
#
# The install lives at ${CELERITY_BULLMQ:-<repo>/target/bullmq}. `npm ci` runs only when the marker file
# there does not match the lock file's checksum, so repeated calls are cheap; bench.mjs is copied in on
# every call. An exclusive flock on "<dir>.lock" serializes concurrent calls. npm's output goes to
# stderr, so stdout carries only the path. Needs node (≥ 18) and npm on PATH.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$repo/bench/bullmq"
dir="${CELERITY_BULLMQ:-$repo/target/bullmq}"

for tool in node npm; do
  command -v "$tool" >/dev/null 2>&1 || { echo "bullmq-setup: $tool not found on PATH" >&2; exit 1; }
done

mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9

want="bullmq-setup v1 $(sha256sum "$src/package-lock.json" | cut -d' ' -f1)"
if [[ ! -f "$dir/.installed" || "$(cat "$dir/.installed")" != "$want" ]]; then
  rm -rf "$dir"
  mkdir -p "$dir"
  cp "$src/package.json" "$src/package-lock.json" "$dir/"
  (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error 1>&2)
  echo "$want" >"$dir/.installed"
fi
cp "$src/bench.mjs" "$dir/bench.mjs"
echo "$dir"
