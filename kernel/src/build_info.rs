//! Build identity for `version`.

/// Short git commit the image was built from (`-dirty` when the tree had changes).
pub const GIT_COMMIT: &str = env!("SNAPFW_GIT_COMMIT");
/// Cargo profile (`release` or `debug`).
pub const PROFILE: &str = env!("SNAPFW_PROFILE");
