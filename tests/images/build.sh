#!/usr/bin/env bash
# Builds pier's test images without a registry: `docker import` of a rootfs
# made from Debian's busybox-static (httpd, nc, sh, hostname; about 2 MB).
#
#   pier-test/httpd:latest   serves its hostname on :8080 (`wget -qO- http://IP:8080/`);
#                            also holds /bin/udp-echo PORT (udp-echo.c, built
#                            static here): answers each datagram with
#                            "HOSTNAME:DATAGRAM"
#
# Labelled pier.test-image=VERSION; tests/lib.rs rebuilds an older one.
# Idempotent: the same name always holds the same content.
set -euo pipefail
BUSYBOX=${BUSYBOX:-/bin/busybox}
[ -x "$BUSYBOX" ] || { echo "images/build.sh: $BUSYBOX missing; apt-get install busybox-static" >&2; exit 1; }
file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' || \
  ldd "$BUSYBOX" 2>&1 | grep -q 'not a dynamic' || { echo "images/build.sh: $BUSYBOX is not static" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,www,tmp,etc}
cp "$BUSYBOX" "$root/bin/busybox"
# -static: the image has no libc.
cc -O2 -static -o "$root/bin/udp-echo" "$(dirname "$0")/udp-echo.c"
for applet in $("$BUSYBOX" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
echo 'root:x:0:0:root:/:/bin/sh' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"
# The static busybox links glibc: without these its wget crashes in NSS
# (getservbyname) and name lookups have no sources. (Its `wget -T` crashes
# regardless: leave -T out.)
printf 'hosts: files dns\nservices: files\n' > "$root/etc/nsswitch.conf"
printf 'http 80/tcp\nhttps 443/tcp\n' > "$root/etc/services"
chmod 1777 "$root/tmp"
old=$(docker image inspect -f '{{.Id}}' pier-test/httpd:latest 2>/dev/null || true)
tar -C "$root" -c . | docker import \
  -c 'ENV PATH=/bin' \
  -c 'EXPOSE 8080' \
  -c 'LABEL pier.test-image=2' \
  -c 'CMD ["/bin/sh","-c","hostname > /www/index.html && exec httpd -f -p 8080 -h /www"]' \
  - pier-test/httpd:latest >/dev/null
# The previous build lost its name; remove it unless a container still uses it.
new=$(docker image inspect -f '{{.Id}}' pier-test/httpd:latest)
if [ -n "$old" ] && [ "$old" != "$new" ]; then
  docker image rm "$old" >/dev/null 2>&1 || true
fi
echo "built pier-test/httpd:latest"
