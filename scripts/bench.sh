#!/usr/bin/env bash
# Builds the CLI and a bench harness with esbuild, then runs it.
#   scripts/bench.sh [target-perf] [options]  bootrestore vs tgt with iscsi-perf (bench/target-perf.ts)
#   scripts/bench.sh boot-time [options]      boot time of the test image per source (bench/boot-time.ts)
#   scripts/bench.sh mount-perf [options]     raw-file LUN vs cold/warm mounted restore point vs tgt (bench/mount-perf.ts)
#   scripts/bench.sh backup [options]         backup/reader throughput, chunk sizes, vs restic (bench/backup.ts)
#   scripts/bench.sh cache [options]          BackupBlockDevice without iSCSI (bench/cache.ts)
#   scripts/bench.sh sources [options]        source parser read throughput (bench/sources.ts)
# Options are described at the top of each bench file (e.g. --seconds N, --rounds N, --json FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
harness=target-perf
case "${1:-}" in
  target-perf | boot-time | mount-perf | backup | cache | sources) harness=$1; shift ;;
esac
npm run --silent build
npx esbuild "bench/$harness.ts" --bundle --platform=node --format=esm --target=node20 \
  --packages=external --log-level=warning --outfile="dist/bench/$harness.mjs"
# The same malloc settings as the bootrestore launcher (in-process benches measure what users run).
. bin/malloc-env.sh
exec node "dist/bench/$harness.mjs" "$@"
