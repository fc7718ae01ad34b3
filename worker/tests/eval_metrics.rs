//! The completion metrics against Python on golden pairs (tests/fixtures/make_fixtures.py):
//! rapidfuzz `fuzz.ratio` of the stripped lines and RepoBench's `split()` exact match, equal to
//! the last bit: empty strings, unicode, whitespace-only differences, identical strings.

use zerotune_tests::meta;
use zerotune_worker::eval::metrics::{edit_similarity, exact_match};

#[test]
fn metrics_equal_rapidfuzz_and_repobench_exactly() {
    for case in meta()["metrics"].as_array().unwrap() {
        let (pred, target) = (case["prediction"].as_str().unwrap(), case["target"].as_str().unwrap());
        let es = edit_similarity(pred, target);
        let em = exact_match(pred, target);
        assert_eq!(es, case["edit_similarity"].as_f64().unwrap(), "{pred:?} vs {target:?}");
        assert_eq!(em, case["exact_match"].as_f64().unwrap(), "{pred:?} vs {target:?}");
    }
}
