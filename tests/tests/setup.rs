//! scripts/setup.sh with a libtorch the user already has (`LIBTORCH=DIR` or `--libtorch DIR`): it
//! says what it found and uses it; a libtorch of another version, or a directory that is none, is
//! refused with a message saying what to do. Only the libtorch part runs (`--no-build`,
//! `--check-libtorch`): no install, no build.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use zerotune_tests::stderr;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn setup(args: &[&str], libtorch_env: Option<&Path>) -> Output {
    let mut command = Command::new("bash");
    command.arg(repo().join("scripts/setup.sh")).args(args).env_remove("LIBTORCH");
    if let Some(dir) = libtorch_env {
        command.env("LIBTORCH", dir);
    }
    command.output().unwrap()
}

/// A fake libtorch: lib/libtorch_cpu.so and the version file of a libtorch zip.
fn fake_libtorch(version: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("lib")).unwrap();
    std::fs::write(dir.path().join("lib/libtorch_cpu.so"), b"").unwrap();
    std::fs::write(dir.path().join("build-version"), format!("{version}\n")).unwrap();
    dir
}

#[test]
fn libtorch_from_the_environment_is_the_existing_one_and_is_used() {
    // The .libtorch a previous setup installed (scripts/test.sh ran it), given as the pip target
    // dir: setup finds torch/ in it, says its version, and builds against it.
    let out = setup(&["--no-build"], Some(&repo().join(".libtorch")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}{}", text, stderr(&out));
    assert!(text.contains("setup: found libtorch 2.11.0"), "{text}");
    assert!(text.contains("using it (it is .libtorch/torch)"), "{text}");
    // The same through --libtorch, pointing at the torch dir itself.
    let out = setup(&["--no-build", "--libtorch", &repo().join(".libtorch/torch").to_string_lossy()], None);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("found libtorch 2.11.0"), "{}", stderr(&out));
}

#[test]
fn the_version_check_accepts_2_11_builds_and_refuses_others() {
    let good = fake_libtorch("2.11.0+cu126");
    let out = setup(&["--check-libtorch", &good.path().to_string_lossy()], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("found libtorch 2.11.0+cu126 (CUDA 12.6)"));

    let old = fake_libtorch("2.10.0+cu118");
    let out = setup(&["--check-libtorch", &old.path().to_string_lossy()], None);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("is libtorch 2.10.0+cu118 (CUDA 11.8), but zerotune needs 2.11.0"), "{err}");
    assert!(err.contains("install torch==2.11.0"), "{err}");
    // Through LIBTORCH, the full setup refuses it before touching anything.
    let out = setup(&["--no-build"], Some(old.path()));
    assert!(!out.status.success() && stderr(&out).contains("but zerotune needs 2.11.0"), "{}", stderr(&out));

    let none = tempfile::tempdir().unwrap();
    let out = setup(&["--check-libtorch", &none.path().to_string_lossy()], None);
    assert!(!out.status.success() && stderr(&out).contains("is not a libtorch: no lib/libtorch_cpu.so"), "{}", stderr(&out));
    let unknown = fake_libtorch("");
    std::fs::remove_file(unknown.path().join("build-version")).unwrap();
    let out = setup(&["--check-libtorch", &unknown.path().to_string_lossy()], None);
    assert!(!out.status.success() && stderr(&out).contains("cannot tell the version"), "{}", stderr(&out));
}
