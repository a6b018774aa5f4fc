//! The router owner's policy file, read from disk at start and again on SIGHUP; what it
//! means is [`crate::core::policy`]'s to say.

use std::path::Path;

use crate::core::policy::{Policy, PolicyError};

/// Reads a policy file (YAML).
pub fn read(path: &Path) -> Result<Policy, PolicyError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        file: file.clone(),
        source,
    })?;
    Policy::parse_file(&file, &text)
}
