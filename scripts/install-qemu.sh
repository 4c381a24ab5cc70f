#!/usr/bin/env bash
# Installs QEMU >= 10 (qemu-system-x86_64 and qemu-img), which multifd needs to
# interoperate with and to run its interop tests.
#
#   bash scripts/install-qemu.sh         # as root
#   sudo bash scripts/install-qemu.sh    # as a user with sudo
#
# The newest QEMU (11.x) comes from scripts/install-qemu-latest.sh.
#
# Debian 12 (bookworm) ships QEMU 7.2, so there the packages come from
# bookworm-backports, which is added to the apt sources if it is not there yet.
# Debian 13 (trixie) and newer ship QEMU >= 10 in the regular archive.
#
# Safe to run again: it does nothing when a new enough QEMU is already installed.
# Environment:
#   QEMU_MIN_MAJOR   lowest acceptable major version (default 10)
#   DEBIAN_MIRROR    mirror for the backports source (default: the one apt already uses,
#                    else http://deb.debian.org/debian)
set -euo pipefail

min_major=${QEMU_MIN_MAJOR:-10}
me=$(basename "$0")

say() { printf '%s: %s\n' "$me" "$*"; }
die() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

installed_major() {
  if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then echo 0; return; fi
  local v
  v=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9][0-9]*\)\..*/\1/p' | head -n1)
  echo "${v:-0}"
}

report() {
  say "installed: $(qemu-system-x86_64 --version | head -n1)"
  if command -v qemu-img >/dev/null 2>&1; then
    say "installed: $(qemu-img --version | head -n1)"
  fi
}

if [ "$(installed_major)" -ge "$min_major" ] && command -v qemu-img >/dev/null 2>&1; then
  say "QEMU is already new enough (>= $min_major), nothing to do"
  report
  exit 0
fi

[ -r /etc/os-release ] || die "cannot read /etc/os-release; this script supports Debian 12 or newer only"
# shellcheck disable=SC1091
. /etc/os-release
if [ "${ID:-}" != debian ] && [[ " ${ID_LIKE:-} " != *" debian "* ]]; then
  die "unsupported distribution '${ID:-unknown}'. Install QEMU >= $min_major with your package manager (it must provide qemu-system-x86_64 and qemu-img)"
fi
if [ "${ID:-}" != debian ]; then
  die "'${ID}' is Debian-based but not Debian; its archive layout differs, so install QEMU >= $min_major from your distribution instead"
fi
codename=${VERSION_CODENAME:-}
[ -n "$codename" ] || die "could not determine the Debian release codename from /etc/os-release"

[ "$(id -u)" = 0 ] || die "must run as root (apt-get installs packages): as root: bash $0   (as a user: sudo bash $0)"
command -v apt-get >/dev/null 2>&1 || die "apt-get not found"

# Only files apt actually reads: a renamed *.disabled file must not count.
apt_sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && printf '%s\n' "$f"
  done
  return 0
}

release=()
case "$codename" in
  buster|bullseye)
    die "Debian '$codename' is too old: no QEMU >= $min_major is packaged for it. Upgrade to Debian 12 or newer" ;;
  bookworm)
    suite=bookworm-backports
    # apt reads both one-line .list files and deb822 .sources files; either may already name it.
    mapfile -t sources < <(apt_sources)
    if [ "${#sources[@]}" -gt 0 ] && grep -qs -E "^[^#]*[[:space:]]$suite([[:space:]]|\$)" "${sources[@]}"; then
      say "apt already has a $suite source"
    else
      mirror=${DEBIAN_MIRROR:-}
      if [ -z "$mirror" ]; then
        mirror=$( { [ "${#sources[@]}" -gt 0 ] && grep -hs -E '^(deb[[:space:]]|URIs:)' "${sources[@]}"; } \
          | grep -oE '[a-z]+://[^[:space:]]*/debian/?([[:space:]]|$)' | head -n1 | tr -d '[:space:]' || true)
      fi
      mirror=${mirror:-http://deb.debian.org/debian}
      list=/etc/apt/sources.list.d/multifd-bookworm-backports.list
      say "adding $suite from $mirror to $list"
      printf '# Added by multifd %s for QEMU >= %s\ndeb %s %s main\n' "$me" "$min_major" "$mirror" "$suite" > "$list"
    fi
    release=(-t "$suite")
    ;;
  *)
    # trixie, forky, sid and later carry QEMU >= 10 in the main archive.
    say "Debian '$codename': installing from the regular archive"
    ;;
esac

export DEBIAN_FRONTEND=noninteractive
say "running apt-get update"
apt-get update -q
say "installing qemu-system-x86 and qemu-utils ${release[*]:-}"
apt-get install -y -q --no-install-recommends "${release[@]}" qemu-system-x86 qemu-utils

have=$(installed_major)
if [ "$have" -lt "$min_major" ]; then
  die "QEMU $have is installed but multifd needs >= $min_major; check 'apt-cache policy qemu-system-x86'"
fi
report
