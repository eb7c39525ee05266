#!/usr/bin/env bash
# make bench-journal: acknowledged events per second through the real audit journal (client,
# SOCK_SEQPACKET socket, journal, write, fdatasync on the real disk, ack) with 1, 16 and 64
# concurrent writers, group commit against an fsync-per-event baseline measured in the same
# run, and the ratio. The issue's target: at 64 writers, at least 10x the baseline.
# Each case runs COUNT times (interleaved with the others) and the median counts, since fsync
# latency and the CPU that group commit needs both vary with whatever else the machine does.
#   BENCHTIME=1s      time per case and run (go test -benchtime)
#   COUNT=3           runs per case
#   AVP_BENCH_DIR=DIR where the log is written (default: the temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
out=$("$GO" test -run '^$' -bench '^BenchmarkJournal$' -benchtime "${BENCHTIME:-1s}" -count "${COUNT:-3}" ./internal/audit/)
grep -E '^(cpu|Benchmark)' <<<"$out"
echo "disk: $(df -P "${AVP_BENCH_DIR:-${TMPDIR:-/tmp}}" | awk 'NR==2 {print $1 " mounted on " $6}')"
awk '
/^BenchmarkJournal\// {
	split($1, p, "/"); mode = p[2]; w = p[3]
	sub(/-[0-9]+$/, "", w); sub(/^writers=/, "", w)
	for (i = 2; i < NF; i++) if ($(i + 1) == "events/s") { n = ++cnt[mode, w]; runs[mode, w, n] = $i }
}
function median(mode, w,    n, i, k, t, v) {
	n = cnt[mode, w]
	for (i = 1; i <= n; i++) v[i] = runs[mode, w, i]
	for (i = 2; i <= n; i++) for (k = i; k > 1 && v[k - 1] > v[k]; k--) { t = v[k]; v[k] = v[k - 1]; v[k - 1] = t }
	return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
}
END {
	for (key in cnt) { split(key, p, SUBSEP); rate[p[1], p[2]] = median(p[1], p[2]) }
	printf "\nmedians of %d run(s):\n%-8s %20s %20s %8s\n", cnt["group-commit", 64], "writers", "fsync-per-event/s", "group-commit/s", "ratio"
	n = split("1 16 64", ws, " ")
	for (k = 1; k <= n; k++) {
		w = ws[k]; b = rate["fsync-per-event", w]; g = rate["group-commit", w]
		printf "%-8s %20.0f %20.0f %7.1fx\n", w, b, g, (b > 0 ? g / b : 0)
	}
	b = rate["fsync-per-event", 64]; g = rate["group-commit", 64]
	r = (b > 0 ? g / b : 0)
	printf "\nat 64 writers: %.1fx the fsync-per-event baseline (target: at least 10x) - %s\n", r, (r >= 10 ? "met" : "NOT met")
}' <<<"$out"
