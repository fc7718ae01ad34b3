//! Test hook, off unless `ZEROTUNE_TEST_HOLD=PATH` is set: while PATH exists, the engine takes no
//! step; it still notices departed clients. Tests use it to keep a request in the batch while
//! they fill the queue, disconnect or signal.

use std::path::PathBuf;

pub struct Hold(Option<PathBuf>);

impl Hold {
    pub fn from_env() -> Self {
        Self(std::env::var_os("ZEROTUNE_TEST_HOLD").map(PathBuf::from))
    }

    /// Whether the engine must wait; then it pauses a moment (always false when the hook is off).
    pub fn holding(&self) -> bool {
        let held = self.0.as_ref().is_some_and(|path| path.exists());
        if held {
            std::thread::sleep(std::time::Duration::from_millis(2)); // polling a file the test removes
        }
        held
    }
}
