#!/usr/bin/env bash
# Install everything the test suite needs (Debian packages, the Python package with its
# test extras, the Node test client), then run the whole suite. Extra arguments go to pytest.
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

python3 -m pip install -q -e '.[test]'
(cd tests/node && npm install --silent --no-audit --no-fund >/dev/null)
exec python3 -m pytest "$@"
