#!/usr/bin/env bash
# Fetches QEMU's source (the Debian bookworm-backports package's upstream tarball, the QEMU that
# scripts/install-qemu.sh installs) and unpacks the parts the tests read: scripts/analyze-migration.py,
# QEMU's own migration-stream parser, which the interop tests run (with python3) as an independent
# check of `inspect --devices`. Tests find it under /tmp/qemu-src/qemu-<version>/, or wherever
# MULTIFD_ANALYZE_MIGRATION points.
#
#   bash scripts/get-qemu-source.sh         # as root (it adds a deb-src line and runs apt-get update)
#   sudo bash scripts/get-qemu-source.sh    # as a user with sudo
#
# Environment: QEMU_SRC_DIR (default /tmp/qemu-src), DEBIAN_MIRROR (default: the one apt uses).
# Prints the unpacked folder. QEMU is GPL-2.0: read it, never copy it into this repository.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib/debian.sh
. "$here/lib/debian.sh"
me=$(basename "$0")
dir=${QEMU_SRC_DIR:-/tmp/qemu-src}

existing=$(ls -d "$dir"/qemu-*/scripts/analyze-migration.py 2>/dev/null | sort | tail -n1 || true)
if [ -n "$existing" ]; then
  echo "$me: already there" >&2
  dirname "$(dirname "$existing")"
  exit 0
fi
need_root "$0"
suite=bookworm-backports
if ! grep -qsE "^[^#]*deb-src[[:space:]].*[[:space:]]$suite([[:space:]]|\$)" /etc/apt/sources.list /etc/apt/sources.list.d/*.list &&
   ! grep -qsE "^Types:.*deb-src" /etc/apt/sources.list.d/*.sources; then
  printf '# Added by multifd %s: QEMU source for the tests\ndeb-src %s %s main\n' "$me" "$(debian_mirror)" "$suite" \
    >/etc/apt/sources.list.d/multifd-qemu-source.list
fi
apt-get update -q >/dev/null
mkdir -p "$dir"
cd "$dir"
# Only the upstream tarball matters; the Debian packaging around it is not needed.
apt-get source --download-only "qemu/$suite" >/dev/null 2>&1 || true
tarball=$(ls qemu_*.orig.tar.* 2>/dev/null | sort | tail -n1 || true)
[ -n "$tarball" ] || { echo "$me: could not download QEMU's source (apt-get source qemu/$suite)" >&2; exit 1; }
# head stops reading early; tar then dies of SIGPIPE, which pipefail would turn into a failure.
top=$( (tar tf "$tarball" || true) | head -n1 | cut -d/ -f1)
tar xf "$tarball" "$top/scripts/analyze-migration.py" "$top/migration" "$top/docs/devel/migration"
echo "$dir/$top"
