//! Test support shared by every crate's tests: where the HF reference fixtures live.

use std::path::PathBuf;

/// Must equal FIXTURE_VERSION in tests/fixtures/make_fixtures.py.
pub const FIXTURE_VERSION: u64 = 6;

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
