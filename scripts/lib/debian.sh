# Helpers for the scripts/ installers (sourced, not run). Debian only.

# The Debian archive this machine's apt already uses (so nothing here names a host): the first
# .../debian URI in the apt sources, deb822 (.sources) or one-line (.list). DEBIAN_MIRROR wins;
# http://deb.debian.org/debian when apt names none.
debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then printf '%s\n' "${DEBIAN_MIRROR%/}"; return; fi
  local f m=""
  for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    m=$(awk '
      /^[[:space:]]*#/ { next }
      $1 == "URIs:" { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }
      $1 == "deb" || $1 == "deb-src" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\// && $i ~ /\/debian\/?$/) { print $i; exit } }
    ' "$f")
    [ -n "$m" ] && break
  done
  m=${m:-http://deb.debian.org/debian}
  printf '%s\n' "${m%/}"
}

# How to run this script again with root rights, for messages: works from a root shell
# (no sudo there) and from a user shell with sudo.
as_root_hint() {
  printf 'as root: bash %s   (as a user: sudo bash %s)' "$1" "$1"
}

need_root() {
  if [ "$(id -u)" != 0 ]; then
    printf '%s: needs root (it runs apt-get): %s\n' "$(basename "$1")" "$(as_root_hint "$1")" >&2
    exit 1
  fi
}
