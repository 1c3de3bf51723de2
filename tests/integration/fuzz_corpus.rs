//! Replays the committed fuzzing corpus (`fuzz/corpus/<target>/`) through the same harnesses the
//! cargo-fuzz targets run, so every input the fuzzer found interesting stays a regression test.

use std::path::Path;

fn replay(target: &str, harness: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus dir") {
        let path = entry.expect("entry").path();
        let data = std::fs::read(&path).expect("read");
        let outcome = std::panic::catch_unwind(|| harness(&data));
        assert!(outcome.is_ok(), "{} fails its harness", path.display());
        n += 1;
    }
    n
}

#[test]
fn the_fuzzing_corpus_still_passes_its_harnesses() {
    assert!(replay("callback_body", tsusage::fuzzing::callback_body) >= 5);
    assert!(replay("csv_list", tsusage::fuzzing::csv_list) >= 5);
    assert!(replay("values", tsusage::fuzzing::values) >= 5);
}
