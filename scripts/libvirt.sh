#!/usr/bin/env bash
# libvirt for the interop tests (test/interop/libvirt.test.ts): libvirtd >= 11.1 (the first with
# `virsh save --image-format sparse`), configured for a container without systemd, run by hand.
#
#   bash scripts/libvirt.sh install   # packages from bookworm-backports + qemu.conf (idempotent)
#   bash scripts/libvirt.sh start     # libvirtd in the background (no-op when it answers already)
#   bash scripts/libvirt.sh stop      # stops the libvirtd this script started, by its PID
#   bash scripts/libvirt.sh status
#
# Packages are asked for by name from bookworm-backports, never with `-t bookworm-backports`
# (that would pull the whole dependency tree, systemd included, from backports), and the install
# is refused when apt would replace or remove the installed QEMU.
set -euo pipefail

MIN_MAJOR=11
MIN_MINOR=1
PIDFILE=/run/multifd-libvirtd.pid
LOG=/tmp/multifd-libvirtd.log
CONF=/etc/libvirt/qemu.conf
MARK='# multifd: container settings (scripts/libvirt.sh)'
PACKAGES=(libvirt-daemon-driver-qemu libvirt-daemon libvirt-clients libvirt0 libvirt-common libvirt-daemon-common libvirt-daemon-log)

have_version() {
  command -v virsh >/dev/null 2>&1 && command -v libvirtd >/dev/null 2>&1 || return 1
  local v
  v=$(libvirtd --version 2>/dev/null | awk '{print $NF}')
  local major=${v%%.*} rest=${v#*.}
  local minor=${rest%%.*}
  [ -n "$major" ] && { [ "$major" -gt "$MIN_MAJOR" ] || { [ "$major" -eq "$MIN_MAJOR" ] && [ "$minor" -ge "$MIN_MINOR" ]; }; }
}

configure() {
  [ -f "$CONF" ] || { echo "libvirt.sh: $CONF missing" >&2; exit 1; }
  grep -qF "$MARK" "$CONF" && return 0
  # A container has no SELinux/AppArmor, no mount namespaces for QEMU, no virtlogd, and runs
  # everything as root; cgroup placement is left out (no systemd to ask for a scope).
  cat >>"$CONF" <<EOF

$MARK
user = "+0"
group = "+0"
dynamic_ownership = 0
remember_owner = 0
namespaces = []
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = []
EOF
}

install() {
  if have_version; then
    configure
    echo "libvirt $(libvirtd --version | awk '{print $NF}') already installed"
    return 0
  fi
  [ "$(id -u)" = 0 ] || { echo "libvirt.sh: needs root to run apt-get" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  local codename
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  if ! grep -qrs "${codename}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "libvirt.sh: no ${codename}-backports apt source (run ../shared/qemu/install.sh first)" >&2
    exit 1
  fi
  apt-get update -qq >/dev/null
  local args=()
  for p in "${PACKAGES[@]}"; do args+=("$p/${codename}-backports"); done
  # The QEMU driver needs systemd-container (or sysvinit-core), which needs the systemd of its
  # own version: asking for the one that matches the installed systemd leaves systemd alone.
  local sd
  sd=$(dpkg-query -W -f='${Version}' systemd 2>/dev/null || true)
  if [ -n "$sd" ] && apt-get -s install --no-install-recommends "${args[@]}" "systemd-container=$sd" >/dev/null 2>&1; then
    args+=("systemd-container=$sd")
  fi
  local plan
  plan=$(apt-get -s install --no-install-recommends "${args[@]}")
  if grep -E '^(Inst|Remv) qemu-' <<<"$plan" >&2; then
    echo "libvirt.sh: apt would replace or remove QEMU (above); not installing" >&2
    exit 1
  fi
  if grep -E '^Inst systemd .*backports' <<<"$plan" >&2; then
    echo "libvirt.sh: apt would take systemd from backports (above); not installing" >&2
    exit 1
  fi
  apt-get install -y -qq --no-install-recommends "${args[@]}" >/dev/null
  have_version || { echo "libvirt.sh: libvirtd $(libvirtd --version 2>&1) is older than ${MIN_MAJOR}.${MIN_MINOR}" >&2; exit 1; }
  configure
  echo "libvirt $(libvirtd --version | awk '{print $NF}') installed"
}

answering() {
  timeout 10 virsh -c qemu:///system version >/dev/null 2>&1
}

start() {
  if answering; then echo "libvirtd already answers"; return 0; fi
  [ "$(id -u)" = 0 ] || { echo "libvirt.sh: needs root to run libvirtd" >&2; exit 1; }
  mkdir -p /run/libvirt /var/lib/libvirt/qemu /var/log/libvirt/qemu /var/cache/libvirt/qemu
  # Not -d: the PID written here is the daemon's own, so stop can end exactly it.
  libvirtd >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 100); do
    if answering; then echo "libvirtd started (pid $(cat "$PIDFILE"))"; return 0; fi
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break
    sleep 0.2
  done
  echo "libvirt.sh: libvirtd did not come up; its log:" >&2
  tail -n 30 "$LOG" >&2 || true
  exit 1
}

stop() {
  [ -f "$PIDFILE" ] || { echo "libvirtd not started by this script"; return 0; }
  local pid
  pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$PIDFILE"
  echo "libvirtd stopped"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) if answering; then virsh -c qemu:///system version; else echo "libvirtd not answering"; exit 1; fi ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
