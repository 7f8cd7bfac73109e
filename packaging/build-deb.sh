#!/usr/bin/env bash
# Builds pier's .deb with cargo-deb: the release binary, the systemd unit
# (packaging/pier.service), /etc/pier/pier.toml (config/pier.toml, a
# conffile) and bash, zsh and fish completions generated from the clap
# definitions by the binary itself (`pier completions SHELL`).
#
#   packaging/build-deb.sh            -> target/debian/pier_<version>-1_<arch>.deb
#
# Needs cargo-deb (`cargo install cargo-deb --locked`) and what the build
# needs (scripts/deps.sh, or just run scripts/up.sh once).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || { echo "build-deb: cargo-deb missing; install it with: cargo install cargo-deb --locked" >&2; exit 1; }
cargo build --release --locked -p pier
bin=${CARGO_TARGET_DIR:-target}/release/pier
# Where the package metadata (crates/pier/Cargo.toml) takes them from.
mkdir -p target/completions
"$bin" completions bash >target/completions/pier.bash
"$bin" completions zsh >target/completions/_pier
"$bin" completions fish >target/completions/pier.fish
# Stripped: the release profile keeps line tables for profiling, which
# would make the installed binary 100+ MB.
cargo deb -p pier --no-build --locked --strip "$@"
