//! Every checked-in corpus input, replayed through its fuzz target as an ordinary test:
//! the seeds and what the coverage-guided runs found (`fuzzing/README.md`) keep being
//! checked on every test run, without a fuzzer.

use std::path::PathBuf;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

#[test]
fn every_corpus_folder_is_a_target_and_every_target_has_a_corpus() {
    let mut folders: Vec<String> = std::fs::read_dir(corpus())
        .expect("fuzzing/corpus")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    folders.sort();
    let mut targets: Vec<String> = basalt_fuzz::TARGETS
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    targets.sort();
    assert_eq!(folders, targets);
}

#[test]
fn every_corpus_input_passes_its_target() {
    let mut replayed = 0;
    for (name, run) in basalt_fuzz::TARGETS {
        let dir = corpus().join(name);
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("entry").path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{}: no inputs", dir.display());
        for input in inputs {
            let data = std::fs::read(&input).expect("read input");
            // A failing input names itself: the panic message has the path.
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{} fails {name}", input.display());
            replayed += 1;
        }
    }
    println!("{replayed} corpus inputs replayed");
}
