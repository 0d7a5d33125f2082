#!/usr/bin/env bash
# Builds the statically linked agent-stub and the FROM-scratch image around it.
#   IMAGE             tag to build (default clawfleet-agent-stub:dev)
#   CARGO_TARGET_DIR  cargo target dir (default <repo>/target/agent-stub)
# Progress goes to stderr; the only line on stdout is the image id.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
image="${IMAGE:-clawfleet-agent-stub:dev}"
triple="x86_64-unknown-linux-gnu"
target_dir="${CARGO_TARGET_DIR:-$root/target/agent-stub}"

# CARGO_ENCODED_RUSTFLAGS, if inherited, would override RUSTFLAGS.
unset CARGO_ENCODED_RUSTFLAGS
RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_STRIP=symbols \
  CARGO_TARGET_DIR="$target_dir" \
  "${CARGO:-cargo}" build --release --manifest-path "$root/Cargo.toml" \
  -p clawfleet-agent-stub --target "$triple" >&2
binary="$target_dir/$triple/release/agent-stub"

# A scratch image has no dynamic loader and no shared libraries.
if readelf --program-headers --dynamic "$binary" | grep -Eq 'INTERP|\(NEEDED\)'; then
  echo "build-image.sh: $binary is dynamically linked" >&2
  exit 1
fi

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/agent-stub"
cp "$root/deploy/agent-stub/Dockerfile" "$context/Dockerfile"
docker build --quiet --tag "$image" "$context"
