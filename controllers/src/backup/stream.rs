//! A volume's files as a tar stream, and back: the one format volume data travels in between nodes
//! (and that `restic dump` produces for a restore). Blocking code, run on a blocking thread or in
//! the agent process.
//!
//! What survives a round trip: regular files (content, sparse files come back full), directories
//! (empty ones too), symlinks (their target as written, never followed), hard links (files with
//! more than one link inside the volume are sent once and linked again), numeric uid/gid, the full
//! mode with setuid/setgid/sticky bits, and mtimes in whole seconds (tar's ustar/GNU headers hold
//! seconds). The volume root's own owner, mode and mtime travel as the entry `./`.
//! What does not: sockets, FIFOs and device nodes (skipped and counted: they are not data, and a
//! device node in a volume is a privilege, not content), extended attributes and ACLs, atimes.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use tar::{EntryType, Header, HeaderMode};

/// What one pack or unpack moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Entries of any kind (files, directories, symlinks, hard links), the root excluded.
    pub files: u64,
    /// Bytes of regular file content.
    pub bytes: u64,
    /// Sockets, FIFOs and devices left out.
    pub skipped: u64,
}

/// Writes the tree under `root` as a tar stream to `out` and finishes the archive. Never follows a
/// symlink, never leaves `root`'s filesystem tree. Directories are read in name order, so the
/// same content gives the same stream.
pub fn pack<W: Write>(root: &Path, out: W) -> io::Result<Counts> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    b.mode(HeaderMode::Complete);
    let mut counts = Counts::default();
    // (device, inode) of files with several links -> the first path sent for it.
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let meta = fs::symlink_metadata(root)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut h = header(&meta);
    b.append_data(&mut h, "./", io::empty())?;
    walk(&mut b, root, Path::new("."), &mut counts, &mut links)?;
    b.into_inner()?.flush()?;
    Ok(counts)
}

fn header(meta: &fs::Metadata) -> Header {
    let mut h = Header::new_gnu();
    h.set_metadata_in_mode(meta, HeaderMode::Complete);
    // Permission bits with setuid/setgid/sticky; the file type is the entry type.
    h.set_mode(meta.mode() & 0o7777);
    h
}

fn walk<W: Write>(
    b: &mut tar::Builder<W>,
    dir: &Path,
    rel: &Path,
    counts: &mut Counts,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel = rel.join(&name);
        let meta = fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        let mut h = header(&meta);
        if ft.is_dir() {
            h.set_size(0);
            b.append_data(&mut h, &rel, io::empty())?;
            counts.files += 1;
            walk(b, &path, &rel, counts, links)?;
        } else if ft.is_symlink() {
            h.set_size(0);
            let target = fs::read_link(&path)?;
            b.append_link(&mut h, &rel, &target)?;
            counts.files += 1;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                    h.set_entry_type(EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, &rel, first)?;
                    counts.files += 1;
                    continue;
                }
                links.insert((meta.dev(), meta.ino()), rel.clone());
            }
            let f = fs::File::open(&path)?;
            // The size in the header must match what is read: a file that changes while it is
            // read is cut or padded to the size it had, by `append_data`'s reader limit below.
            let size = meta.len();
            h.set_size(size);
            b.append_data(&mut h, &rel, Exact::new(f, size))?;
            counts.files += 1;
            counts.bytes += size;
        } else {
            counts.skipped += 1;
        }
    }
    Ok(())
}

/// Exactly `size` bytes of a file: a file that grew while it was read is cut, one that shrank is
/// padded with zeros, so the tar stream stays well formed (the next backup takes the new content).
struct Exact<R> {
    inner: io::Take<R>,
    left: u64,
}

impl<R: Read> Exact<R> {
    fn new(r: R, size: u64) -> Self {
        Exact {
            inner: r.take(size),
            left: size,
        }
    }
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        let n = if n == 0 {
            // Shrunk: zeros for the rest.
            let n = buf.len().min(self.left as usize);
            buf[..n].fill(0);
            n
        } else {
            n
        };
        self.left -= n as u64;
        Ok(n)
    }
}

/// Unpacks the tar stream `input` into the directory `dst` (created if missing), as root would:
/// numeric owners, full modes, mtimes (directories' too, set after their content), symlinks and
/// hard links. The entry `./` gives `dst` itself its owner, mode and mtime. Entries that would land
/// outside `dst` (`..`, absolute paths, through a symlink) are refused by the tar crate. Reads the
/// input to its end, so a sender's truncation (a TLS stream without its close) is an error.
pub fn unpack<R: Read>(input: R, dst: &Path) -> io::Result<Counts> {
    fs::create_dir_all(dst)?;
    let mut a = tar::Archive::new(input);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(true);
    a.set_preserve_mtime(true);
    a.set_overwrite(true);
    a.set_unpack_xattrs(false);
    let mut counts = Counts::default();
    // Directories' (path, mode, mtime): set again once everything inside them is written.
    let mut dirs: Vec<(PathBuf, u32, u64)> = Vec::new();
    for entry in a.entries()? {
        let mut e = entry?;
        let path = e.path()?.into_owned();
        let kind = e.header().entry_type();
        let is_root = path.components().all(|c| matches!(c, Component::CurDir));
        if is_root {
            if kind.is_dir() {
                let h = e.header();
                // A foreign archive's 64-bit id must not wrap into another (2^32 is root).
                let id = |n: u64| {
                    u32::try_from(n).map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("owner id {n} is out of range"),
                        )
                    })
                };
                let (uid, gid) = (id(h.uid()?)?, id(h.gid()?)?);
                std::os::unix::fs::chown(dst, Some(uid), Some(gid))?;
                dirs.push((dst.to_path_buf(), h.mode()?, h.mtime()?));
            }
            continue;
        }
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                counts.files += 1;
                counts.bytes += e.header().size()?;
            }
            EntryType::Directory | EntryType::Symlink | EntryType::Link => counts.files += 1,
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                // Not data (see the module's doc); a foreign archive may carry them.
                counts.skipped += 1;
                continue;
            }
            _ => {}
        }
        if kind.is_dir() {
            let h = e.header();
            dirs.push((clean(dst, &path), h.mode()?, h.mtime()?));
        }
        e.unpack_in(dst)?;
    }
    // The end-of-archive blocks and whatever follows: a stream cut short is an error here.
    io::copy(&mut a.into_inner(), &mut io::sink())?;
    // Deepest first: setting a directory's mtime does not touch its parent's.
    dirs.sort_by(|a, b| b.0.cmp(&a.0));
    for (path, mode, mtime) in dirs {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777))?;
        let t = filetime::FileTime::from_unix_time(i64::try_from(mtime).unwrap_or(i64::MAX), 0);
        filetime::set_symlink_file_times(&path, t, t)?;
    }
    Ok(counts)
}

/// Copies the part of tar stream `input` under directory `prefix` to `out`, with `prefix` taken off
/// every path: `restic dump` of a volume's directory names its entries by their full path in the
/// snapshot (`var/lib/docker/volumes/v/_data/...`), and a restore writes them relative to the
/// volume (the directory itself becomes `./`). Entries outside `prefix` (its parents) are dropped.
///
/// `root`: the directory's own (uid, gid, mode, mtime), sent first as `./`, since restic's dump
/// holds only what is inside it.
pub fn rebase<R: Read, W: Write>(
    input: R,
    prefix: &str,
    root: Option<(u32, u32, u32, u64)>,
    out: W,
) -> io::Result<Counts> {
    let prefix = prefix.trim_matches('/');
    let strip = |p: &Path| -> Option<PathBuf> {
        let p = p.strip_prefix("./").unwrap_or(p);
        if p == Path::new(prefix) {
            return Some(PathBuf::from("."));
        }
        p.strip_prefix(prefix).ok().map(Path::to_path_buf)
    };
    let mut archive = tar::Archive::new(input);
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut counts = Counts::default();
    if let Some((uid, gid, mode, mtime)) = root {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::Directory);
        h.set_uid(uid.into());
        h.set_gid(gid.into());
        h.set_mode(mode);
        h.set_mtime(mtime);
        h.set_size(0);
        builder.append_data(&mut h, "./", io::empty())?;
    }
    for entry in archive.entries()? {
        let mut e = entry?;
        let Some(rel) = strip(&e.path()?) else {
            continue;
        };
        // A fresh header: the old one may carry restic's ustar `prefix` field (paths over 100
        // bytes), which setting a shorter path would leave in place, prefixing it again.
        let old = e.header();
        let kind = old.entry_type();
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(old.mode()?);
        header.set_uid(old.uid()?);
        header.set_gid(old.gid()?);
        header.set_mtime(old.mtime()?);
        header.set_size(if kind.is_file() { old.size()? } else { 0 });
        match kind {
            EntryType::Symlink => {
                let target = e.link_name()?.unwrap_or_default().into_owned();
                builder.append_link(&mut header, &rel, target)?;
            }
            EntryType::Link => {
                let target = e.link_name()?.unwrap_or_default().into_owned();
                let target = strip(&target).unwrap_or(target);
                builder.append_link(&mut header, &rel, target)?;
            }
            _ => {
                if matches!(kind, EntryType::Regular | EntryType::Continuous) {
                    counts.files += 1;
                    counts.bytes += header.size()?;
                }
                builder.append_data(&mut header, &rel, &mut e)?;
            }
        }
    }
    builder.into_inner()?.flush()?;
    // To the end of the input: restic's dump then exits by itself (and releases its repository
    // lock) instead of being killed when its stream is dropped, and a failed dump is an error here.
    io::copy(&mut archive.into_inner(), &mut io::sink())?;
    Ok(counts)
}

/// `dst` joined with the normal components of an archive path (the tar crate's own rule).
fn clean(dst: &Path, path: &Path) -> PathBuf {
    let mut p = dst.to_path_buf();
    for c in path.components() {
        if let Component::Normal(n) = c {
            p.push(n);
        }
    }
    p
}

/// Removes everything inside `dir`, but not `dir` itself (a volume's mountpoint): a restore
/// replaces the volume's content, it does not merge into it. Never follows symlinks.
pub fn empty_dir(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let path = e.path();
        if e.file_type()?.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Entries and bytes of regular files under `root` (for the fast path, which reads nothing).
pub fn count(root: &Path) -> io::Result<Counts> {
    let mut c = Counts::default();
    fn go(dir: &Path, c: &mut Counts) -> io::Result<()> {
        for e in fs::read_dir(dir)? {
            let e = e?;
            let meta = fs::symlink_metadata(e.path())?;
            let ft = meta.file_type();
            if ft.is_dir() {
                c.files += 1;
                go(&e.path(), c)?;
            } else if ft.is_file() {
                c.files += 1;
                c.bytes += meta.len();
            } else if ft.is_symlink() {
                c.files += 1;
            } else {
                c.skipped += 1;
            }
        }
        Ok(())
    }
    go(root, &mut c)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn chown(p: &Path, uid: u32, gid: u32) {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
    }

    /// Everything that must survive, as (relative path, kind, uid, gid, mode, mtime, content/target).
    pub(crate) fn snapshot(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        fn go(root: &Path, dir: &Path, out: &mut Vec<String>) {
            let mut names: Vec<_> = fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                let p = dir.join(&n);
                let m = fs::symlink_metadata(&p).unwrap();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                let what = if m.is_dir() {
                    "dir".to_string()
                } else if m.file_type().is_symlink() {
                    format!("-> {}", fs::read_link(&p).unwrap().display())
                } else {
                    format!("{:?}", fs::read(&p).unwrap())
                };
                // A symlink's mode is always 0777 and its mtime is not compared: Linux keeps it,
                // but nothing reads it.
                let (mode, mtime) = if m.file_type().is_symlink() {
                    (0, 0)
                } else {
                    (m.mode(), m.mtime())
                };
                out.push(format!(
                    "{rel} {what} {}:{} {mode:o} {mtime} links={}",
                    m.uid(),
                    m.gid(),
                    m.nlink()
                ));
                if m.is_dir() {
                    go(root, &p, out);
                }
            }
        }
        let m = fs::metadata(root).unwrap();
        out.push(format!(
            ". {}:{} {:o} {}",
            m.uid(),
            m.gid(),
            m.mode(),
            m.mtime()
        ));
        go(root, root, &mut out);
        out
    }

    /// Whether this test runs as root (a new file is owned by the effective uid).
    fn is_root() -> bool {
        let d = tempfile::tempdir().unwrap();
        fs::metadata(d.path()).unwrap().uid() == 0
    }

    #[test]
    fn rebase_takes_the_snapshot_path_off_even_from_ustar_prefixed_names() {
        // As restic's dump writes them: full paths, long ones split into ustar prefix + name.
        let root = "var/lib/docker/volumes/a-volume-with-a-rather-long-name-for-a-test/_data";
        let deep = format!("{root}/{}/file.txt", "d".repeat(60));
        let mut input = Vec::new();
        {
            let mut b = tar::Builder::new(&mut input);
            for (path, data, dir) in [
                ("var".to_string(), &b""[..], true),
                (root.to_string(), &b""[..], true),
                (deep.clone(), &b"hello"[..], false),
            ] {
                let mut h = tar::Header::new_ustar();
                h.set_entry_type(if dir {
                    EntryType::Directory
                } else {
                    EntryType::Regular
                });
                h.set_mode(if dir { 0o755 } else { 0o640 });
                h.set_uid(1234);
                h.set_gid(5678);
                h.set_mtime(1_600_000_000);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, &path, data).unwrap();
            }
            b.finish().unwrap();
        }
        let mut out = Vec::new();
        let c = rebase(
            &input[..],
            &format!("/{root}"),
            Some((7, 8, 0o750, 1)),
            &mut out,
        )
        .unwrap();
        assert_eq!((c.files, c.bytes), (1, 5));
        let mut a = tar::Archive::new(&out[..]);
        let got: Vec<(String, u64)> = a
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().uid().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("./".to_string(), 7),
                (".".to_string(), 1234),
                (format!("{}/file.txt", "d".repeat(60)), 1234)
            ]
        );
    }

    #[test]
    fn a_tree_survives_pack_and_unpack() {
        let src = tempfile::tempdir().unwrap();
        let r = src.path();
        fs::write(r.join("plain"), b"hello").unwrap();
        fs::set_permissions(r.join("plain"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::create_dir_all(r.join("sub/empty")).unwrap();
        fs::write(r.join("sub/tool"), vec![7u8; 100_000]).unwrap();
        fs::set_permissions(r.join("sub/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(r.join("suid"), b"#!/bin/sh\n").unwrap();
        symlink("sub/tool", r.join("link")).unwrap();
        symlink("/etc/does-not-exist", r.join("dangling")).unwrap();
        fs::hard_link(r.join("plain"), r.join("sub/hard")).unwrap();
        let long = "d".repeat(120);
        fs::create_dir(r.join(&long)).unwrap();
        fs::write(r.join(&long).join("f".repeat(150)), b"long").unwrap();
        if is_root() {
            chown(&r.join("plain"), 1234, 5678);
            chown(&r.join("link"), 42, 43);
            chown(&r.join("sub"), 1000, 1000);
        }
        // After chown (which clears setuid).
        fs::set_permissions(r.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
        let old = filetime::FileTime::from_unix_time(1_000_000_000, 0);
        filetime::set_file_mtime(r.join("plain"), old).unwrap();
        filetime::set_file_mtime(r.join("sub/empty"), old).unwrap();
        filetime::set_file_mtime(r.join("sub"), old).unwrap();
        fs::set_permissions(r, fs::Permissions::from_mode(0o750)).unwrap();

        let mut buf = Vec::new();
        let sent = pack(r, &mut buf).unwrap();
        assert_eq!(sent.files, 10, "every entry but the root");
        assert_eq!(
            sent.bytes,
            5 + 100_000 + 10 + 4,
            "a hard link's content is sent once"
        );

        let dst = tempfile::tempdir().unwrap();
        let got = unpack(&buf[..], dst.path()).unwrap();
        assert_eq!(got, sent);
        let (a, b) = (snapshot(r), snapshot(dst.path()));
        assert_eq!(a, b);
        assert!(a
            .iter()
            .any(|l| l.starts_with("suid") && l.contains(" 104755 ")));
        assert!(a.iter().any(|l| l.contains("links=2")), "{a:#?}");
    }

    #[test]
    fn empty_dir_keeps_the_directory() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("a/b")).unwrap();
        fs::write(d.path().join("a/b/c"), b"x").unwrap();
        symlink("/", d.path().join("root-link")).unwrap();
        empty_dir(d.path()).unwrap();
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
        assert!(Path::new("/").exists());
    }

    #[test]
    fn a_truncated_stream_is_an_error() {
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("big"), vec![1u8; 50_000]).unwrap();
        let mut buf = Vec::new();
        pack(src.path(), &mut buf).unwrap();
        let dst = tempfile::tempdir().unwrap();
        assert!(unpack(&buf[..20_000], dst.path()).is_err());
    }
}
