#!/usr/bin/env bash
# `make fuzz`: runs every cargo fuzz target of tests/fuzz (or those named as arguments) for
# FUZZ_TIME seconds each under a memory limit, with the target's corpus in
# tests/fuzz/corpus/TARGET (new inputs the fuzzer finds are added there: minimise them with
# `make fuzz-cmin` before committing). A crash, an out-of-memory or a timeout stops that
# target, leaves the input in tests/fuzz/artifacts/TARGET/ and fails the run at the end.
#
# `make fuzz-cmin` (`fuzz.sh --cmin [TARGET...]`) minimises each corpus as `cargo fuzz cmin`
# does, with libFuzzer's -set_cover_merge=1 (a small set with the same coverage), except that
# the seeds (`seed-*`) and the inputs that reproduced a bug (`regress-*`) always stay: the
# other files are kept only if they add coverage to those.
#
# cargo fuzz passes nightly-only flags (-Zsanitizer, -Cpasses=sancov-module); the pinned
# toolchain is stable, so they are allowed with RUSTC_BOOTSTRAP=1. The stable toolchain ships
# the AddressSanitizer runtime, so FUZZ_SANITIZER defaults to `address` (`none` also works,
# and runs faster).
#
# First time on a machine: installs cargo-fuzz (`cargo install cargo-fuzz --locked`) and, when
# no C++ compiler is there (libFuzzer is C++), g++ with apt-get.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=$here/tests/fuzz
time=${FUZZ_TIME:-60}
rss=${FUZZ_RSS_MB:-512}
malloc=${FUZZ_MALLOC_MB:-128}
timeout=${FUZZ_TIMEOUT:-10}
sanitizer=${FUZZ_SANITIZER:-address}
cargo=${CARGO:-cargo}
export RUSTC_BOOTSTRAP=1
# ASan keeps 256 MB of freed memory in quarantine by default, which alone would take half of
# the RSS limit from targets that attach a device per input.
export ASAN_OPTIONS=${ASAN_OPTIONS:-quarantine_size_mb=16}

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    "$cargo" install cargo-fuzz --locked
fi
if ! command -v c++ >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "fuzz: installing g++ (libFuzzer is C++)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends g++
fi

cmin=false
if [ "${1:-}" = --cmin ]; then
    cmin=true
    shift
fi
if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <("$cargo" fuzz list --fuzz-dir "$dir")
fi
mkdir -p "$here/build/fuzz"
if $cmin; then
    for t in "${targets[@]}"; do
        "$cargo" fuzz build --fuzz-dir "$dir" --sanitizer "$sanitizer" "$t"
        bin=$dir/target/x86_64-unknown-linux-gnu/release/$t
        corpus=$dir/corpus/$t
        work=$(mktemp -d)
        mkdir "$work/keep" "$work/found"
        find "$corpus" -maxdepth 1 -type f \( -name 'seed-*' -o -name 'regress-*' \) -exec cp {} "$work/keep/" \;
        find "$corpus" -maxdepth 1 -type f ! -name 'seed-*' ! -name 'regress-*' -exec mv {} "$work/found/" \;
        before=$(find "$work/found" -type f | wc -l)
        if ! "$bin" -set_cover_merge=1 -rss_limit_mb="$rss" -malloc_limit_mb="$malloc" -timeout="$timeout" \
            "$work/keep" "$work/found" >"$here/build/fuzz/$t.cmin.log" 2>&1; then
            find "$work/found" -type f -exec mv {} "$corpus/" \;
            rm -rf "$work"
            echo "fuzz-cmin: $t: the merge failed, corpus left as it was (log build/fuzz/$t.cmin.log)" >&2
            exit 1
        fi
        # The merge added what covers something new to keep/ (named by content hash).
        find "$work/keep" -maxdepth 1 -type f ! -name 'seed-*' ! -name 'regress-*' -exec mv {} "$corpus/" \;
        after=$(find "$corpus" -maxdepth 1 -type f ! -name 'seed-*' ! -name 'regress-*' | wc -l)
        echo "fuzz-cmin: $t: $before found inputs -> $after kept ($(du -sb "$corpus" | cut -f1) bytes in the corpus)"
        rm -rf "$work"
    done
    exit 0
fi
failed=()
for t in "${targets[@]}"; do
    log=$here/build/fuzz/$t.log
    mkdir -p "$dir/corpus/$t"
    echo "fuzz: $t for ${time} s (rss ${rss} MB, malloc ${malloc} MB, timeout ${timeout} s, sanitizer $sanitizer; log $log)"
    if "$cargo" fuzz run --fuzz-dir "$dir" --sanitizer "$sanitizer" "$t" -- \
        -max_total_time="$time" -rss_limit_mb="$rss" -malloc_limit_mb="$malloc" \
        -timeout="$timeout" -print_final_stats=1 >"$log" 2>&1; then
        status=ok
    else
        status="FOUND SOMETHING (see $log and $dir/artifacts/$t/)"
        failed+=("$t")
    fi
    runs=$(awk '/stat::number_of_executed_units/ {n = $2} END {print n + 0}' "$log")
    echo "fuzz: $t: $runs executions, corpus $(find "$dir/corpus/$t" -type f | wc -l) files: $status"
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: findings in: ${failed[*]}" >&2
    exit 1
fi
