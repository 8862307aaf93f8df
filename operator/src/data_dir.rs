//! File modes of what berth keeps on disk. The data directory holds the master key, the admin
//! token and the store (sealed Secrets, but every other object in clear): it is made 0700 and every
//! file in it 0600, and berth refuses to use a key or token file that group or others can read —
//! such a file may already have been copied, and silently fixing its mode would hide that.
//!
//! sled has no option for the mode of the files it creates (and it creates new ones while running:
//! snapshots, blobs), so the server process sets its umask to 077 at start: everything it creates
//! is private to its user. Files made by an older version under the default umask are tightened
//! at start.

use std::path::Path;

/// The mode of the data directory and every directory in it.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file in it.
pub const FILE_MODE: u32 = 0o600;

/// The key and token files of a data directory (name, what it is): refused, never tightened,
/// when group or others can read them.
pub const KEY_FILES: [(&str, &str); 4] = [
    (crate::crypto::MASTER_KEY_FILE, "master key"),
    (crate::crypto::PENDING_KEY_FILE, "master key"),
    ("admin.token", "admin token"),
    ("backup.key", "backup repository key"),
];

/// Makes `dir` (created if missing) and everything in it private: the umask first, so nothing
/// created from now on is readable by others, then the directory 0700 and existing files 0600.
/// Key and token files (`key_files`, names in `dir`) are checked first and refused if readable:
/// tightening them would hide that they may have been copied.
pub fn prepare(dir: &Path, key_files: &[(&str, &str)]) -> Result<(), String> {
    private_umask();
    for (name, what) in key_files {
        let p = dir.join(name);
        if p.exists() {
            check_private_file(&p, what)?;
        }
    }
    create_private_dir(dir)?;
    tighten(dir).map_err(|e| format!("cannot set the modes of {}: {e}", dir.display()))
}

/// Every file this process creates from now on is private to its user (umask 077).
pub fn private_umask() {
    #[cfg(unix)]
    // SAFETY: umask(2) only sets the process's file mode creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// Creates `dir` (and missing parents) and makes it 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), String> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(DIR_MODE);
    }
    b.create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    set_mode(dir, DIR_MODE).map_err(|e| format!("cannot set the mode of {}: {e}", dir.display()))
}

/// Directories under `dir` 0700, files 0600, where group or others have any access. Symbolic
/// links are not followed (they are not berth's to change).
pub fn tighten(dir: &Path) -> std::io::Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let ty = entry.file_type()?;
            let path = entry.path();
            if ty.is_dir() {
                set_mode(&path, DIR_MODE)?;
                stack.push(path);
            } else if ty.is_file() {
                set_mode(&path, FILE_MODE)?;
            }
        }
    }
    Ok(())
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let current = std::fs::symlink_metadata(path)?.permissions().mode() & 0o777;
    // Only where group or others have access: a stricter mode the operator chose is kept.
    if current & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) -> std::io::Result<()> {
    Ok(())
}

/// Refuses a key or token file that is not a regular file or that group or others may read or
/// write: the error names the file and the `chmod` that fixes it. `what` names it in the message
/// (`master key`, `admin token`).
pub fn check_private_file(path: &Path, what: &str) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "the {what} {} is not a regular file",
            path.display()
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "the {what} file {} is readable or writable by group or others (mode {mode:04o}); \
                 refusing to use it. Run `chmod 600 {}` (and consider the {what} exposed)",
                path.display(),
                path.display()
            ));
        }
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn prepare_makes_the_directory_and_its_files_private() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        // As an older version left it: default umask.
        std::fs::create_dir_all(dir.join("store/blobs")).unwrap();
        std::fs::write(dir.join("store/db"), b"x").unwrap();
        std::fs::write(dir.join("notes"), b"t").unwrap();
        for (p, m) in [
            (dir.clone(), 0o755),
            (dir.join("store"), 0o755),
            (dir.join("store/blobs"), 0o775),
            (dir.join("store/db"), 0o644),
            (dir.join("notes"), 0o666),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        prepare(&dir, &KEY_FILES).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("store")), 0o700);
        assert_eq!(mode(&dir.join("store/blobs")), 0o700);
        assert_eq!(mode(&dir.join("store/db")), 0o600);
        assert_eq!(mode(&dir.join("notes")), 0o600);
        // The umask is set: what is created now is private without asking.
        std::fs::write(dir.join("store/snap.1"), b"y").unwrap();
        std::fs::create_dir(dir.join("later")).unwrap();
        assert_eq!(mode(&dir.join("store/snap.1")), 0o600);
        assert_eq!(mode(&dir.join("later")), 0o700);
        // A fresh directory is made 0700 too.
        let fresh = root.path().join("fresh/deeper");
        prepare(&fresh, &KEY_FILES).unwrap();
        assert_eq!(mode(&fresh), 0o700);

        // A readable token is refused, not tightened: it may have been copied already.
        let token = dir.join("admin.token");
        std::fs::write(&token, b"t").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = prepare(&dir, &KEY_FILES).unwrap_err();
        assert!(e.contains("admin token") && e.contains("chmod 600"), "{e}");
        assert_eq!(mode(&token), 0o644);
    }

    #[test]
    fn readable_key_files_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("admin.token");
        std::fs::write(&p, b"t").unwrap();
        for m in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
            let e = check_private_file(&p, "admin token").unwrap_err();
            assert!(e.contains(&p.display().to_string()), "{e}");
            assert!(e.contains(&format!("mode {m:04o}")), "{e}");
            assert!(e.contains(&format!("chmod 600 {}", p.display())), "{e}");
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_private_file(&p, "admin token").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        check_private_file(&p, "admin token").unwrap();
    }
}
