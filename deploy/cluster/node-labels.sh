#!/usr/bin/env bash
# Print a node's Ray labels (key=value[,key=value]) from a site map, for `ray start --labels=...`.
#   node-labels.sh SITE_MAP [NODE]      NODE: a host name or IP (default: this machine's names and IPs)
# SITE_MAP lines: "<host name or IP> <labels>", e.g. "hosp-nih-01 site=nih"; '#' starts a comment.
# A node that is not listed (a GPU node that holds no site's data) gets no labels: an empty line.
set -euo pipefail
map=${1:?usage: node-labels.sh SITE_MAP [NODE]}
[ -r "$map" ] || { echo "node-labels.sh: site map $map is not readable" >&2; exit 2; }
if [ $# -ge 2 ]; then
  names=("$2")
else
  names=("$(hostname -s)" "$(hostname -f 2>/dev/null || hostname)" $(hostname -I 2>/dev/null || true))
fi
for name in "${names[@]}"; do
  labels=$(awk -v h="$name" '!/^[[:space:]]*(#|$)/ && $1 == h { print $2; exit }' "$map")
  if [ -n "$labels" ]; then echo "$labels"; exit 0; fi
done
echo ""
