# glibc malloc settings for bootrestore processes; sourced by bin/bootrestore and scripts/bench.sh.
#   hugetlb=1                 transparent huge pages for malloc'd memory (madvise): a cold read fills
#                             the chunk cache with 2 MiB pages instead of 4 KiB ones (one page fault
#                             per 2 MiB instead of 512; a fault costs ~7 us on a paravirtual guest)
#   mmap_threshold=4194304    chunk buffers (64 KiB .. 4 MiB) come from the heap, which gets huge
#                             pages, not from a fresh mmap each
#   trim_threshold=33554432   up to 32 MiB of freed memory stays in each heap: the chunk workers'
#                             per-chunk buffers and (de)compressor state are not handed back to the
#                             kernel and faulted in again for every chunk
#   arena_max=2               two malloc arenas for all threads (the event loop, the chunk workers,
#                             libuv's pool), not one per thread, each keeping huge pages resident:
#                             peak RSS reading a 1 GiB mount through a 32 MiB cache 143-155 MiB
#                             instead of 152-185 MiB, cold-read throughput the same within noise
# Measured (cold sequential pass of a mounted 1 GiB restore point, 1 MiB reads at QD8, 2 vCPUs):
# 241-250 MiB/s without, 330-460 MiB/s with these settings. Settings already in GLIBC_TUNABLES are
# appended and win (glibc applies the last of duplicates).
GLIBC_TUNABLES="glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=33554432:glibc.malloc.arena_max=2${GLIBC_TUNABLES:+:$GLIBC_TUNABLES}"
export GLIBC_TUNABLES
