//! State files: a JSON record that survives a restart (replication's retained state, the persistent-session record), read whole and written atomically.

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

/// Writes a temporary file and renames it, so a crash never leaves half a record.
pub fn write(path: &Path, text: String) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}
