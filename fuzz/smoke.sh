#!/usr/bin/env bash
# Short fuzzing smoke runs of the decoders.
#
#   fuzz/smoke.sh [SECONDS] [TARGET...]   (default 30 s each, every target)
#
# Targets: segment_decoder (log segments), wire_request (client requests
# to a worker), peer_message (messages between workers), admin_request
# (the Conductor's admin API).
#
# cargo-fuzz normally needs a nightly toolchain (it passes -Z sanitizer
# flags). Only the stable toolchain is available here, so the run uses
# RUSTC_BOOTSTRAP=1, which lets stable rustc accept those flags. The exact
# command is:
#
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run segment_decoder -- -max_total_time=30
#
# The first build compiles the engine's dependencies with AddressSanitizer
# (about 2 minutes on 2 cores); later runs reuse fuzz/target. The corpus
# grows in fuzz/corpus/segment_decoder, crashes land in fuzz/artifacts/
# (both ignored by git). Replay one input with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run segment_decoder <file>
set -euo pipefail

seconds="${1:-30}"
cd "$(dirname "$0")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "smoke.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(segment_decoder wire_request peer_message admin_request)
# Seeds: one valid message of every kind (net/examples/fuzz_seeds.rs), a
# second corpus directory libFuzzer reads but never writes.
(cd .. && cargo run --quiet -p rama-net --example fuzz_seeds -- fuzz/seeds)
for t in "${targets[@]}"; do
    echo "smoke.sh: $t for $seconds s" >&2
    seeds=()
    [[ -d "seeds/$t" ]] && seeds=("seeds/$t")
    mkdir -p "corpus/$t"
    cargo fuzz run "$t" "corpus/$t" "${seeds[@]}" -- -max_total_time="$seconds"
done
