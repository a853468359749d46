#!/usr/bin/env bash
# Installs the Debian packages that tests and benchmarks run for real:
# redis-server (shared concurrency limits), postgresql (the scale-out ledger),
# prometheus with promtool (scraping, rule checks) and nginx (the gateway
# benchmark's C proxy). Does nothing when they are all present.
# kubectl, hadolint and kubernetes-validate (tests/test_k8s.py) come as PyPI
# wheels in the dev extra instead: Debian's kubernetes-client is 1.20, whose
# kustomize predates components.
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || need+=(postgresql)
{ command -v prometheus && command -v promtool; } >/dev/null || need+=(prometheus)
command -v nginx >/dev/null || need+=(nginx-light)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
echo "installing Debian packages: ${need[*]}"
$sudo apt-get update
DEBIAN_FRONTEND=noninteractive $sudo apt-get install --yes --no-install-recommends "${need[@]}"
