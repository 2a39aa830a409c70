#!/usr/bin/env bash
# Fails on an import cycle between the proxy's modules or its folders
# (crate::, super:: and self:: paths; see scripts/module_cycles.py). The
# checker first proves on small made-up crates that it finds cycles.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/module_cycles.py --self-test
python3 scripts/module_cycles.py proxy/src
