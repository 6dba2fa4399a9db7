#!/usr/bin/env bash
# Installs what the test suite needs beyond the machine's own services, only if it is missing, so
# running it again is cheap: supervisord (Debian's package `supervisor`) for celerity/tests/deploy.rs.
# The package's own service is not started here (the test runs a private supervisord).
set -euo pipefail

if ! command -v supervisord >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends supervisor
fi
supervisord --version >/dev/null

# `ip` (Debian's `iproute2`) for celerity/tests/many_hosts.rs, which builds its network namespaces
# with it (it skips itself, with a message, where it cannot).
if ! command -v ip >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends iproute2
fi
