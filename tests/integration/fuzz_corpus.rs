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

/// Random edits of bodies the hand-written reader takes (a byte replaced by one JSON cares about,
/// removed, or a span repeated), through the callback harness: it holds every reading to the
/// same results, so the hand-written one cannot accept or read what serde would not. A seeded,
/// stable-toolchain stand-in for a fuzzing run of the new reader.
#[test]
fn edits_of_usual_bodies_read_the_same_by_every_reading() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seeds: Vec<Vec<u8>> = ["callback_usage.json", "callback_completion.json"]
        .iter()
        .map(|f| std::fs::read(dir.join("data/vendor").join(f)).expect("sample"))
        .collect();
    for entry in std::fs::read_dir(dir.join("fuzz/corpus/callback_body")).expect("corpus") {
        let data = std::fs::read(entry.expect("entry").path()).expect("read");
        if std::str::from_utf8(&data).is_ok_and(tsusage::normalize::payload::Body::is_scanned) {
            seeds.push(data);
        }
    }
    assert!(seeds.len() > 20, "the corpus has bodies the reader takes");
    const BYTES: &[u8] = b"{}[]\",:\\ \t\n0123456789-.eEnulltrfa\x01\xc3\xa9";
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    for round in 0..40_000 {
        let mut body = seeds[round % seeds.len()].clone();
        for _ in 0..1 + next(3) {
            if body.is_empty() {
                break;
            }
            let at = next(body.len());
            match next(3) {
                0 => body[at] = BYTES[next(BYTES.len())],
                1 => {
                    body.remove(at);
                }
                _ => {
                    let end = (at + 1 + next(12)).min(body.len());
                    let span = body[at..end].to_vec();
                    body.splice(at..at, span);
                }
            }
        }
        let outcome = std::panic::catch_unwind(|| tsusage::fuzzing::callback_body(&body));
        assert!(
            outcome.is_ok(),
            "fails the harness: {}",
            String::from_utf8_lossy(&body)
        );
    }
}
