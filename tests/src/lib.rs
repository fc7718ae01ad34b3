//! Test support shared by every crate's tests: where the HF reference fixtures live, and the
//! small helpers every test file reaches for (paths as arguments, a process's stderr, errors
//! relative to a reference).

use std::path::{Path, PathBuf};
use std::process::Output;

/// Must equal FIXTURE_VERSION in tests/fixtures/make_fixtures.py.
pub const FIXTURE_VERSION: u64 = 11;

/// The directory tests/fixtures/make_fixtures.py wrote (scripts/test.sh runs it first):
/// `$ZEROTUNE_FIXTURES`, else `target/fixtures`. Panics with what to run when it is missing or stale.
pub fn fixtures() -> PathBuf {
    checked().0
}

/// The fixtures' meta.json.
pub fn meta() -> serde_json::Value {
    checked().1
}

fn checked() -> (PathBuf, serde_json::Value) {
    let dir = std::env::var_os("ZEROTUNE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures"));
    let meta = std::fs::read_to_string(dir.join("meta.json")).unwrap_or_else(|_| {
        panic!("no fixtures in {}: run scripts/test.sh (or python tests/fixtures/make_fixtures.py target/fixtures)", dir.display())
    });
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["version"].as_u64(), Some(FIXTURE_VERSION), "stale fixtures in {}: regenerate with scripts/test.sh", dir.display());
    (dir, meta)
}

/// `path` as a command-line argument.
pub fn s(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// A finished process's stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// max |a - b| over two equally long lists of values (NaN when any difference is NaN).
pub fn max_abs_diff<T: Copy + Into<f64>>(ours: &[T], reference: &[T]) -> f64 {
    assert_eq!(ours.len(), reference.len(), "the values to compare differ in length");
    ours.iter().zip(reference).map(|(&a, &b)| (a.into() - b.into()).abs()).fold(0.0, nan_max)
}

/// max |a - b| / max |b| (the scale at least 1e-12; NaN when any difference is NaN).
pub fn rel_err<T: Copy + Into<f64>>(ours: &[T], reference: &[T]) -> f64 {
    let scale = reference.iter().map(|&b| b.into().abs()).fold(0.0, f64::max).max(1e-12);
    max_abs_diff(ours, reference) / scale
}

/// `f64::max`, except that a NaN wins, so a comparison against a tolerance fails.
pub fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_err_is_relative_to_the_reference_and_keeps_nan() {
        assert_eq!(rel_err(&[1.0f32, 2.5], &[1.0, 2.0]), 0.25);
        assert_eq!(rel_err(&[0.0f64], &[0.0]), 0.0);
        assert!(rel_err(&[f32::NAN, 1.0], &[1.0, 1.0]).is_nan());
        assert!(rel_err(&[1.0, f32::NAN], &[1.0, 1.0]).is_nan());
    }
}
