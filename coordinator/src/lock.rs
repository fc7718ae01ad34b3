//! One job per `--output_dir`: a `flock`ed `.zerotune.lock` naming the holder's host and pid,
//! held for the whole job. The kernel releases a lock when its process ends, so a lock file left
//! by a dead process is simply taken over, and the takeover is said.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{io_err, CoordinatorError, Result};

/// The lock file's name inside the output dir (not counted when checking that a dir is empty).
pub use zerotune_hf::layout::LOCK_FILE;

/// Held while alive; the lock goes with the file descriptor.
pub struct OutputLock {
    file: File,
    path: PathBuf,
}

impl OutputLock {
    /// Takes the lock of `dir`, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io_err(&path))?;
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder); // what the last holder wrote, for the messages
        let holder = holder.trim().to_string();
        // SAFETY: flock on a file descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io_err(&path)(err).into());
            }
            let holder = if holder.is_empty() { "a job starting up".to_string() } else { holder };
            return Err(CoordinatorError::OutputLocked { dir: dir.into(), holder, lock: path });
        }
        if !holder.is_empty() {
            tracing::info!("{}: taking over the lock left by {holder} (that job is gone)", dir.display());
        }
        let me = format!("host {} pid {}\n", zerotune_proto::hostname(), std::process::id());
        (|| {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(me.as_bytes())
        })()
        .map_err(io_err(&path))?;
        Ok(Self { file, path })
    }
}

impl Drop for OutputLock {
    /// A job that ends normally leaves an empty lock file (removing it could let two later jobs
    /// lock two different files), so the next one has no takeover to report.
    fn drop(&mut self) {
        if self.file.set_len(0).is_err() {
            tracing::warn!("could not clear {}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_by_name_and_a_released_lock_is_taken_again() {
        let _forking = crate::forking();
        let dir = tempfile::tempdir().unwrap();
        let first = OutputLock::acquire(dir.path()).unwrap();
        let err = OutputLock::acquire(dir.path()).err().expect("a second lock on the same dir is refused").to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())) && err.contains("another job is using it"), "{err}");
        drop(first);
        assert_eq!(std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap(), "", "a clean end leaves no holder");
        let again = OutputLock::acquire(dir.path()).unwrap();
        assert!(std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap().contains(&format!("pid {}", std::process::id())));
        drop(again);
    }
}
