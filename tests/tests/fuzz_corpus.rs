//! The fuzz targets' corpora (`tests/fuzz/corpus/TARGET/`) replayed on the stable toolchain,
//! so `make test` runs every input the fuzzers kept, the inputs that once found a bug
//! (`regress-*`) among them, through the same functions the cargo fuzz targets call
//! (`snapshot::fuzz`, `nbd::fuzz`, `kernel::fuzz`, `drivers::fuzz`).

use std::path::PathBuf;

fn corpus_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

/// Runs `target` over every file of its corpus; a file that fails is named.
fn replay(target: &str, run: fn(&[u8])) {
    let dir = corpus_root().join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            panic!("corpus file {} fails (message above)", f.display());
        }
    }
    eprintln!("{target}: {} corpus files replayed", files.len());
}

/// Every target: its name, body and seed inputs.
#[allow(clippy::type_complexity)]
const TARGETS: &[(&str, fn(&[u8]), fn() -> Vec<Vec<u8>>)] = &[
    (
        "store_loader",
        snapshot::fuzz::store_loader,
        snapshot::fuzz::store_loader_seeds,
    ),
    (
        "decoders",
        snapshot::fuzz::decoders,
        snapshot::fuzz::decoders_seeds,
    ),
    (
        "nbd_session",
        nbd::fuzz::nbd_session,
        nbd::fuzz::nbd_session_seeds,
    ),
    (
        "console",
        kernel::fuzz::console,
        kernel::fuzz::console_seeds,
    ),
    (
        "cmdline",
        kernel::fuzz::cmdline,
        kernel::fuzz::cmdline_seeds,
    ),
    (
        "nvme_completions",
        drivers::fuzz::nvme_completions,
        drivers::fuzz::nvme_completions_seeds,
    ),
    (
        "virtio_used_ring",
        drivers::fuzz::virtio_used_ring,
        drivers::fuzz::virtio_used_ring_seeds,
    ),
];

fn target(name: &str) -> fn(&[u8]) {
    TARGETS
        .iter()
        .find(|t| t.0 == name)
        .map(|t| t.1)
        .expect("a target of TARGETS")
}

/// Writes every target's seed inputs into its corpus (`seed-NN`; `cargo test -p tests --test
/// fuzz_corpus write_fuzz_seeds -- --ignored`); the corpus in git holds them and what fuzzing
/// added.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    for (name, _, seeds) in TARGETS {
        let dir = corpus_root().join(name);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        for (i, s) in seeds().iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), s).expect("seed");
        }
    }
}

/// Every corpus directory belongs to a target this file replays.
#[test]
fn every_corpus_is_replayed() {
    for entry in std::fs::read_dir(corpus_root()).expect("corpus root") {
        let name = entry.expect("entry").file_name();
        let name = name.to_string_lossy();
        assert!(
            TARGETS.iter().any(|t| t.0 == name),
            "tests/fuzz/corpus/{name} is not replayed"
        );
    }
}

#[test]
fn fuzz_corpus_store_loader() {
    replay("store_loader", target("store_loader"));
}

#[test]
fn fuzz_corpus_decoders() {
    replay("decoders", target("decoders"));
}

#[test]
fn fuzz_corpus_nbd_session() {
    replay("nbd_session", target("nbd_session"));
}

#[test]
fn fuzz_corpus_console() {
    replay("console", target("console"));
}

#[test]
fn fuzz_corpus_cmdline() {
    replay("cmdline", target("cmdline"));
}

#[test]
fn fuzz_corpus_nvme_completions() {
    replay("nvme_completions", target("nvme_completions"));
}

#[test]
fn fuzz_corpus_virtio_used_ring() {
    replay("virtio_used_ring", target("virtio_used_ring"));
}
