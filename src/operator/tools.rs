//! The QEMU tools as /health sees them: runs `binary --version` (the one
//! place outside `qemu-img` work and QEMU launches where vman starts a
//! process of its own).

use std::path::Path;
use std::process::Command;

/// First line of `binary --version`, or why it could not run.
pub fn tool_version(binary: &Path) -> Result<String, String> {
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| format!("{} not usable: {e}", binary.display()))?;
    if !out.status.success() {
        return Err(format!("{} --version failed", binary.display()));
    }
    let version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    Ok(format!("{}: {version}", binary.display()))
}

#[cfg(test)]
mod tests {
    use super::tool_version;
    use std::path::Path;

    #[test]
    fn a_missing_or_failing_tool_says_why() {
        let missing = tool_version(Path::new("/nonexistent/qemu-img")).unwrap_err();
        assert!(missing.contains("not usable"), "{missing}");
        let failing = tool_version(Path::new("false")).unwrap_err();
        assert!(failing.contains("--version failed"), "{failing}");
    }
}
