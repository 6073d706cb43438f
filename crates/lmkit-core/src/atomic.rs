//! Atomic file writes: data goes to a uniquely named temporary file beside the target, is fsynced,
//! and is renamed over the target only when complete. A crash leaves the old file or the new one,
//! never a part; two writers never share a temporary name.

use crate::error::{PathError, PathResultExt};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Prefix of temporary files, so that readers and cleanup can tell them apart.
pub const TEMP_PREFIX: &str = ".lmkit-tmp-";

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Where a file written as `path` goes.
enum Target {
    /// A regular file, new or replaced by a rename: `path` itself, or where `path` is a
    /// symbolic link to a file, that file (the link stays).
    File(PathBuf),
    /// A device, pipe or socket (`/dev/null`, `/dev/stdout`, a FIFO), written in place:
    /// renaming a file over it would replace it.
    Special,
}

fn target(path: &Path) -> Target {
    // (`metadata` follows links, also /proc's links to pipes, which `canonicalize` cannot.)
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {
            let link = std::fs::symlink_metadata(path).is_ok_and(|l| l.file_type().is_symlink());
            match link.then(|| std::fs::canonicalize(path)) {
                Some(Ok(real)) => Target::File(real),
                _ => Target::File(path.to_path_buf()),
            }
        }
        Ok(m) if !m.is_dir() => Target::Special,
        // New, a directory (the rename says why not), or a link to nothing (replaced).
        _ => Target::File(path.to_path_buf()),
    }
}

/// A builder of temporary files and directories whose permissions are `bits` less the
/// process's umask (applied as they are created): outputs are made as any other file is (0644
/// and 0755 under the usual umask 022), not with a temporary file's 0600.
fn builder(bits: u32) -> tempfile::Builder<'static, 'static> {
    let mut b = tempfile::Builder::new();
    b.prefix(TEMP_PREFIX);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(bits));
    }
    #[cfg(not(unix))]
    let _ = bits;
    b
}

fn open_special(path: &Path) -> Result<std::fs::File, PathError> {
    std::fs::OpenOptions::new().write(true).open(path).at(path)
}

/// A file being written under a temporary name in `dir`; [`AtomicFile::commit`] gives it its
/// name. Dropped without a commit, the temporary file is removed. A file for a device, pipe or
/// socket is written into it directly ([`AtomicFile::create_for`]), or copied into it at the
/// commit.
pub struct AtomicFile {
    dir: PathBuf,
    writer: BufWriter<std::fs::File>,
    /// `None`: writing into a device, pipe or socket.
    temp: Option<tempfile::TempPath>,
}

impl AtomicFile {
    /// Starts a file in `dir` (which must exist).
    pub fn create_in(dir: &Path) -> Result<AtomicFile, PathError> {
        let tmp = builder(0o666).tempfile_in(dir).at(dir)?;
        let (file, temp) = tmp.into_parts();
        Ok(AtomicFile {
            dir: dir.to_path_buf(),
            writer: BufWriter::with_capacity(1 << 20, file),
            temp: Some(temp),
        })
    }

    /// Starts a file that will become `path` (beside the file a symbolic link `path` points to;
    /// into `path` itself where it is a device, pipe or socket).
    pub fn create_for(path: &Path) -> Result<AtomicFile, PathError> {
        match target(path) {
            Target::File(real) => Self::create_in(parent_of(&real)),
            Target::Special => Ok(AtomicFile {
                dir: parent_of(path).to_path_buf(),
                writer: BufWriter::with_capacity(1 << 20, open_special(path)?),
                temp: None,
            }),
        }
    }

    pub fn writer(&mut self) -> &mut BufWriter<std::fs::File> {
        &mut self.writer
    }

    /// Flushes, fsyncs and renames the file to `path` (in the same directory; where `path` is a
    /// symbolic link to a file, over that file).
    pub fn commit(self, path: &Path) -> Result<(), PathError> {
        let AtomicFile {
            dir, writer, temp, ..
        } = self;
        let mut file = writer.into_inner().map_err(|e| e.into_error()).at(path)?;
        let Some(temp) = temp else {
            return Ok(());
        };
        let real = match target(path) {
            Target::File(real) => real,
            Target::Special => {
                use std::io::Seek;
                file.rewind().at(path)?;
                let mut out = open_special(path)?;
                std::io::copy(&mut file, &mut out).at(path)?;
                out.flush().at(path)?;
                return Ok(());
            }
        };
        // A file replaced keeps its permissions.
        if let Ok(m) = std::fs::metadata(&real) {
            file.set_permissions(m.permissions()).at(path)?;
        }
        file.sync_all().at(path)?;
        temp.persist(&real).map_err(|e| e.error).at(path)?;
        // The rename is durable once the directory is synced (best effort: not every
        // filesystem lets a directory be opened for it).
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }
}

/// A directory being filled under a temporary name in its parent; [`AtomicDir::commit`] renames
/// it to its final name. Dropped without a commit, it is removed with its contents.
pub struct AtomicDir {
    parent: PathBuf,
    temp: tempfile::TempDir,
}

impl AtomicDir {
    /// Starts a directory in `parent` (created if missing).
    pub fn create_in(parent: &Path) -> Result<AtomicDir, PathError> {
        std::fs::create_dir_all(parent).at(parent)?;
        let temp = builder(0o777).tempdir_in(parent).at(parent)?;
        Ok(AtomicDir {
            parent: parent.to_path_buf(),
            temp,
        })
    }

    /// Where to write the directory's files.
    pub fn path(&self) -> &Path {
        self.temp.path()
    }

    /// Renames the directory to `name` in its parent. A directory already of that name is moved
    /// aside first and removed only once the new one is in place.
    pub fn commit(self, name: impl AsRef<std::ffi::OsStr>) -> Result<PathBuf, PathError> {
        let target = self.parent.join(name.as_ref());
        if let Ok(m) = std::fs::metadata(&target) {
            if !m.is_dir() {
                let e = std::io::Error::other("exists and is not a directory; give a new path");
                return Err(PathError::new(&target, e));
            }
        }
        let old = if target.exists() {
            let old = AtomicDir::create_in(&self.parent)?;
            std::fs::rename(&target, old.path().join("old")).at(&target)?;
            Some(old)
        } else {
            None
        };
        let kept = self.temp.keep();
        std::fs::rename(&kept, &target).at(&target)?;
        if let Ok(d) = std::fs::File::open(&self.parent) {
            let _ = d.sync_all();
        }
        drop(old); // removes the earlier directory
        Ok(target)
    }
}

/// A directory of outputs made as a whole: files are written into a temporary sibling
/// directory ([`OutputDir::path`]), which takes the target's place on [`OutputDir::commit`]. A
/// run that fails or is killed leaves the target as it was; a run that succeeds leaves only its
/// own outputs there, never stale ones from an earlier run. A target that holds anything other
/// than earlier outputs of the same kind is refused up front, so nothing else is ever deleted.
pub struct OutputDir {
    target: PathBuf,
    staging: AtomicDir,
}

/// Why an output directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OutputDirError {
    #[error(transparent)]
    Io(#[from] PathError),
    #[error("{}: holds `{name}`, which is not {what}; give an empty or new directory", dir.display())]
    Foreign {
        dir: PathBuf,
        name: String,
        what: String,
    },
}

impl OutputDir {
    /// Prepares to write `target`. `is_output` tells the file names that earlier runs of the
    /// same command write (they are replaced); `what` names them in errors.
    pub fn create(
        target: &Path,
        what: &str,
        is_output: impl Fn(&str) -> bool,
    ) -> Result<OutputDir, OutputDirError> {
        if target.exists() {
            for e in std::fs::read_dir(target).at(target)? {
                let name = e.at(target)?.file_name().to_string_lossy().into_owned();
                if !is_output(&name) && !name.starts_with(TEMP_PREFIX) {
                    return Err(OutputDirError::Foreign {
                        dir: target.to_path_buf(),
                        name,
                        what: what.to_string(),
                    });
                }
            }
        }
        // (Temporaries in the parent are left alone: another command may be writing there.)
        let parent = parent_of(target);
        Ok(OutputDir {
            target: target.to_path_buf(),
            staging: AtomicDir::create_in(parent)?,
        })
    }

    /// Where this run writes its outputs until the commit.
    pub fn path(&self) -> &Path {
        self.staging.path()
    }

    /// The final path of `file`, a path under [`OutputDir::path`].
    pub fn final_path(&self, file: &Path) -> PathBuf {
        match file.strip_prefix(self.staging.path()) {
            Ok(rel) => self.target.join(rel),
            Err(_) => file.to_path_buf(),
        }
    }

    /// Puts the outputs in the target's place; the earlier outputs there are removed.
    pub fn commit(self) -> Result<PathBuf, PathError> {
        let name = self.target.file_name().ok_or_else(|| {
            PathError::new(
                &self.target,
                std::io::Error::other("an output directory needs a name of its own"),
            )
        })?;
        self.staging.commit(name)
    }
}

/// Removes the temporary files and directories a writer that died left in `dir`.
pub fn remove_temporaries(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                let p = e.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    }
}

/// Writes `path` atomically with what `f` writes.
pub fn write_atomic(
    path: &Path,
    f: impl FnOnce(&mut BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<(), PathError> {
    let mut file = AtomicFile::create_for(path)?;
    f(file.writer()).at(path)?;
    file.commit(path)
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic_bytes(path: &Path, bytes: &[u8]) -> Result<(), PathError> {
    write_atomic(path, |w| w.write_all(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files and directories written are made with the permissions any other file gets (0666
    /// and 0777 less the umask), not a temporary file's 0600 (which left checkpoints and shards
    /// unreadable to any other user), and a file replaced keeps its own.
    #[test]
    fn outputs_get_the_usual_permissions_and_a_replaced_file_keeps_its_own() {
        use std::os::unix::fs::PermissionsExt;
        let umask = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .map(|m| u32::from_str_radix(m.trim(), 8).unwrap())
            .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_atomic_bytes(&d.join("new.txt"), b"x").unwrap();
        assert_eq!(mode(&d.join("new.txt")), 0o666 & !umask);
        let out = AtomicDir::create_in(d).unwrap();
        std::fs::write(out.path().join("a"), "1").unwrap();
        let done = out.commit("run").unwrap();
        assert_eq!(mode(&done), 0o777 & !umask);
        let kept = d.join("kept.txt");
        std::fs::write(&kept, "old").unwrap();
        std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic_bytes(&kept, b"new").unwrap();
        assert_eq!(
            (mode(&kept), std::fs::read(&kept).unwrap()),
            (0o640, b"new".to_vec())
        );
    }

    /// A symbolic link to a file, a FIFO, or a link to a FIFO given as the path (`/dev/null`
    /// and `/dev/stdout` are such files) is written through: the rename replaced each of them
    /// with a regular file (as root, `--output /dev/null` replaced the system's /dev/null). A
    /// directory is not committed over a file.
    #[test]
    fn links_devices_and_pipes_are_written_through_not_replaced() {
        use std::os::unix::fs::{symlink, FileTypeExt};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let real = d.join("real.txt");
        std::fs::write(&real, "old").unwrap();
        symlink(&real, d.join("link")).unwrap();
        write_atomic_bytes(&d.join("link"), b"new").unwrap();
        let link = std::fs::symlink_metadata(d.join("link")).unwrap();
        assert!(link.file_type().is_symlink());
        assert_eq!(std::fs::read(&real).unwrap(), b"new");

        let fifo = d.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success());
        symlink(&fifo, d.join("to-fifo")).unwrap();
        for (path, in_dir) in [("fifo", false), ("to-fifo", false), ("fifo", true)] {
            let read_from = fifo.clone();
            let reader = std::thread::spawn(move || std::fs::read(read_from).unwrap());
            let path = d.join(path);
            if in_dir {
                let mut f = AtomicFile::create_in(d).unwrap();
                f.write_all(b"piped").unwrap();
                f.commit(&path).unwrap();
            } else {
                write_atomic_bytes(&path, b"piped").unwrap();
            }
            // (Checked before the join: a FIFO replaced never gets a writer.)
            let kind = std::fs::symlink_metadata(&fifo).unwrap().file_type();
            assert!(kind.is_fifo(), "{}", path.display());
            assert_eq!(reader.join().unwrap(), b"piped");
        }
        assert!(std::fs::read_dir(d).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(TEMP_PREFIX)));

        let out = AtomicDir::create_in(d).unwrap();
        std::fs::write(out.path().join("a"), "a").unwrap();
        let e = out.commit("real.txt").unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        assert_eq!(std::fs::read(&real).unwrap(), b"new");
    }

    #[test]
    fn writes_whole_files_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomic_bytes(&p, b"one").unwrap();
        write_atomic(&p, |w| w.write_all(b"two")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomic_bytes(&p, b"old").unwrap();
        let e = write_atomic(&p, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk on fire"))
        });
        assert!(e.unwrap_err().to_string().contains("disk on fire"));
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn directories_appear_whole_or_not_at_all() {
        let root = tempfile::tempdir().unwrap();
        let d = AtomicDir::create_in(root.path()).unwrap();
        std::fs::write(d.path().join("a"), "1").unwrap();
        let names = || -> Vec<String> {
            let mut v: Vec<_> = std::fs::read_dir(root.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert!(names()[0].starts_with(TEMP_PREFIX));
        let done = d.commit("ckpt").unwrap();
        assert_eq!(std::fs::read_to_string(done.join("a")).unwrap(), "1");
        assert_eq!(names(), ["ckpt"]);
        drop(AtomicDir::create_in(root.path()).unwrap());
        assert_eq!(names(), ["ckpt"]);
        std::fs::create_dir(root.path().join(format!("{TEMP_PREFIX}left"))).unwrap();
        std::fs::write(root.path().join(format!("{TEMP_PREFIX}file")), "x").unwrap();
        remove_temporaries(root.path());
        assert_eq!(names(), ["ckpt"]);
    }

    #[test]
    fn output_dirs_replace_earlier_outputs_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("shards");
        let is_shard = |n: &str| n.starts_with("part-");
        let write = |files: &[&str]| {
            let out = OutputDir::create(&target, "a shard", is_shard).unwrap();
            for f in files {
                std::fs::write(out.path().join(f), f).unwrap();
            }
            let p = out.final_path(&out.path().join(files[0]));
            assert_eq!(p, target.join(files[0]));
            out.commit().unwrap();
        };
        let names = |d: &Path| -> Vec<String> {
            let mut v: Vec<_> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        write(&["part-0", "part-1", "part-2"]);
        write(&["part-0"]);
        assert_eq!(names(&target), ["part-0"], "a stale part survived");
        assert_eq!(names(root.path()), ["shards"]);
        // A run that fails midway leaves the earlier outputs whole.
        {
            let out = OutputDir::create(&target, "a shard", is_shard).unwrap();
            std::fs::write(out.path().join("part-0"), "half").unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(target.join("part-0")).unwrap(),
            "part-0"
        );
        assert_eq!(names(root.path()), ["shards"]);
        // Someone else's file: refused, nothing touched.
        std::fs::write(target.join("notes.txt"), "mine").unwrap();
        let e = OutputDir::create(&target, "a shard", is_shard)
            .err()
            .unwrap();
        assert!(e.to_string().contains("notes.txt"), "{e}");
        assert_eq!(names(&target), ["notes.txt", "part-0"]);
    }

    #[test]
    fn uncommitted_files_vanish() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut f = AtomicFile::create_in(dir.path()).unwrap();
            f.write_all(b"x").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
