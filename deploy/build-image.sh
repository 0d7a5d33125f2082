#!/usr/bin/env bash
# Builds a statically linked clawfleet and the FROM-scratch image around it
# (deploy/Dockerfile). No base image is pulled: the image holds the binary, an
# empty /data owned by the image's user, a /tmp, and the two files glibc's
# resolver reads (/etc/nsswitch.conf, and /etc/passwd + /etc/group naming the
# default user). Nothing else: no shell, no libc, no CA certificates.
#   IMAGE             tag to build (default clawfleet:dev)
#   CARGO_TARGET_DIR  cargo target dir (default <repo>/target/image, apart from
#                     the ordinary build so the two never wait on each other)
#   CARGO             cargo to run (default cargo)
#   PROFILE           cargo profile (default release; the tests use image-test,
#                     unoptimised and quick to build, see Cargo.toml)
# Progress goes to stderr; the only line on stdout is the image id.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
image="${IMAGE:-clawfleet:dev}"
triple="x86_64-unknown-linux-gnu"
target_dir="${CARGO_TARGET_DIR:-$root/target/image}"
# The image's default user: 65532 is distroless's "nonroot", a uid no host account uses.
uid=65532
gid=65532

# CARGO_ENCODED_RUSTFLAGS, if inherited, would override RUSTFLAGS. With an
# explicit --target, RUSTFLAGS reach only the target's crates, not build
# scripts or proc macros (which must stay dynamic to be loaded by rustc).
unset CARGO_ENCODED_RUSTFLAGS
echo "build-image.sh: building a static clawfleet (cargo target dir $target_dir)" >&2
profile="${PROFILE:-release}"
RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_STRIP=symbols \
  CARGO_TARGET_DIR="$target_dir" \
  "${CARGO:-cargo}" build --profile "$profile" --manifest-path "$root/Cargo.toml" \
  --bin clawfleet --target "$triple" >&2
binary="$target_dir/$triple/$profile/clawfleet"

# A scratch image has no dynamic loader and no shared libraries.
if readelf --program-headers --dynamic "$binary" | grep -Eq 'INTERP|\(NEEDED\)'; then
  echo "build-image.sh: $binary is dynamically linked" >&2
  exit 1
fi

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/clawfleet"
cp "$root/deploy/Dockerfile" "$context/Dockerfile"
mkdir -p "$context/rootfs/etc" "$context/rootfs/tmp" "$context/data"
# COPY keeps the context's mode bits: /tmp world-writable and sticky, like any /tmp.
chmod 1777 "$context/rootfs/tmp"
chmod 0755 "$context/rootfs" "$context/rootfs/etc"
# Without nsswitch.conf a static glibc looks names up with `dns [!UNAVAIL=return]
# files`: a name the DNS server denies (`localhost`, an --add-host entry) would
# never reach /etc/hosts. Files first, as every distribution configures it.
cat >"$context/rootfs/etc/nsswitch.conf" <<'EOF'
passwd:   files
group:    files
hosts:    files dns
networks: files
EOF
cat >"$context/rootfs/etc/passwd" <<EOF
root:x:0:0:root:/:/sbin/nologin
clawfleet:x:$uid:$gid:clawfleet:/data:/sbin/nologin
EOF
cat >"$context/rootfs/etc/group" <<EOF
root:x:0:
clawfleet:x:$gid:
EOF
chmod 0644 "$context/rootfs/etc/"*

revision="$(git -C "$root" describe --always --dirty --abbrev=12 2>/dev/null || echo unknown)"
version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)"
previous="$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
echo "build-image.sh: docker build --tag $image ($(du -h "$binary" | cut -f1) binary)" >&2
id="$(docker build --quiet --tag "$image" \
  --build-arg "VERSION=${version:-unknown}" \
  --build-arg "REVISION=$revision" \
  "$context")"
# The image this tag named before is left untagged by the rebuild: remove it, unless a
# container or another tag still uses it (then docker refuses, and that is fine).
if [ -n "$previous" ] && [ "$previous" != "$id" ]; then
  docker image rm "$previous" >/dev/null 2>&1 || true
fi
echo "$id"
