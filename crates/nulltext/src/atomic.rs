//! Files appear whole or not at all: written to a temporary sibling, then renamed.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nonce: u64 = rand::random();
    path.with_file_name(format!(".{name}.{}.{nonce:016x}.tmp", std::process::id()))
}

/// Checks, before any work, that `path` can be written: if it exists it is a regular file
/// (a symbolic link, FIFO or device node is never replaced by the rename), and the nearest
/// existing folder on its way takes a new file (a probe, removed at once; no folder is
/// made). Hours of computation should not end in a permission error.
pub fn check_target(path: &Path) -> Result<()> {
    refuse_non_regular(path)?;
    let io = |e: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    while !dir.exists() {
        if dir == Path::new(".") {
            // the working folder itself is gone
            return Err(io(std::io::Error::other(
                "the current folder no longer exists",
            )));
        }
        dir = dir
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
    }
    if !dir.is_dir() {
        return Err(io(std::io::Error::other(format!(
            "{} is not a folder",
            dir.display()
        ))));
    }
    let probe = temp_path(&dir.join(path.file_name().unwrap_or("out".as_ref())));
    std::fs::File::create_new(&probe).map_err(io)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn refuse_non_regular(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => {
            let what = if m.file_type().is_symlink() {
                "a symbolic link"
            } else if m.is_dir() {
                "a folder"
            } else {
                "not a regular file (a FIFO, socket or device)"
            };
            Err(Error::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(format!(
                    "is {what}; nulltext writes only regular files and will not replace it"
                )),
            })
        }
        _ => Ok(()),
    }
}

/// Writes `path` atomically with `write`, which receives a buffered file. On any error
/// (or a panic) the temporary file is removed and `path` is left as it was.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let io = |e: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
    }
    refuse_non_regular(path)?;
    let tmp = temp_path(path);
    struct Cleanup<'a>(&'a Path, bool);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            if !self.1 {
                let _ = std::fs::remove_file(self.0);
            }
        }
    }
    let mut guard = Cleanup(&tmp, false);
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let mut w = std::io::BufWriter::new(file);
    write(&mut w)?;
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    drop(file);
    // Again: the target may have changed during the work.
    refuse_non_regular(path)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    guard.1 = true;
    Ok(())
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| {
        w.write_all(bytes).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })
    })
}
