#!/usr/bin/env bash
# make bench-journal: acknowledged events per second through the real audit journal (client,
# SOCK_SEQPACKET socket, journal, write, fdatasync on the real disk, ack) with 1, 16 and 64
# concurrent writers, group commit against an fsync-per-event baseline measured in the same
# run, and the ratio. The issue's target: at 64 writers, at least 10x the baseline.
#   BENCHTIME=2s      time per case (go test -benchtime)
#   AVP_BENCH_DIR=DIR where the log is written (default: the temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
out=$("$GO" test -run '^$' -bench '^BenchmarkJournal$' -benchtime "${BENCHTIME:-2s}" -count 1 ./internal/audit/)
grep -E '^(cpu|Benchmark)' <<<"$out"
echo "disk: $(df -P "${AVP_BENCH_DIR:-${TMPDIR:-/tmp}}" | awk 'NR==2 {print $1 " mounted on " $6}')"
awk '
/^BenchmarkJournal\// {
	split($1, p, "/"); mode = p[2]; w = p[3]
	sub(/-[0-9]+$/, "", w); sub(/^writers=/, "", w)
	for (i = 2; i < NF; i++) if ($(i + 1) == "events/s") rate[mode, w] = $i
}
END {
	printf "\n%-8s %20s %20s %8s\n", "writers", "fsync-per-event/s", "group-commit/s", "ratio"
	n = split("1 16 64", ws, " ")
	for (k = 1; k <= n; k++) {
		w = ws[k]; b = rate["fsync-per-event", w]; g = rate["group-commit", w]
		printf "%-8s %20.0f %20.0f %7.1fx\n", w, b, g, (b > 0 ? g / b : 0)
	}
	b = rate["fsync-per-event", 64]; g = rate["group-commit", 64]
	r = (b > 0 ? g / b : 0)
	printf "\nat 64 writers: %.1fx the fsync-per-event baseline (target: at least 10x) - %s\n", r, (r >= 10 ? "met" : "NOT met")
}' <<<"$out"
