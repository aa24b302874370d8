#!/usr/bin/env bash
# The test command (README, second command; .ci/run calls it through `npm test`).
# Installs what the tests need (Debian packages, npm packages), builds, type-checks, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
npm run build
npm run typecheck
npx vitest run "$@"
