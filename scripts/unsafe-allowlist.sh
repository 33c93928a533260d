#!/usr/bin/env bash
# House rule (CONVENTIONS.md): `unsafe` only in named places: the boot stub, the kernel's
# CPU/interrupt/memory primitives and power control, the drivers' HAL, MSI-X table access
# and each driver's register/queue modules. Fails listing any other file that uses it.
set -euo pipefail
cd "$(dirname "$0")/.."
allowed='^(boot/src/|kernel/src/arch/|kernel/src/memory\.rs|kernel/src/power\.rs|kernel/src/platform/|drivers/src/hal|drivers/src/msix|drivers/src/.*(regs|queue|registers)\.rs)'
bad=""
for f in $(git ls-files '*.rs' | grep -v -E "$allowed"); do
    # code lines only: skip // comments and doc comments
    if grep -v -E '^\s*//' "$f" | grep -q -E '\bunsafe\b'; then bad+="$f "; fi
done
if [ -n "$bad" ]; then
    echo "unsafe outside the allow-list (scripts/unsafe-allowlist.sh): $bad"
    exit 1
fi
echo "unsafe allow-list: ok"
