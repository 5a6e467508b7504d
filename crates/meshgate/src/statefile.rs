//! State files: a JSON record that survives a restart (replication's retained state, the persistent-session record), read whole and written atomically and durably.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The record at `path`, or an empty one when there is no file yet.
pub fn load<T: DeserializeOwned + Default>(path: &Path) -> Result<T, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

pub fn save<T: Serialize>(value: &T, path: &Path) -> Result<(), String> {
    write(path, serde_json::to_string(value).map_err(|e| e.to_string())?)
}

/// Writes a temporary file beside `path`, flushes it to disk, renames it over `path` and
/// flushes the directory, so neither a crash nor a power cut leaves half a file or loses the
/// rename. The one atomic write of the daemon (state files, the sidecar's nginx upstream file).
pub fn write(path: &Path, text: String) -> Result<(), String> {
    write_bytes(path, text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn write_bytes(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".meshgate-tmp");
    let tmp = dir.join(name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_whole_files_and_replaces_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("state.json");
        super::write(&path, "one".into()).unwrap();
        super::write(&path, "two".into()).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left: {left:?}");
    }
}
