//! The boot counter: a decimal integer in `<state dir>/boot-count`, bumped at every start,
//! so tests can tell whether a container's state volume survived a re-create.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Name of the counter file in the state directory.
pub const FILE_NAME: &str = "boot-count";

/// Creates `dir` if missing, increments the counter in it (a missing file counts as 0)
/// and returns the new value. The file is replaced atomically (temp file + rename).
pub fn bump(dir: &Path) -> io::Result<u64> {
    fs::create_dir_all(dir)?;
    let path = dir.join(FILE_NAME);
    let previous = match fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let boots = previous
        .checked_add(1)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "boot counter overflow"))?;
    let tmp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    let written = File::create(&tmp).and_then(|mut file| {
        writeln!(file, "{boots}")?;
        file.sync_all()
    });
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, &path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(boots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory path under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::SeqCst);
            let dir = std::env::temp_dir().join(format!(
                "clawfleet-agent-stub-boot-{}-{n}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&dir);
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn counts_from_one_and_creates_the_directory() {
        let tmp = TempDir::new();
        let dir = tmp.0.join("nested/.openclaw");
        assert_eq!(bump(&dir).unwrap(), 1);
        assert_eq!(bump(&dir).unwrap(), 2);
        assert_eq!(bump(&dir).unwrap(), 3);
        assert_eq!(fs::read_to_string(dir.join(FILE_NAME)).unwrap(), "3\n");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME], "no temp file is left behind");
    }

    #[test]
    fn continues_from_an_existing_value() {
        let tmp = TempDir::new();
        fs::create_dir_all(&tmp.0).unwrap();
        fs::write(tmp.0.join(FILE_NAME), "41").unwrap();
        assert_eq!(bump(&tmp.0).unwrap(), 42);
    }

    #[test]
    fn refuses_a_corrupt_counter() {
        let tmp = TempDir::new();
        fs::create_dir_all(&tmp.0).unwrap();
        fs::write(tmp.0.join(FILE_NAME), "many").unwrap();
        let err = bump(&tmp.0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(fs::read_to_string(tmp.0.join(FILE_NAME)).unwrap(), "many");
    }
}
