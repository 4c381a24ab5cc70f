#!/usr/bin/env bash
# Installs the newest QEMU Debian packages (trixie-backports: 11.x when this was written), which
# the QEMU 11 interop tests need (multifd together with postcopy, among others). It lives in its
# own Debian trixie root under QEMU_LATEST_ROOT, so the machine's own QEMU stays as it is, and a
# launcher on PATH runs it with the same arguments as qemu-system-x86_64:
#
#   bash scripts/install-qemu-latest.sh         # as root
#   sudo bash scripts/install-qemu-latest.sh    # as a user with sudo
#   qemu-system-x86_64-latest --version
#
# The launcher enters the trixie root with chroot after binding /dev, /proc, /sys and /tmp into it:
# QEMU sees the host's /tmp and nothing else of the host's files, so every path handed to it (QMP
# and migration sockets, file: URIs, disks) must be under /tmp; the tests keep theirs there.
# Networking is the host's (tcp:127.0.0.1:PORT works).
#
# Safe to run again: does nothing when the launcher already runs a QEMU >= QEMU_LATEST_MIN_MAJOR.
# Environment:
#   QEMU_LATEST_ROOT        where the trixie root goes (default /opt/qemu-latest)
#   QEMU_LATEST_LAUNCHER    the launcher's path (default /usr/local/bin/qemu-system-x86_64-latest)
#   QEMU_LATEST_MIN_MAJOR   lowest acceptable major version (default 11)
#   DEBIAN_MIRROR           the Debian archive (default: the one apt already uses)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib/debian.sh
. "$here/lib/debian.sh"

root=${QEMU_LATEST_ROOT:-/opt/qemu-latest}
launcher=${QEMU_LATEST_LAUNCHER:-/usr/local/bin/qemu-system-x86_64-latest}
min_major=${QEMU_LATEST_MIN_MAJOR:-11}
me=$(basename "$0")
log=$(mktemp /tmp/multifd-qemu-latest.XXXXXX.log)

major_of() {
  "$1" --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9][0-9]*\)\..*/\1/p' | head -n1
}

if [ -x "$launcher" ] && [ "$(major_of "$launcher")" -ge "$min_major" ] 2>/dev/null; then
  echo "$me: already installed: $("$launcher" --version | head -n1) ($launcher)"
  exit 0
fi
need_root "$0"
command -v apt-get >/dev/null 2>&1 || { echo "$me: apt-get not found; this script supports Debian only" >&2; exit 1; }

mirror=$(debian_mirror)
export DEBIAN_FRONTEND=noninteractive
fail() { echo "$me: $1 failed; the last lines of $log:" >&2; tail -n 20 "$log" >&2; exit 1; }

if ! command -v debootstrap >/dev/null 2>&1; then
  echo "$me: installing debootstrap"
  { apt-get update -q && apt-get install -y -q --no-install-recommends debootstrap; } >>"$log" 2>&1 || fail "installing debootstrap"
fi

# A root whose apt works is complete; anything else is the rest of an interrupted run.
if [ ! -x "$root/usr/bin/apt-get" ]; then
  echo "$me: building a minimal Debian trixie root in $root from $mirror (a minute or two)"
  rm -rf "$root"
  debootstrap --variant=minbase trixie "$root" "$mirror" >>"$log" 2>&1 || fail "debootstrap"
fi
printf 'deb %s trixie main\ndeb %s trixie-backports main\n' "$mirror" "$mirror" >"$root/etc/apt/sources.list"
echo "$me: installing qemu-system-x86 and qemu-utils from trixie-backports in $root"
{ chroot "$root" apt-get update -q &&
  chroot "$root" apt-get install -y -q --no-install-recommends -t trixie-backports qemu-system-x86 qemu-utils; } >>"$log" 2>&1 ||
  fail "apt-get in $root"

mkdir -p "$(dirname "$launcher")"
cat >"$launcher" <<LAUNCHER
#!/bin/sh
# qemu-system-x86_64 of the Debian trixie root $root (installed by multifd's
# scripts/install-qemu-latest.sh). Paths given to QEMU must be under /tmp: only /tmp, /dev, /proc
# and /sys of this machine are seen inside.
set -e
r='$root'
for d in dev proc sys tmp; do
  mountpoint -q "\$r/\$d" || mount --bind "/\$d" "\$r/\$d"
done
# Start in the caller's directory when the root has it (it has /tmp), so relative paths work there.
exec chroot "\$r" /bin/sh -c 'cd "\$1" 2>/dev/null || cd /; shift; exec /usr/bin/qemu-system-x86_64 "\$@"' sh "\$PWD" "\$@"
LAUNCHER
chmod 755 "$launcher"

have=$(major_of "$launcher" || true)
if [ "${have:-0}" -lt "$min_major" ] 2>/dev/null || [ -z "$have" ]; then
  echo "$me: $launcher runs QEMU ${have:-nothing}, expected >= $min_major" >&2
  exit 1
fi
rm -f "$log"
echo "$me: installed: $("$launcher" --version | head -n1) ($launcher)"
