#!/usr/bin/env bash
# Install everything the test suite needs, then run the whole suite. Extra arguments go to pytest
# (for example `bash scripts/test.sh -m "not system"` runs the fast tier only).
#
# Python packages come from the hashed lock requirements/test.txt into a virtual environment of the
# suite's own (.venv-test, made afresh on every run; the README's .venv is left alone), never from the system's site-packages: every run,
# on every machine, tests exactly the locked versions. Debian packages (redis-server, nginx with
# nchan, chromium) and the Node test client are installed when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v nginx >/dev/null || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_nchan_module.so ] || need+=(libnginx-mod-nchan)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v curl >/dev/null || need+=(curl)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)  # the read-only disk test mounts a small ext4
command -v npm >/dev/null || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "test.sh: installing ${need[*]}"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

python3 -m venv --clear .venv-test
.venv-test/bin/python -m pip install -q --require-hashes -r requirements/test.txt
.venv-test/bin/python -m pip install -q --no-deps -e .
(cd tests/node && npm ci --silent --no-audit --no-fund >/dev/null)
exec .venv-test/bin/python -m pytest "$@"
