#!/usr/bin/env bash
# Installs the Python tools of the API contract checks (tests/api_contract.rs) from PyPI, at
# the versions of tests/openapi/requirements.txt, into .venv at the repository's root (git
# ignores it). Idempotent and quick when they are there.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
req=tests/openapi/requirements.txt
stamp=$venv/.installed-requirements
if [ -x "$venv/bin/python" ] && cmp -s "$req" "$stamp"; then
  exit 0
fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  SUDO=
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  echo "python-deps: installing python3-venv" >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends python3-venv
fi
echo "python-deps: installing $(grep -v '^#' "$req" | tr '\n' ' ')into $venv" >&2
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
cp "$req" "$stamp"
