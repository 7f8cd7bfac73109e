#!/bin/sh
# Build pier's own image from an already built binary, with `docker import`:
# no registry, no `docker build`. The rootfs is Debian's busybox-static, the
# pier binary with the shared libraries it links (glibc), and the CA
# certificates directory.
#
#   docker/build-image.sh [BINARY] [TAG]
#
# BINARY defaults to target/release/pier, else target/debug/pier;
# TAG defaults to $PIER_IMAGE, else pier:latest.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-}
if [ -z "$bin" ]; then
    if [ -x "$here/target/release/pier" ]; then bin="$here/target/release/pier"
    else bin="$here/target/debug/pier"; fi
fi
tag=${2:-${PIER_IMAGE:-pier:latest}}
busybox=${BUSYBOX:-/bin/busybox}

[ -x "$bin" ] || { echo "build-image: no pier binary at $bin (cargo build -p pier --release)" >&2; exit 1; }
[ -x "$busybox" ] || { echo "build-image: $busybox missing (apt-get install busybox-static)" >&2; exit 1; }
if ldd "$busybox" >/dev/null 2>&1; then
    echo "build-image: $busybox is dynamically linked; use busybox-static" >&2; exit 1
fi

rootfs=$(mktemp -d /tmp/pier-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT INT TERM

mkdir -p "$rootfs/bin" "$rootfs/etc/pier/certs" "$rootfs/etc/ssl/certs" \
         "$rootfs/var/lib/pier" "$rootfs/tmp" "$rootfs/root" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev"
chmod 1777 "$rootfs/tmp"

cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$rootfs/bin/$applet"
done
ln -s bin "$rootfs/sbin"

cp "$bin" "$rootfs/bin/pier"
# Debug info is for the build host; the image stays small without it.
if command -v strip >/dev/null 2>&1; then strip --strip-debug "$rootfs/bin/pier"; fi

# The binary is linked against glibc: copy the loader and libraries it needs,
# at the same paths (ldd prints "name => /path (addr)" or "/path (addr)").
for lib in $(ldd "$bin" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }'); do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done
# NSS modules: resolving names through /etc/hosts and DNS in the container.
for lib in /lib/x86_64-linux-gnu/libnss_files.so.2 /lib/x86_64-linux-gnu/libnss_dns.so.2 \
           /lib/x86_64-linux-gnu/libresolv.so.2; do
    [ -e "$lib" ] && mkdir -p "$rootfs$(dirname "$lib")" && cp -L "$lib" "$rootfs$lib"
done

if [ -d /etc/ssl/certs ]; then cp -RL /etc/ssl/certs/. "$rootfs/etc/ssl/certs/" 2>/dev/null || true; fi

printf 'root:x:0:0:root:/root:/bin/sh\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\n' > "$rootfs/etc/group"
printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"

version=$("$bin" --version 2>/dev/null | awk '{print $2}')
tar -C "$rootfs" -c . | docker import \
    -c 'ENTRYPOINT ["/bin/pier"]' \
    -c 'CMD ["agent", "--config", "/etc/pier/pier.toml"]' \
    -c 'WORKDIR /' \
    -c 'ENV PATH=/bin' \
    -c "LABEL org.opencontainers.image.title=pier org.opencontainers.image.version=${version:-unknown}" \
    -m "pier ${version:-unknown} from $bin" \
    - "$tag" >/dev/null
echo "$tag"
